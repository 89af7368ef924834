"""Equivalence of sharded and unsharded training steps: baselines and random valid strategies.

For every zoo model (toy size, SGD, see DESIGN.md on Adam) x {1-D (8,) mesh, 2-D (2, 4) mesh} x
{data_parallel, fsdp, megatron, N random strategies (`tag_jax.search.random_strategy`)}: emit the
strategy with `Plan.build(...).jit(compiler_options=models.fast_compile_options())`, run one step on
concrete toy inputs on 8 CPU devices, and compare every output with the unsharded
`jax.jit(step)` (float32, rtol 1e-5, atol 1e-6).

    python benchmarks/equivalence.py                      # all models, 50 random strategies per case
    python benchmarks/equivalence.py --random 5 --models mlp gpt2 --budget-s 600
    python benchmarks/equivalence.py --part 0/2 --jsonl a.jsonl   # split over processes, then
    python benchmarks/equivalence.py --report a.jsonl b.jsonl --markdown benchmarks/EQUIVALENCE.md
    python benchmarks/equivalence.py --rerun-failed a.jsonl --jsonl b.jsonl   # only a's failures

In `--report`, a later record of the same (model, mesh, strategy) replaces an earlier one (a rerun).

Strategies run round-robin over the cases (round 0: the baselines of every case, then random
strategy 0 of every case, ...), so a run stopped by `--budget-s` has covered all cases evenly.
Each result is appended to `--jsonl` as it comes, so a killed run loses nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

RTOL, ATOL = 1e-5, 1e-6
SMALLER = {  # one block (and four tables) keep compiles short and still show every op kind
    "gpt2": {"n_layer": 1}, "bert": {"n_layer": 1}, "moe": {"n_layer": 1, "moe_every": 1},
    "vit": {"n_layer": 1}, "t5": {"n_layer": 1}, "recommender": {"rows": (64, 128, 256, 512)}}
MESHES = {"1d": ((8,), ("devices",)), "2x4": ((2, 4), ("x", "y"))}


def _setup_devices() -> None:
    from tag_jax.models._common import FAST_COMPILE_XLA_FLAGS  # see fast_compile_options()

    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8 "
                               + FAST_COMPILE_XLA_FLAGS).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import jax

    jax.config.update("jax_num_cpu_devices", 8)


class Case:
    """One model on one mesh: the graph, option lists, concrete inputs and the unsharded result."""

    def __init__(self, name: str, mesh_kind: str, model_cache: dict):
        import jax

        import tag_jax
        from tag_jax import models
        from tag_jax.strategy import MeshSpec

        self.name, self.mesh_kind = name, mesh_kind
        if name not in model_cache:
            ex = models.get(name, "toy", optimizer="sgd", **SMALLER.get(name, {}))
            state, batch = ex.init(jax.random.key(0))
            ref = jax.jit(ex.step, compiler_options=models.fast_compile_options())(state, batch)
            graph = tag_jax.trace(ex.step, ex.state, ex.batch)
            model_cache[name] = (ex, state, batch, jax.device_get(ref), graph)
        self.ex, self.state, self.batch, self.ref, self.graph = model_cache[name]
        shape, names = MESHES[mesh_kind]
        self.mesh = MeshSpec(shape, names, tuple(range(8)))
        self.options: dict = {}

    def options_for(self, spec):
        from tag_jax import rules

        key = tuple(zip(spec.axis_names, spec.shape))
        if key not in self.options:
            self.options[key] = rules.for_graph(self.graph, spec.axes)
        return self.options[key]

    def strategy(self, which: str, seed: int):
        """(strategy, option lists) for a baseline name or 'random:<k>'."""
        import numpy as np

        from tag_jax import baselines, models
        from tag_jax.search.random_strategy import random_strategy

        if which.startswith("random:"):
            k = int(which.split(":")[1])
            rng = np.random.default_rng([seed, k, sorted(MESHES).index(self.mesh_kind),
                                         sorted(models.names()).index(self.name)])
            ops = self.options_for(self.mesh)
            s = random_strategy(self.graph, ops, self.mesh, rng)
            return s, ops
        spec = baselines.megatron_mesh(self.mesh) if which == "megatron" else self.mesh
        ops = self.options_for(spec)
        return baselines.baseline_strategy(which, self.graph, ops, spec), ops

    def run(self, which: str, seed: int) -> dict:
        import jax
        import numpy as np

        from tag_jax import models
        from tag_jax.plan import Plan

        rec = {"model": self.name, "mesh": self.mesh_kind, "which": which}
        t0 = time.perf_counter()
        try:
            strategy, ops = self.strategy(which, seed)
            rec["strategy"] = strategy.name
            rec["devices"] = list(strategy.mesh.device_ids)
            fn = Plan.build(self.graph, strategy, ops, cost=None).jit(
                compiler_options=models.fast_compile_options())
            out = jax.device_get(fn(self.state, self.batch))
        except Exception as e:  # an emission or compile failure is a finding too
            rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}",
                       seconds=time.perf_counter() - t0)
            return rec
        worst_abs = worst_rel = 0.0
        bad = []
        flat_out = jax.tree_util.tree_flatten_with_path(out)[0]
        flat_ref = jax.tree_util.tree_leaves(self.ref)
        for (path, got), want in zip(flat_out, flat_ref):
            g = np.asarray(got, np.float64)
            w = np.asarray(want, np.float64)
            if g.shape != w.shape:
                bad.append(f"{jax.tree_util.keystr(path)}: shape {g.shape} != {w.shape}")
                continue
            if not g.size:
                continue
            diff = np.abs(g - w)
            worst_abs = max(worst_abs, float(diff.max()))
            rel = diff / np.maximum(np.abs(w), 1e-30)
            worst_rel = max(worst_rel, float(np.where(diff > 0, rel, 0.0).max()))
            if not np.allclose(g, w, rtol=RTOL, atol=ATOL):
                i = np.unravel_index(int(np.argmax(diff - RTOL * np.abs(w))), diff.shape)
                bad.append(f"{jax.tree_util.keystr(path)}{list(map(int, i))}: got {g[i]:.9g} "
                           f"want {w[i]:.9g}")
        rec.update(ok=not bad, max_abs=worst_abs, max_rel=worst_rel, mismatches=bad[:10],
                   n_mismatched_leaves=len(bad), seconds=time.perf_counter() - t0)
        return rec


def run(args) -> list[dict]:
    _setup_devices()
    from tag_jax import baselines, models

    names = args.models or list(models.names())
    kinds = args.meshes
    cases = [(n, m) for n in names for m in kinds]
    part, parts = (int(x) for x in args.part.split("/"))
    cases = cases[part::parts]
    rounds = [list(baselines.BASELINES)] + [[f"random:{k}"] for k in range(args.random)]
    if args.rerun_failed:
        failed = [r for r in _latest(_read(args.rerun_failed)) if not r["ok"]]
        cases = sorted({(r["model"], r["mesh"]) for r in failed})
        rounds = [[r["which"]] for r in failed]
        wanted = {(r["model"], r["mesh"], r["which"]) for r in failed}
    start = time.perf_counter()
    model_cache: dict = {}
    built: dict = {}
    records = []
    sink = open(args.jsonl, "a") if args.jsonl else None
    stopped = False
    for whichs in rounds:
        for which in whichs:
            for n, m in cases:
                if args.budget_s and time.perf_counter() - start > args.budget_s:
                    stopped = True
                    break
                if args.rerun_failed and (n, m, which) not in wanted:
                    continue
                if (n, m) not in built:
                    built[(n, m)] = Case(n, m, model_cache)
                rec = built[(n, m)].run(which, args.seed)
                records.append(rec)
                if sink:
                    sink.write(json.dumps(rec) + "\n")
                    sink.flush()
                flag = "ok  " if rec["ok"] else "FAIL"
                print(f"{flag} {n:12s} {m:4s} {which:14s} {rec.get('strategy', ''):32s} "
                      f"abs {rec.get('max_abs', float('nan')):.2e} rel {rec.get('max_rel', float('nan')):.2e}"
                      f" {rec['seconds']:.1f}s" + ("" if rec["ok"] else
                                                   f"  {rec.get('error') or rec['mismatches'][:3]}"),
                      flush=True)
            if stopped:
                break
        if stopped:
            break
    if stopped:
        print(f"budget of {args.budget_s:.0f} s reached; stopped", flush=True)
    return records


def _read(paths) -> list[dict]:
    paths = [paths] if isinstance(paths, str) else paths
    return [json.loads(line) for f in paths for line in open(f) if line.strip()]


def _latest(records: list[dict]) -> list[dict]:
    """One record per (model, mesh, strategy): the last one (a rerun replaces the first run)."""
    last = {(r["model"], r["mesh"], r["which"]): r for r in records}
    return list(last.values())


def table(records: list[dict]) -> str:
    """Markdown table: one row per (model, mesh)."""
    rows: dict = {}
    for r in records:
        rows.setdefault((r["model"], r["mesh"]), []).append(r)
    lines = ["| model | mesh | baselines run | random run | max abs err | max rel err | failures | "
             "s / strategy |",
             "|---|---|---|---|---|---|---|---|"]
    for (model, mesh), rs in sorted(rows.items()):
        base = sum(1 for r in rs if not r["which"].startswith("random:"))
        rand = sum(1 for r in rs if r["which"].startswith("random:"))
        ok = [r for r in rs if "max_abs" in r]
        fails = [r for r in rs if not r["ok"]]
        abs_ = max((r["max_abs"] for r in ok), default=float("nan"))
        rel = max((r["max_rel"] for r in ok), default=float("nan"))
        sec = sum(r["seconds"] for r in rs) / len(rs)
        fail = ", ".join(f"{r['which']}" for r in fails) if fails else "0"
        lines.append(f"| {model} | {mesh} | {base} | {rand} | {abs_:.2e} | {rel:.2e} | {fail} | {sec:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--random", type=int, default=50, help="random strategies per (model, mesh)")
    p.add_argument("--models", nargs="*", default=None)
    p.add_argument("--meshes", nargs="*", default=sorted(MESHES), choices=sorted(MESHES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=0.0, help="stop starting strategies after this")
    p.add_argument("--part", default="0/1", help="i/k: run every k-th case starting at i")
    p.add_argument("--jsonl", default=None, help="append one JSON record per strategy run")
    p.add_argument("--report", nargs="*", default=None, help="only tabulate these jsonl files")
    p.add_argument("--markdown", default=None, help="write the table (and failures) here")
    p.add_argument("--rerun-failed", default=None, metavar="JSONL",
                   help="run only the strategies that failed in this jsonl file")
    args = p.parse_args(argv)
    if args.report is not None:
        records = _latest(_read(args.report))
    else:
        records = run(args)
    text = table(records)
    print(text)
    fails = [r for r in records if not r["ok"]]
    for r in fails:
        print(json.dumps(r))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
