"""Layers under nn.scan vs unrolled: the same model planned both ways (simulator only).

Usage: python benchmarks/scanned_layers.py [--sizes small,medium] [--topologies 2x4-v100-25gbe]
                                           [--budget 7] [--out benchmarks/SCANNED.md]

A scan's options carry a split through its body with no communication inside it
(`tag_jax/rules/loops.py`); per-layer gathers (FSDP inside the loop) are not options, so the
scanned model may trail the unrolled one where FSDP or Megatron wins. Each row: tag_jax's plan
and data parallel's, predicted step time and peak memory per device, and planning time
(tracing included). "no plan fits" is the planner's answer where nothing fits the memory limit.
"""
from __future__ import annotations

import argparse
import time

import jax

import tag_jax
from tag_jax import models
from tag_jax.search.planner import PlanningError


def _row(size: str, preset: str, scan: bool, budget: float) -> str:
    ex = models.get("gpt2", size, scan_layers=scan)
    topo = tag_jax.Topology.preset(preset)
    devices = jax.devices()[:topo.num_devices]
    t0 = time.perf_counter()
    try:
        plan = tag_jax.auto_shard(ex.step, devices, topology=topo, time_budget_s=budget).plan(ex.state, ex.batch)
        mine = f"{plan.cost.step_time_s:.4f} | {plan.cost.peak_memory_bytes / 2**30:.2f} | {plan.strategy.name}"
    except PlanningError as exc:
        mine = f"- | - | no plan fits ({str(exc)[:60]}...)"
    planned = time.perf_counter() - t0
    mesh = jax.make_mesh((len(devices),), ("devices",), devices=devices)
    dp = tag_jax.baselines.data_parallel(ex.step, mesh, topology=topo).plan(ex.state, ex.batch).cost
    return (f"| gpt2-{size} | {preset} | {'scan' if scan else 'unrolled'} | {mine} | "
            f"{dp.step_time_s:.4f} | {dp.peak_memory_bytes / 2**30:.2f} | {planned:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="small")
    ap.add_argument("--topologies", default="2x4-v100-25gbe")
    ap.add_argument("--budget", type=float, default=7.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lines = ["| model | topology | layers | tag_jax step s | peak GiB | plan | DP step s | DP peak GiB | planning s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size in args.sizes.split(","):
        for preset in args.topologies.split(","):
            for scan in (False, True):
                lines.append(_row(size, preset, scan, args.budget))
                print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Scanned vs unrolled layers (simulator)\n\n")
            f.write(f"Command: `python benchmarks/scanned_layers.py --sizes {args.sizes} --topologies "
                    f"{args.topologies} --budget {args.budget:g} --out {args.out}`\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
