"""The planner: seeds from hand-written plans on every candidate mesh, then anneals the best ones.

`search(graph, topology, device_ids, ...)` returns the best strategy found within `time_budget_s`.
It never returns a plan the simulator prices worse than a baseline on the meshes it considered,
because the baselines are its seeds.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Sequence

import numpy as np

from tag_jax.hlo.graph import OpGraph
from tag_jax.search.anneal import (Annealer, SearchResult, anneal_ops, candidate_meshes,
                                   device_orders)
from tag_jax.strategy import MeshSpec, Strategy, TensorSharding

SEED_PLANS = ("data_parallel", "fsdp", "megatron")
ILP_SHARE = 0.25  # of the time budget, for the ILP seed on the first mesh (skipped under 0.5 s)


class PlanningError(ValueError):
    """No plan satisfies the request; the message says what was closest."""


def search(graph: OpGraph, topology, device_ids: Sequence[int], *, mesh_shape: tuple[int, ...] | None = None,
           axis_names: tuple[str, ...] | None = None, time_budget_s: float = 10.0,
           memory_limit: float | None = None, seed: int = 0, progress: bool = False,
           permute: bool = True, policy=None) -> SearchResult:
    """`policy` (a `tag_jax.policy.Policy`, or None for an unguided search) adds its plan on every
    seeded mesh as one more seed and biases the annealing moves; with `time_budget_s <= 0` its plan
    is returned alone (one simulator evaluation), when it fits in memory."""
    from tag_jax import rules
    from tag_jax.baselines import baseline_strategy
    from tag_jax.cost import Simulator
    from tag_jax.search.propagate import carried_outputs

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    if not device_ids:
        raise PlanningError("the mesh has no devices; pass a Mesh or a list of jax devices")
    meshes = candidate_meshes(device_ids, topology, mesh_shape, axis_names, permute)
    if policy is not None and time_budget_s <= 0:
        from tag_jax.policy.guide import policy_plan

        alone = policy_plan(policy, graph, topology, meshes, memory_limit)
        if alone is not None:
            return alone
    carried = carried_outputs(graph)
    has_1d = any(len(m.shape) == 1 for m in meshes)
    strategies_by_axes: dict[tuple, tuple] = {}
    seeds: dict[str, float] = {}
    scored = []  # (score, name, cost, strategy, annealer, start decision)
    history = []
    for mesh in meshes:
        if scored and time.perf_counter() - t0 > 0.4 * time_budget_s:
            break  # keep time to improve what we have
        key = tuple(mesh.axes.items())
        if key not in strategies_by_axes:
            strategies_by_axes[key] = rules.for_graph(graph, mesh.axes)
        ops = strategies_by_axes[key]
        sim = Simulator(graph, ops, topology, mesh, carried=carried)
        ann = Annealer(graph, ops, sim, mesh, memory_limit)
        label = _mesh_label(mesh)
        for kind in SEED_PLANS:
            # Data parallel and FSDP use every axis alike: one mesh shape says all about them.
            if kind == "megatron" and len(mesh.shape) != 2:
                continue
            if kind != "megatron" and len(mesh.shape) == 2 and has_1d:
                continue
            strategy = baseline_strategy(kind, graph, ops, mesh)
            cost = sim.cost(strategy)
            score = _score(cost, memory_limit)
            seeds[f"{kind} {label}"] = cost.step_time_s
            scored.append((score, f"{kind} {label}", cost, strategy, ann, _start(ann, kind)))
        if len(scored) == len(seeds) and not any(n.startswith("replicated") for n in seeds):
            # Every device computing everything: no communication at all, which wins for small
            # models on slow links (and any plan the annealer finds from it is priced alike).
            strategy = replicated_strategy(graph, mesh)
            cost = sim.cost(strategy)
            seeds[f"replicated {label}"] = cost.step_time_s
            scored.append((_score(cost, memory_limit), f"replicated {label}", cost, strategy, ann,
                           tuple([0] * len(ann.groups) + [0])))
        if progress:
            _say(f"seeded {label}: best {min(s[0] for s in scored):.4g} s", t0)
    if ILP_SHARE * time_budget_s >= 0.5:
        _add_ilp_seed(graph, topology, scored, seeds, ILP_SHARE * time_budget_s, memory_limit)
        if progress:
            _say(f"ILP seed: best {min(s[0] for s in scored):.4g} s", t0)
    if policy is not None and time.perf_counter() - t0 < 0.6 * time_budget_s:
        _add_policy_seeds(policy, graph, topology, scored, seeds)
        if progress:
            _say(f"policy seeds: best {min(s[0] for s in scored):.4g} s", t0)
    scored.sort(key=lambda s: s[0])
    best_score, best_name, best_cost, best_strategy = scored[0][:4]
    decisions = {}
    history.append((time.perf_counter() - t0, best_score))
    seed_seconds = (time.perf_counter() - t0) / max(len(scored), 1)
    # Improve the best seed of each of the two most promising meshes, sharing what is left:
    # argument-sharding annealing where re-propagating is cheap enough to try many candidates,
    # then op-option annealing with incremental pricing.
    tops, seen = [], set()
    for s in scored:
        # The baselines pick the meshes (a policy seed may only replace the start on its mesh):
        # the policy's mesh ranking is its weakest output, and a wrong one would cost a mesh.
        if s[4].mesh not in seen and math.isfinite(s[0]) and not s[1].startswith("policy"):
            seen.add(s[4].mesh)
            tops.append(next(t for t in scored if t[4] is s[4]))
        if len(tops) == 2:
            break
    evaluations = len(scored)
    for i, (score0, name, cost0, strategy0, ann, start) in enumerate(tops):
        remaining = time_budget_s - (time.perf_counter() - t0)
        if remaining <= 0:
            break
        deadline = time.perf_counter() + remaining / (len(tops) - i)
        score, cost, strategy = score0, cost0, strategy0
        if remaining / (len(tops) - i) > 40 * seed_seconds:
            def improved(value: float, _name=name) -> None:
                history.append((time.perf_counter() - t0, value))
                if progress:
                    _say(f"annealing shardings from {_name}: {value:.4g} s", t0)

            half = time.perf_counter() + (deadline - time.perf_counter()) / 2
            s2, c2, st2, decision = ann.run(start, half, rng, improved)
            evaluations += ann.evaluations
            if s2 < score:
                score, cost, strategy = s2, c2, st2
                decisions = {g.key: g.options[k] for g, k in zip(ann.groups, decision)}
        strategy, cost, moves = anneal_ops(ann.sim, strategy, deadline, rng, memory_limit=memory_limit)
        evaluations += moves
        score = _score(cost, memory_limit)
        if permute:  # device assignment: the same plan on other orders of the same devices
            for order in device_orders(ann.mesh, topology):
                moved = dataclasses.replace(strategy, mesh=order)
                c = ann.sim.with_mesh(order).cost(moved)
                evaluations += 1
                if _score(c, memory_limit) < score:
                    strategy, cost, score = moved, c, _score(c, memory_limit)
        if progress:
            _say(f"annealed ops from {name}: {score:.4g} s ({moves} moves)", t0)
        if score < best_score:
            best_score, best_cost, best_strategy = score, cost, strategy
            best_name = f"annealed from {name}"
            history.append((time.perf_counter() - t0, best_score))
    if not math.isfinite(best_score):
        from tag_jax.plan import _bytes

        largest = max((graph.tensors[t] for t in graph.inputs), key=lambda t: t.nbytes)
        least = min(s[2].peak_memory_bytes for s in scored)
        raise PlanningError(
            f"no plan fits the memory limit of {_bytes(memory_limit)} per device: the best reached "
            f"{_bytes(least)} (largest tensor {largest.describe()}, {_bytes(largest.nbytes)}); "
            "use more devices, a smaller batch, or a larger memory_limit")
    best_strategy = dataclasses.replace(best_strategy, name=f"tag_jax ({best_name})")
    return SearchResult(strategy=best_strategy, cost=best_cost, evaluations=evaluations,
                        seconds=time.perf_counter() - t0, seeds=seeds, decisions=decisions,
                        history=tuple(history))


def _add_ilp_seed(graph: OpGraph, topology, scored: list, seeds: dict, time_limit_s: float,
                  memory_limit: float | None) -> None:
    """The Alpa-style ILP's plan (tag_jax.search.ilp) on the first seeded mesh joins the seeds: over
    the same options it often beats the baselines by far (benchmarks/RESULTS.md), and annealing
    can still improve it. Time-limited; no seed when nothing fits."""
    from tag_jax.search.ilp import ilp_strategy

    ann = scored[0][4]
    try:
        strategy, _ = ilp_strategy(graph, ann.op_strategies, topology, ann.mesh,
                                   time_limit_s=time_limit_s, memory_limit=memory_limit)
    except PlanningError:
        return
    cost = ann.sim.cost(strategy)
    name = f"ilp {_mesh_label(ann.mesh)}"
    seeds[name] = cost.step_time_s
    scored.append((_score(cost, memory_limit), name, cost, strategy, ann, _start(ann, "data_parallel")))


def _add_policy_seeds(policy, graph: OpGraph, topology, scored: list, seeds: dict) -> None:
    """The policy's plan on each seeded mesh joins the seeds; its scores become the move prior."""
    from tag_jax.policy.features import Context

    anns = list({id(s[4]): s[4] for s in scored}.values())
    guides = policy.guide(graph, topology, [a.mesh for a in anns],
                          [Context(a.groups, a.batch_sets) for a in anns])
    for ann, g in zip(anns, guides):
        ann.prior = g.prior
        score, cost, strategy = ann.evaluate(g.decision)
        name = f"policy {_mesh_label(ann.mesh)}"
        seeds[name] = cost.step_time_s
        scored.append((score, name, cost, strategy, ann, g.decision))


def replicated_strategy(graph: OpGraph, mesh: MeshSpec) -> Strategy:
    """Every argument replicated and every op's option 0 (full replication, always valid)."""
    return Strategy(mesh, (0,) * len(graph.ops),
                    tuple(TensorSharding.replicated(len(graph.tensors[t].shape)) for t in graph.inputs),
                    name="replicated")


def _start(ann: Annealer, kind: str) -> tuple[int, ...]:
    """The decision vector that reproduces a baseline's argument shardings (approximately)."""
    full = len(ann.batch_sets) - 1  # the largest axis set that divides the batch
    decision = []
    for g in ann.groups:
        k = 0
        if kind == "fsdp":
            sized = [(g.shape[o.dim], -j) for j, o in enumerate(g.options)
                     if o.dim is not None and o.gather and len(o.axes) == len(ann.mesh.axis_names)]
            if sized:
                k = -max(sized)[1]
        decision.append(k)
    batch = full
    if kind == "megatron" and "data" in ann.mesh.axis_names:
        batch = next((i for i, s in enumerate(ann.batch_sets) if s == ("data",)), full)
    return tuple(decision + [batch])


def _score(cost, memory_limit: float | None) -> float:
    if memory_limit is not None and cost.peak_memory_bytes > memory_limit:
        return math.inf
    return cost.step_time_s


def _mesh_label(mesh: MeshSpec) -> str:
    order = "" if list(mesh.device_ids) == sorted(mesh.device_ids) else " permuted"
    return "(" + ",".join(f"{n}={s}" for n, s in mesh.axes.items()) + ")" + order


def _say(msg: str, t0: float) -> None:
    print(f"[tag_jax {time.perf_counter() - t0:6.2f} s] {msg}", file=sys.stderr, flush=True)
