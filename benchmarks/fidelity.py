"""Does the simulator predict what XLA compiles? Plans at real size, compile only.

Usage: python benchmarks/fidelity.py [--models gpt2:small,bert:base] [--topology 2x4-v100-25gbe]
                                     [--plans data_parallel,fsdp,megatron,tag_jax] [--budget 7]
                                     [--random N] [--random-models mlp:real,vgg:19:8]
                                     [--constrain operands|results] [--cache FILE] [--hlo-dir DIR]
                                     [--compute-dtype bfloat16]
                                     [--out benchmarks/FIDELITY.md]

`--constrain operands` (the default here) compiles the program emitted with
`Plan.jit(constrain="operands")`, which also pins the operand layouts each op's strategy wants, so the
program does what the strategy says; `--constrain results` compiles the default program
(`Plan.jit()`), where GSPMD may pick other operand layouts (see tag_jax/emit/program.py).

For every (model, plan), the plan's predicted per-device collective bytes (per kind) are compared with
the collectives parsed from the compiled HLO (`tag_jax.hlo.collectives`; XLA:CPU's all-reduce + 1/n
dynamic-slice counts as a reduce-scatter), and predicted per-device peak memory with
`memory_analysis()` (argument + output + temp). Runs on 8 simulated CPU devices; nothing is allocated.

`--random N` also compiles N random valid strategies per model (`tag_jax.search.random_strategy`,
seeded by model and index; even indices on the 1-D mesh, odd ones on the (data, model) 2x4 mesh), in
`--random-models` (default: the `--models` list; `model:size:K` takes K for that model). `--cache FILE` keeps what XLA compiled per (model,
strategy, constrain), so re-running after a simulator change only re-predicts; `--plans-dir DIR`
saves auto_shard's plans (whose search is bounded by the clock) and re-prices them when re-run;
`--baseline-plans-dir DIR` does the same for the baselines, so that a cache compiled for one
version's baseline strategies is re-priced with those strategies after the baselines change how they
pick op options (a baseline whose strategy is not in the cache would be compiled again).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

import tag_jax  # noqa: E402
from tag_jax import baselines, models, rules  # noqa: E402
from tag_jax.cost import set_lowering  # noqa: E402
from tag_jax.hlo import collective_bytes_by_kind, collectives, compiled_memory  # noqa: E402

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
SHORT = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "all-to-all": "A2A",
         "collective-permute": "CP", "peak memory": "mem"}
DEFAULT_CASES = ("mlp:real,gpt2:small,bert:base,vit:b16,resnet:50,vgg:19,moe:base,t5:base,"
                 "recommender:real")
COMM_BOUND, MEMORY_BOUND = 0.10, 0.20


def _ratio(pred: float, real: float) -> str:
    if real == 0 and pred == 0:
        return "="
    return f"{pred / real:.3f}" if real else "inf"


def _outside(kind: str, pred: float, real: float) -> bool:
    bound = MEMORY_BOUND if kind == "peak memory" else COMM_BOUND
    if real == 0:
        return pred > 0
    return abs(pred / real - 1) > bound


def _key(name: str, strategy, constrain: str) -> str:
    text = repr((name, strategy.mesh, strategy.choices, strategy.input_shardings, constrain))
    return hashlib.sha1(text.encode()).hexdigest()


def _compiled(plan, ex, constrain: str, cache: dict, key: str, hlo_path: str | None) -> dict:
    if key in cache:
        return cache[key]
    t0 = time.perf_counter()
    c = "operands" if constrain == "operands" else True
    compiled = plan.jit(constrain=c).lower(ex.state, ex.batch).compile()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(compiled.as_text())
    rec = {"kinds": collective_bytes_by_kind(collectives(compiled)),
           "memory": compiled_memory(compiled), "compile_s": time.perf_counter() - t0}
    cache[key] = rec
    return rec


def _rows(plan, real: dict) -> list[tuple[str, float, float]]:
    pred = plan.cost.comm_bytes_by_kind
    rows = [(k, pred.get(k, 0), real["kinds"].get(k, 0)) for k in KINDS
            if pred.get(k, 0) or real["kinds"].get(k, 0)]
    rows.append(("peak memory", plan.cost.peak_memory_bytes, real["memory"]["peak"]))
    return rows


def _random_plans(ex, graph, topo, count: int, model_index: int):
    from tag_jax.plan import Plan
    from tag_jax.search.random_strategy import random_strategy
    from tag_jax.strategy import MeshSpec

    meshes = (MeshSpec((8,), ("devices",), tuple(range(8))),
              MeshSpec((2, 4), ("data", "model"), tuple(range(8))))
    options = {}
    for k in range(count):
        spec = meshes[k % 2]
        if spec not in options:
            options[spec] = rules.for_graph(graph, spec.axes)
        rng = np.random.default_rng([11, model_index, k])
        strategy = random_strategy(graph, options[spec], spec, rng)
        yield f"random-{k}", strategy.name, Plan.build(graph, strategy, options[spec], topo)


class _Saving:
    """auto_shard's plan, saved to `path` once made (`--plans-dir`)."""

    def __init__(self, planner, path: str):
        self.planner, self.path = planner, path

    def plan(self, *args):
        plan = self.planner.plan(*args)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        plan.save(self.path)
        return plan


def _reload(path: str, ex, topo):
    """A saved plan with its cost predicted again by today's simulator."""
    import dataclasses

    from tag_jax.plan import Plan, simulate

    plan = Plan.load(path, ex.step, ex.state, ex.batch, topology=topo)
    cost = simulate(plan.graph, plan.op_strategies, topo, plan.strategy, plan.compression)
    return dataclasses.replace(plan, cost=cost)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_CASES)
    ap.add_argument("--topology", default="2x4-v100-25gbe")
    ap.add_argument("--plans", default="data_parallel,fsdp,megatron,tag_jax",
                    help="baselines and/or tag_jax (auto_shard's plan); '' for none")
    ap.add_argument("--budget", type=float, default=7.0, help="auto_shard's search budget, seconds")
    ap.add_argument("--random", type=int, default=0, help="random valid strategies per model")
    ap.add_argument("--random-models", default=None, help="models for --random (default --models)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cache", default=None, help="JSON file of compiled results, reused")
    ap.add_argument("--hlo-dir", default=None, help="write each compiled HLO text here")
    ap.add_argument("--plans-dir", default=None,
                    help="save tag_jax's plans here; a plan saved there is reused (re-priced)")
    ap.add_argument("--baseline-plans-dir", default=None,
                    help="save the baselines' plans here; a plan saved there is reused (re-priced)")
    ap.add_argument("--constrain", default="operands", choices=("operands", "results"))
    ap.add_argument("--compute-dtype", default=None,
                    help="the zoo in mixed precision, e.g. bfloat16 (models.get(compute_dtype=...))")
    args = ap.parse_args()
    topo = tag_jax.Topology.preset(args.topology)
    # the compiled side is XLA:CPU's: price its scratch buffers too (tag_jax.cost.simulate.LOWERING)
    set_lowering("xla-cpu" if jax.default_backend() == "cpu" else None)
    mesh = jax.make_mesh((8,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))
    cache = {}
    if args.cache and os.path.exists(args.cache):
        with open(args.cache) as f:
            cache = json.load(f)

    def save_cache():
        if args.cache:
            with open(args.cache + ".tmp", "w") as f:
                json.dump(cache, f)
            os.replace(args.cache + ".tmp", args.cache)

    header = "| model | plan | kind | predicted B | compiled B | ratio |"
    lines = [header, "|---|---|---|---|---|---|"]
    rheader = "| model | strategy | " + " | ".join(SHORT.values()) + " |"
    rlines = [rheader, "|---|---|" + "---|" * len(SHORT)]
    worst, outside, rworst, routside = [], [], [], []
    n_rows = n_rrows = 0
    plans = [p for p in args.plans.split(",") if p]
    counts = {}  # --random-models entries may be model:size:N (N strategies for that model)
    for entry in (args.random_models or args.models).split(",") if args.random else []:
        parts = entry.split(":")
        counts[":".join(parts[:2])] = int(parts[2]) if len(parts) > 2 else args.random
    random_models = list(counts)
    cases = list(dict.fromkeys([c for c in args.models.split(",") if c] + random_models))
    for case in cases:
        name, size = case.split(":")
        ex = models.get(name, size, compute_dtype=args.compute_dtype)
        todo = []
        if case in args.models.split(",") and plans:
            for plan_name in plans:
                if plan_name == "tag_jax":  # the planner's own choice, as auto_shard returns it
                    saved = os.path.join(args.plans_dir, f"{name}-{size}.json") if args.plans_dir else None
                    if saved and os.path.exists(saved):  # the same plan again, priced afresh
                        todo.append((plan_name, None, lambda saved=saved: _reload(saved, ex, topo)))
                        continue
                    planner = tag_jax.auto_shard(ex.step, mesh, topology=topo, time_budget_s=args.budget)
                    if saved:
                        planner = _Saving(planner, saved)
                else:
                    saved = (os.path.join(args.baseline_plans_dir, f"{name}-{size}-{plan_name}.json")
                             if args.baseline_plans_dir else None)
                    if saved and os.path.exists(saved):  # the strategy compiled before, priced afresh
                        todo.append((plan_name, None, lambda saved=saved: _reload(saved, ex, topo)))
                        continue
                    planner = getattr(baselines, plan_name)(ex.step, mesh, topology=topo)
                    if saved:
                        planner = _Saving(planner, saved)
                todo.append((plan_name, None, lambda planner=planner: planner.plan(ex.state, ex.batch)))
        if case in random_models:
            graph = tag_jax.trace(ex.step, ex.state, ex.batch)
            index = sorted(DEFAULT_CASES.split(",")).index(case) if case in DEFAULT_CASES else 99
            for label, sname, plan in _random_plans(ex, graph, topo, counts[case], index):
                todo.append((label, sname, lambda plan=plan: plan))
        for label, sname, make in todo:
            t0 = time.perf_counter()
            plan = make()
            plan_s = time.perf_counter() - t0
            key = _key(case + (f":{args.compute_dtype}" if args.compute_dtype else ""), plan.strategy,
                       args.constrain)
            hlo = os.path.join(args.hlo_dir, f"{name}-{size}-{label}.hlo") if args.hlo_dir else None
            try:
                real = _compiled(plan, ex, args.constrain, cache, key, hlo)
            except Exception as e:  # a compile failure is a finding; keep going
                print(f"  {case} {label}: compile failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            save_cache()
            rows = _rows(plan, real)
            if sname is None:
                for kind, p, r in rows:
                    line = f"| {name}-{size} | {label} | {kind} | {p:,.0f} | {r:,.0f} | {_ratio(p, r)} |"
                    lines.append(line)
                    print(line, flush=True)
                    n_rows += 1
                    what = f"{name}-{size} {label} {kind}: {_ratio(p, r)}"
                    if r:
                        worst.append((abs(p / r - 1), what))
                    if _outside(kind, p, r):
                        outside.append(what)
            else:
                got = {k: (p, r) for k, p, r in rows}
                cells = []
                for kind in SHORT:
                    p, r = got.get(kind, (0, 0))
                    bad = _outside(kind, p, r)
                    cells.append(("**" + _ratio(p, r) + "**") if bad else _ratio(p, r))
                    n_rrows += bool(p or r)
                    if bad:
                        routside.append(f"{name}-{size} {label} ({sname}) {kind}: {_ratio(p, r)} "
                                        f"({p:,.0f} vs {r:,.0f} B)")
                    if r:
                        rworst.append((abs(p / r - 1), f"{name}-{size} {label} {kind}: {_ratio(p, r)}"))
                line = f"| {name}-{size} | {label} {sname} | " + " | ".join(cells) + " |"
                rlines.append(line)
                print(line, flush=True)
            print(f"  (planned in {plan_s:.2f} s, compiled in {real['compile_s']:.1f} s)", flush=True)
    worst.sort(reverse=True)
    summary = ["", f"Outside the bounds (communication 10%, memory 20%): {len(outside)} of {n_rows} rows"]
    summary += [f"- {w}" for w in outside]
    summary += ["", "Worst cases:"] + [f"- {w}" for _, w in worst[:10]]
    rsummary = []
    if args.random:
        rworst.sort(reverse=True)
        rsummary = ["", f"Random strategies outside the bounds: {len(routside)} of {n_rrows} (strategy, "
                    f"kind) cells"] + [f"- {w}" for w in routside]
    print("\n".join(summary + rsummary))
    if args.out:
        plans_arg = args.plans or '""'
        cmd = (f"python benchmarks/fidelity.py --models {args.models} --plans {plans_arg} "
               f"--budget {args.budget} --constrain {args.constrain}")
        if args.plans_dir:
            cmd += f" --plans-dir {args.plans_dir}"
        if args.baseline_plans_dir:
            cmd += f" --baseline-plans-dir {args.baseline_plans_dir}"
        if args.cache:
            cmd += f" --cache {args.cache}"
        if args.compute_dtype:
            cmd += f" --compute-dtype {args.compute_dtype}"
        if args.random:
            cmd += f" --random {args.random}"
            if args.random_models:
                cmd += f" --random-models {args.random_models}"
        with open(args.out, "w") as f:
            f.write(f"# Simulator fidelity: predicted vs compiled (topology {args.topology}, 8 CPU devices)\n\n"
                    f"Command: `{cmd} --out {args.out}`\n\n")
            f.write("\n".join(lines + summary) + "\n")
            if args.random:
                per = ", ".join(f"{m} {k}" for m, k in counts.items())
                f.write(f"\n## Random strategies ({per})\n\nRatio predicted / "
                        f"compiled per kind (`=`: both zero; bold: outside the bound).\n\n")
                f.write("\n".join(rlines + rsummary) + "\n")


if __name__ == "__main__":
    main()
