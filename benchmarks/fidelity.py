"""Does the simulator predict what XLA compiles? Baseline plans at real size, compile only.

Usage: python benchmarks/fidelity.py [--models gpt2:small,bert:base] [--topology 2x4-v100-25gbe]
                                     [--plans data_parallel,fsdp,megatron,tag_jax] [--budget 7]
                                     [--constrain operands|results] [--out benchmarks/FIDELITY.md]

`--constrain operands` (the default here) compiles the program emitted with
`Plan.jit(constrain="operands")`, which also pins the operand layouts each op's strategy wants, so the
program does what the strategy says; `--constrain results` compiles the default program
(`Plan.jit()`), where GSPMD may pick other operand layouts (see tag_jax/emit/program.py).

For every (model, plan), the plan's predicted per-device collective bytes (per kind) are compared with
the collectives parsed from the compiled HLO (`tag_jax.hlo.collectives`; XLA:CPU's all-reduce + 1/n
dynamic-slice counts as a reduce-scatter), and predicted per-device peak memory with
`memory_analysis()`. Runs on 8 simulated CPU devices; nothing is allocated.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402

import tag_jax  # noqa: E402
from tag_jax import baselines, models  # noqa: E402
from tag_jax.hlo import collective_bytes_by_kind, collectives, compiled_memory  # noqa: E402

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DEFAULT_CASES = ("mlp:real,gpt2:small,bert:base,vit:b16,resnet:50,vgg:19,moe:base,t5:base,"
                 "recommender:real")


def _ratio(pred: float, real: float) -> str:
    if real == 0 and pred == 0:
        return "="
    return f"{pred / real:.3f}" if real else "inf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_CASES)
    ap.add_argument("--topology", default="2x4-v100-25gbe")
    ap.add_argument("--plans", default="data_parallel,fsdp,megatron,tag_jax",
                    help="baselines and/or tag_jax (auto_shard's plan)")
    ap.add_argument("--budget", type=float, default=7.0, help="auto_shard's search budget, seconds")
    ap.add_argument("--out", default=None)
    ap.add_argument("--constrain", default="operands", choices=("operands", "results"))
    args = ap.parse_args()
    topo = tag_jax.Topology.preset(args.topology)
    mesh = jax.make_mesh((8,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))
    header = ("| model | plan | kind | predicted B | compiled B | ratio |")
    lines = [header, "|---|---|---|---|---|---|"]
    print(header, flush=True)
    worst = []
    for case in args.models.split(","):
        name, size = case.split(":")
        ex = models.get(name, size)
        for plan_name in args.plans.split(","):
            if plan_name == "tag_jax":  # the planner's own choice, as auto_shard returns it
                planner = tag_jax.auto_shard(ex.step, mesh, topology=topo, time_budget_s=args.budget)
            else:
                planner = getattr(baselines, plan_name)(ex.step, mesh, topology=topo)
            t0 = time.perf_counter()
            plan = planner.plan(ex.state, ex.batch)
            plan_s = time.perf_counter() - t0
            constrain = "operands" if args.constrain == "operands" else True
            compiled = plan.jit(constrain=constrain).lower(ex.state, ex.batch).compile()
            real = collective_bytes_by_kind(collectives(compiled))
            pred = plan.cost.comm_bytes_by_kind
            rows = [(k, pred.get(k, 0), real.get(k, 0)) for k in KINDS if pred.get(k, 0) or real.get(k, 0)]
            mem_pred, mem_real = plan.cost.peak_memory_bytes, compiled_memory(compiled)["peak"]
            rows.append(("peak memory", mem_pred, mem_real))
            for kind, p, r in rows:
                line = f"| {name}-{size} | {plan_name} | {kind} | {p:,.0f} | {r:,.0f} | {_ratio(p, r)} |"
                lines.append(line)
                print(line, flush=True)
                if r:
                    worst.append((abs(p / r - 1), f"{name}-{size} {plan_name} {kind}: {_ratio(p, r)}"))
            print(f"  (planned in {plan_s:.2f} s)", flush=True)
    worst.sort(reverse=True)
    summary = ["", "Worst cases:"] + [f"- {w}" for _, w in worst[:10]]
    print("\n".join(summary))
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Simulator fidelity: predicted vs compiled (topology {args.topology}, 8 CPU devices)\n\n"
                    f"Command: `python benchmarks/fidelity.py --plans {args.plans} --budget {args.budget} "
                    f"--constrain {args.constrain} --out {args.out}`\n\n")
            f.write("\n".join(lines + summary) + "\n")


if __name__ == "__main__":
    main()
