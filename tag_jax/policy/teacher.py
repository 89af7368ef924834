"""The teacher: what the search finds on each candidate mesh of one (graph, topology).

The same machinery as `search.planner.search` (candidate meshes, the baseline starting vectors,
`Annealer.run`), kept per mesh so that one problem yields a label on every mesh: the best decision
vector found there, its predicted step time, and data parallel's for reference.
"""
from __future__ import annotations

import time

import numpy as np

from tag_jax.hlo.graph import OpGraph


def mesh_problem(graph: OpGraph, topology, mesh, memory_limit: float | None = None):
    """(Annealer, starting vectors by baseline name) for one mesh."""
    from tag_jax import rules
    from tag_jax.cost import Simulator
    from tag_jax.search.anneal import Annealer
    from tag_jax.search.planner import _start
    from tag_jax.search.propagate import carried_outputs

    ops = rules.for_graph(graph, mesh.axes)
    sim = Simulator(graph, ops, topology, mesh, carried=carried_outputs(graph))
    ann = Annealer(graph, ops, sim, mesh, memory_limit)
    kinds = ("data_parallel", "fsdp") + (("megatron",) if len(mesh.shape) == 2 else ())
    return ann, {k: _start(ann, k) for k in kinds}


def search_labels(graph: OpGraph, topology, budget_s: float, seed: int = 0) -> list[dict]:
    """Per candidate mesh: {"shape", "axis_names", "device_ids", "decision", "score", "dp", "evals"}."""
    from tag_jax.cost.simulate import USABLE_MEMORY
    from tag_jax.search.anneal import candidate_meshes

    limit = USABLE_MEMORY * min(d.memory for d in topology.devices)
    rng = np.random.default_rng(seed)
    meshes = candidate_meshes(topology.ids, topology)
    out = []
    for k, mesh in enumerate(meshes):
        ann, starts = mesh_problem(graph, topology, mesh, limit)
        scored = sorted((ann.evaluate(s)[0], name, s) for name, s in starts.items())
        dp = ann.evaluate(starts["data_parallel"])[0]
        deadline = time.perf_counter() + budget_s / len(meshes)
        score, _, _, decision = ann.run(scored[0][2], deadline, rng, lambda v: None)
        out.append({"shape": list(mesh.shape), "axis_names": list(mesh.axis_names),
                    "device_ids": list(mesh.device_ids), "decision": [int(x) for x in decision],
                    "score": float(score), "dp": float(dp), "evals": ann.evaluations})
    return out
