"""Planning time at scale: trace and search zoo models on every device of topology presets.

Usage: python benchmarks/planning_time.py gpt2 xl 8x8-a100-ib 45
       (one case: model, size, preset, search budget in seconds)
       python benchmarks/planning_time.py --cases gpt2:small:1x8-a100-nvlink:7,gpt2:xl:8x8-a100-ib:45
                                         [--out benchmarks/PLANNING.md]

The search is pure (simulator only), so presets with more devices than this machine has work. It
is anytime and bounded by its budget, so the table says when it got where: `seeded s` is when
every baseline seed (and the ILP and the policy's) was priced, the first full plan; `last gain s`
when it last improved on the best; `search s` its whole wall time (the budget, plus the last
step's overshoot). Evaluations are full or incremental simulator pricings.
"""
from __future__ import annotations

import argparse
import math
import time

import tag_jax
from tag_jax import models
from tag_jax.cost.simulate import USABLE_MEMORY
from tag_jax.search.planner import PlanningError, search

CASES = ("gpt2:small:1x8-a100-nvlink:7,gpt2:medium:1x8-a100-nvlink:7,gpt2:large:1x8-a100-nvlink:7,"
         "gpt2:xl:1x8-a100-nvlink:7,gpt2:small:8x8-a100-ib:45,gpt2:xl:8x8-a100-ib:45,"
         "gpt2:small:32x8-h100-ib:60")


def run(name: str, size: str, preset: str, budget: float) -> dict:
    ex = models.get(name, size)
    t0 = time.perf_counter()
    graph = tag_jax.trace(ex.step, ex.state, ex.batch)
    trace_s = time.perf_counter() - t0
    topo = tag_jax.Topology.preset(preset)
    ids = list(range(topo.num_devices))
    t0 = time.perf_counter()
    try:
        r = search(graph, topo, ids, time_budget_s=budget, memory_fraction=USABLE_MEMORY, progress=True)
    except PlanningError as exc:  # a finding too: how long it took to say so
        return dict(case=f"{name}-{size}", preset=preset, devices=topo.num_devices, ops=len(graph.ops),
                    trace_s=trace_s, plan_s=time.perf_counter() - t0, budget=budget, error=str(exc))
    plan_s = time.perf_counter() - t0
    dp = min((v for k, v in r.seeds.items() if k.startswith("data_parallel")), default=math.nan)
    return dict(case=f"{name}-{size}", preset=preset, devices=topo.num_devices, ops=len(graph.ops),
                trace_s=trace_s, seeded_s=r.history[0][0] if r.history else math.nan,
                gain_s=r.history[-1][0] if r.history else math.nan, plan_s=plan_s, budget=budget,
                evals=r.evaluations, step=r.cost.step_time_s, dp=dp, best_seed=min(r.seeds.values()),
                mesh=",".join(f"{a}={n}" for a, n in r.strategy.mesh.axes.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("one", nargs="*", help="model size preset budget (one case)")
    ap.add_argument("--cases", default=None, help=f"model:size:preset:budget,... (default {CASES})")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.one:
        if len(args.one) != 4:
            ap.error("one case is: model size preset budget")
        cases = [tuple(args.one)]
    else:
        cases = [tuple(c.split(":")) for c in (args.cases or CASES).split(",")]
    header = ("| model | preset | devices | ops | trace s | seeded s | last gain s | search s | budget s | "
              "evaluations | step s | vs DP | vs best seed | mesh |")
    lines = [header, "|" + "---|" * 14]
    print(header, flush=True)
    for name, size, preset, budget in cases:
        r = run(name, size, preset, float(budget))
        if "error" in r:
            line = (f"| {r['case']} | {r['preset']} | {r['devices']} | {r['ops']:,} | {r['trace_s']:.1f} | "
                    f"- | - | {r['plan_s']:.1f} | {r['budget']:g} | {r['error'][:150]}… |" + " |" * 4)
            lines.append(line)
            print(line, flush=True)
            continue
        line = (f"| {r['case']} | {r['preset']} | {r['devices']} | {r['ops']:,} | {r['trace_s']:.1f} | "
                f"{r['seeded_s']:.1f} | {r['gain_s']:.1f} | {r['plan_s']:.1f} | {r['budget']:g} | "
                f"{r['evals']:,} | {r['step']:.4f} | {r['dp'] / r['step']:.2f}x | "
                f"{r['best_seed'] / r['step']:.3f}x | {r['mesh']} |")
        lines.append(line)
        print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Planning time at scale (search on this 2-core machine, simulator only)\n\n"
                    f"Command: `python benchmarks/planning_time.py --cases "
                    f"{','.join(':'.join(c) for c in cases)} --out {args.out}`\n\n" + __doc__.split("\n\n")[2]
                    + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
