"""The teacher: what the planner's whole search finds on each candidate mesh of one (graph, topology).

`search_labels` runs `search.planner.search` restricted to one mesh at a time (its seeds, the ILP,
argument annealing, op-option annealing; no device re-ordering), so that one problem yields a label
on every mesh: the final plan's option for every op, its argument shardings as a decision vector
(one option per parameter group plus the batch), its predicted step time, and data parallel's for
reference. The labels are the plan the search returns, both stages, not only its first.
`seed_times` prices the hand-written seeds on every mesh: the ranking head's labels.
"""
from __future__ import annotations

import math

from tag_jax.hlo.graph import OpGraph, Role


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


def project(graph: OpGraph, op_strategies, groups, batch_sets, strategy) -> tuple[int, ...]:
    """The decision vector closest to a strategy's argument shardings: per group the option that
    stores its parameter as the strategy does (gathered at use when the ops reading the parameter
    want it whole although it is stored split), and the batch's axis set."""
    storage = dict(zip(graph.inputs, strategy.input_shardings))
    readers: dict[int, list] = {}
    for op in graph.ops:
        for pos, t in enumerate(op.inputs):
            readers.setdefault(t, []).append((op.id, pos))
    out = []
    for g in groups:
        lead = g.tensors[0]
        nd = len(graph.tensors[lead].shape)
        want = storage[lead].without_partial()
        used = [op_strategies[o][strategy.choices[o]].inputs[p] for o, p in readers.get(lead, ())]
        whole = bool(used) and all(u.is_replicated() for u in used) and not want.is_replicated()
        match = [k for k, o in enumerate(g.options) if o.storage(nd) == want]
        pick = next((k for k in match if g.options[k].gather == whole), match[0] if match else 0)
        out.append(pick)
    batch = [t for t in graph.inputs if graph.tensors[t].role == Role.BATCH and graph.tensors[t].shape]
    axes = storage[batch[0]].dims[0] if batch else ()
    out.append(batch_sets.index(axes) if axes in batch_sets else len(batch_sets) - 1)
    return tuple(out)


def search_labels(graph: OpGraph, topology, budget_s: float, seed: int = 0) -> list[dict]:
    """Per candidate mesh (the planner's: on mixed clusters also meshes of the faster devices
    only), the planner's plan on that mesh alone (`budget_s` seconds each):
    {"shape", "axis_names", "device_ids", "decision", "choices" (one option index per op), "score",
    "dp", "source" (which seed it came from)}; score is infinite where nothing fits in memory."""
    from tag_jax import rules
    from tag_jax.cost.simulate import USABLE_MEMORY
    from tag_jax.search.anneal import batch_options, candidate_meshes, param_groups
    from tag_jax.search.planner import PlanningError, search

    limit = USABLE_MEMORY * min(d.memory for d in topology.devices)
    out = []
    for mesh in candidate_meshes(topology.ids, topology, leave_out=True):
        rec = {"shape": list(mesh.shape), "axis_names": list(mesh.axis_names),
               "device_ids": list(mesh.device_ids)}
        try:
            r = search(graph, topology, list(mesh.device_ids), mesh_shape=mesh.shape,
                       axis_names=mesh.axis_names, time_budget_s=budget_s, memory_limit=limit,
                       seed=seed, permute=False)
        except PlanningError:
            out.append(dict(rec, decision=[], choices=[], score=math.inf, dp=math.inf, source=""))
            continue
        decision = project(graph, rules.for_graph(graph, mesh.axes), param_groups(graph, mesh),
                           batch_options(graph, mesh), r.strategy)
        dp = next((v for k, v in r.seeds.items() if k.startswith("data_parallel")), math.inf)
        out.append(dict(rec, decision=[int(x) for x in decision],
                        choices=[int(x) for x in r.strategy.choices], score=float(r.cost.step_time_s),
                        dp=float(dp), source=r.strategy.name))
    return out


def seed_strategy(kind: str, graph: OpGraph, op_strategies, mesh, simulator,
                  memory_limit: float | None):
    """One seed of `features.RANK_KINDS` on `mesh`, built as the search builds it."""
    from tag_jax.baselines import baseline_strategy
    from tag_jax.search.planner import replicated_strategy

    if kind == "replicated":
        return replicated_strategy(graph, mesh)
    return baseline_strategy(kind, graph, op_strategies, mesh, simulator=simulator,
                             memory_limit=memory_limit)


def seed_times(graph: OpGraph, topology, meshes, cands, memory_limit: float | None) -> list[float]:
    """Predicted step time of each (mesh index, kind) seed of `cands` (`features.seed_candidates`),
    built as the search builds it (`baselines.baseline_strategy`, the faster of its two readings);
    infinite where it does not fit in `memory_limit`."""
    from tag_jax import rules
    from tag_jax.cost import Simulator
    from tag_jax.search.propagate import carried_outputs

    carried = carried_outputs(graph)
    ops_by_axes, sims, out = {}, {}, []
    for k, kind in cands:
        mesh = meshes[k]
        key = tuple(mesh.axes.items())
        if key not in ops_by_axes:
            ops_by_axes[key] = rules.for_graph(graph, mesh.axes)
        if k not in sims:
            sims[k] = Simulator(graph, ops_by_axes[key], topology, mesh, carried=carried)
        strategy = seed_strategy(kind, graph, ops_by_axes[key], mesh, sims[k], memory_limit)
        cost = sims[k].cost(strategy)
        fits = memory_limit is None or cost.peak_memory_bytes <= memory_limit
        out.append(float(cost.step_time_s) if fits else math.inf)
    return out
