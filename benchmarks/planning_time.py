"""Planning time at scale: trace and search one zoo model on every device of a topology preset.

Usage: python benchmarks/planning_time.py gpt2 xl 8x8-a100-ib 45
       (model, size, preset, search budget in seconds)

The search is pure (simulator only), so presets with more devices than this machine has work.
"""
from __future__ import annotations

import sys
import time

import tag_jax
from tag_jax import models
from tag_jax.cost.simulate import USABLE_MEMORY
from tag_jax.search.planner import search


def main(name: str, size: str, preset: str, budget: float) -> None:
    ex = models.get(name, size)
    t0 = time.perf_counter()
    graph = tag_jax.trace(ex.step, ex.state, ex.batch)
    trace_s = time.perf_counter() - t0
    topo = tag_jax.Topology.preset(preset)
    ids = list(range(topo.num_devices))
    limit = USABLE_MEMORY * min(topo.device_memory(i) for i in ids)
    t0 = time.perf_counter()
    r = search(graph, topo, ids, time_budget_s=budget, memory_limit=limit, progress=True)
    plan_s = time.perf_counter() - t0
    dp = min(v for k, v in r.seeds.items() if k.startswith("data_parallel"))
    print(f"{name}-{size} on {preset} ({topo.num_devices} devices): {len(graph.ops):,} ops; "
          f"trace {trace_s:.1f} s, search {plan_s:.1f} s ({r.evaluations:,} evaluations); "
          f"tag_jax {r.cost.step_time_s:.4f} s/step vs data parallel {dp:.4f} s, best seed "
          f"{min(r.seeds.values()):.4f} s; mesh {r.strategy.mesh.axes}")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
