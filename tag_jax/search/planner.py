"""The planner: seeds from hand-written plans on every candidate mesh, then anneals the best ones.

`search(graph, topology, device_ids, ...)` returns the best strategy found within `time_budget_s`.
It never returns a plan the simulator prices worse than a seed, on the meshes it considered.

Order of work: the first mesh's baselines, and Megatron on every 2-D mesh of all the devices
where that is affordable (estimated from the op count); the Alpa-style ILP on the first mesh
(`_ilp_seed`; most models solve to optimality in about a second, and where they do not its plan is
the one the annealer is least likely to reach); the other meshes' baselines (Megatron on at least
one 2-D mesh while three quarters of the budget are left, and on the further 2-D meshes while
seeding one still ends before then) and, for small graphs, the 2-D tensor-parallel plan
(`two_d_strategy`); the policy's plans; then annealing on the two most promising meshes: argument
shardings from the best seed with a decision vector, and op options from that result and from the
best seed the decision vector cannot express (ILP, 2-D) each.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Sequence

import numpy as np

from tag_jax.hlo.graph import OpGraph, Role
from tag_jax.search.anneal import (Annealer, SearchResult, anneal_ops, candidate_meshes,
                                   device_orders)
from tag_jax.strategy import MeshSpec, Strategy, TensorSharding

SEED_PLANS = ("data_parallel", "fsdp", "megatron")
ILP_SHARE = 0.5  # of the time budget, at most, for the ILP seed on the first mesh, build included
# (skipped under 0.5 s)
ILP_SHARE_LARGE = 0.75  # the same where one seed costs more than 1/80 of the budget (large graphs)
SEED_SECONDS_PER_OP = 4e-5  # one seed's pricing per op (GPT-2 small: 5,781 ops, ~0.25 s/seed here)
MESH_SEEDS = 5  # seeding a 2-D mesh (rules, simulator, Megatron's two readings) costs ~5 seeds (t5-base: 2.1 s)
POLICY_SECONDS_PER_OP_MESH = 3e-4  # the policy's seeds per op and mesh (GPT-2 small, 2 meshes: ~3.5 s)
SETTLED_WEIGHT = 0.5  # share of a mesh whose best seed is a proven-optimal ILP plan, against 1
TWO_D_OPTIONS = 60_000  # the 2-D seed on graphs with at most this many op options (one propagate)


class PlanningError(ValueError):
    """No plan satisfies the request; the message says what was closest."""


def search(graph: OpGraph, topology, device_ids: Sequence[int], *, mesh_shape: tuple[int, ...] | None = None,
           axis_names: tuple[str, ...] | None = None, time_budget_s: float = 10.0,
           memory_limit: float | None = None, seed: int = 0, progress: bool = False,
           permute: bool = True, policy=None, memory_fraction: float | None = None,
           given=None) -> SearchResult:
    """`policy` (a `tag_jax.policy.Policy`, or None for an unguided search) adds its plan on every
    seeded mesh as one more seed and biases the annealing moves; with `time_budget_s <= 0` its plan
    is returned alone (a few dozen simulator evaluations: `tag_jax.policy.guide.policy_plan`),
    when it fits in memory.

    `memory_limit`: bytes per device for every mesh (None: no limit); or `memory_fraction`: each
    mesh's limit is that fraction of the smallest memory among its own devices (a mesh of only the
    A100s of a mixed cluster may use their 40 GB, not the V100s' 16).

    `given`: the user's own argument PartitionSpecs over `axis_names` (`tag_jax.hand_written`),
    one more seed on the first mesh, so that the result is never slower than the user's plan."""
    if memory_fraction is not None and memory_limit is not None:
        raise ValueError("search: give memory_limit or memory_fraction, not both")

    def limit_of(mesh) -> float | None:
        if memory_fraction is None:
            return memory_limit
        return memory_fraction * min(topology.device_memory(i) for i in mesh.device_ids)

    from tag_jax import rules
    from tag_jax.baselines import baseline_strategy
    from tag_jax.cost import Simulator
    from tag_jax.search.propagate import carried_outputs

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    if not device_ids:
        raise PlanningError("the mesh has no devices; pass a Mesh or a list of jax devices")
    meshes = candidate_meshes(device_ids, topology, mesh_shape, axis_names, permute, leave_out=permute)
    if policy is not None and time_budget_s <= 0:
        from tag_jax.policy.guide import policy_plan

        alone = policy_plan(policy, graph, topology, meshes, limit_of(meshes[0]))
        if alone is not None:
            return alone
    carried = carried_outputs(graph)
    has_1d = any(len(m.shape) == 1 for m in meshes)
    strategies_by_axes: dict[tuple, tuple] = {}
    seeds: dict[str, float] = {}
    # (score, name, cost, strategy, annealer, start decision); the decision is None for seeds the
    # argument annealer cannot express (the ILP's plan, the 2-D tensor-parallel plan)
    scored = []
    history = []
    settled = set()  # seeds that op-option annealing cannot improve: an ILP plan proven optimal
    ilp_spent = None  # seconds the ILP took (None: not tried yet)
    # The ILP (on the first mesh) runs once a 2-D mesh has been seeded too, so that Megatron, a
    # baseline the plan must not lose to, is always among the seeds when there is one, and the
    # first mesh of only the faster devices (mixed clusters: second, `candidate_meshes`); the
    # other such meshes come after it, seeded while under 3/4 of the budget is spent.
    everyone = set(meshes[0].device_ids)
    fewer = [k for k, m in enumerate(meshes) if set(m.device_ids) != everyone]
    ilp_at = 3 if fewer else 2
    # Megatron on every 2-D mesh of all the devices is a hand-written plan the result must not lose
    # to: where seeding them all is affordable (estimated from the op count, so the same on a
    # busier machine), the ILP waits until they are seeded. t5-base on 2x4-v100-25gbe: the ILP
    # (time-limited, 6 s) ran after (4, 2) and left no time for Megatron on (2, 4), 0.388 s
    # against the plan's 0.428 s.
    two_d = [k for k, m in enumerate(meshes) if len(m.shape) == 2 and set(m.device_ids) == everyone]
    if two_d and len(two_d) * MESH_SEEDS * SEED_SECONDS_PER_OP * len(graph.ops) <= 0.5 * time_budget_s:
        ilp_at = max(ilp_at, two_d[-1] + 1)
    replicated_on: set[frozenset] = set()
    for k, mesh in enumerate(meshes):
        if scored and ilp_spent is None and (k >= ilp_at or all(len(m.shape) == 1 for m in meshes)):
            ilp_spent = _ilp_seed(graph, topology, scored, seeds, settled, t0, time_budget_s, progress)
        spent = time.perf_counter() - t0
        wanted = k < ilp_at or k in fewer or (
            len(mesh.shape) == 2 and not any(n.startswith("megatron") for n in seeds))
        # what seeding one mesh has cost so far (the ILP's time left out)
        mesh_s = (spent - (ilp_spent or 0.0)) / max(k, 1)
        if scored and spent > 0.4 * time_budget_s and (spent > 0.75 * time_budget_s or not wanted):
            # keep time to improve what we have (but Megatron, on one 2-D mesh, and the meshes of
            # the faster devices, if it can); Megatron on every other 2-D mesh is a hand-written
            # plan too, which the result must not lose to: it is seeded while that still ends
            # before 3/4 of the budget (moe-base on 2x4-v100-25gbe: Megatron on (2, 4), 0.556 s,
            # beat the plan annealed from (4, 2), 0.602 s, where the ILP had used the time)
            if not (len(mesh.shape) == 2 and spent + mesh_s <= 0.75 * time_budget_s):
                break
        key = tuple(mesh.axes.items())
        if key not in strategies_by_axes:
            strategies_by_axes[key] = rules.for_graph(graph, mesh.axes)
        ops = strategies_by_axes[key]
        sim = Simulator(graph, ops, topology, mesh, carried=carried)
        limit = limit_of(mesh)
        ann = Annealer(graph, ops, sim, mesh, limit)
        label = _mesh_label(mesh)
        for kind in SEED_PLANS:
            # Data parallel and FSDP use every axis alike: one mesh shape says all about them.
            if kind == "megatron" and len(mesh.shape) != 2:
                continue
            if kind != "megatron" and len(mesh.shape) == 2 and has_1d:
                continue
            strategy = baseline_strategy(kind, graph, ops, mesh, simulator=sim, memory_limit=limit)
            cost = sim.cost(strategy)
            score = _score(cost, limit)
            seeds[f"{kind} {label}"] = cost.step_time_s
            scored.append((score, f"{kind} {label}", cost, strategy, ann, _start(ann, kind)))
        if given is not None and k == 0:
            from tag_jax.hand_written import hand_written_strategy

            strategy = hand_written_strategy(graph, ops, mesh, given)
            cost = sim.cost(strategy)
            seeds[f"hand-written {label}"] = cost.step_time_s
            scored.append((_score(cost, limit), f"hand-written {label}", cost, strategy, ann, None))
        if len(mesh.shape) == 2 and sum(map(len, ops)) <= TWO_D_OPTIONS:
            strategy = two_d_strategy(graph, ops, mesh, carried)
            cost = sim.cost(strategy)
            seeds[f"2d {label}"] = cost.step_time_s
            scored.append((_score(cost, limit), f"2d {label}", cost, strategy, ann, None))
        if frozenset(mesh.device_ids) not in replicated_on:
            # Every device computing everything: no communication at all, which wins for small
            # models on slow links (and any plan the annealer finds from it is priced alike);
            # once per set of devices (on the faster devices alone it runs at their pace).
            replicated_on.add(frozenset(mesh.device_ids))
            strategy = replicated_strategy(graph, mesh)
            cost = sim.cost(strategy)
            seeds[f"replicated {label}"] = cost.step_time_s
            scored.append((_score(cost, limit), f"replicated {label}", cost, strategy, ann,
                           tuple([0] * len(ann.groups) + [0])))
        if progress:
            _say(f"seeded {label}: best {min(s[0] for s in scored):.4g} s", t0)
    if ilp_spent is None:  # one mesh only
        ilp_spent = _ilp_seed(graph, topology, scored, seeds, settled, t0, time_budget_s, progress)
    # what one seed cost (the rules, simulator and annealer of its mesh shared among its seeds):
    # the yardstick for whether argument annealing, one propagate and pricing a move, is affordable
    seed_seconds = (time.perf_counter() - t0 - ilp_spent) / max(len(scored), 1)
    # The policy's seeds (features and one network call per mesh, ~0.5 s) whenever the budget
    # allows them, not by the clock, so one seed gives the same seeds on a busier machine; only a
    # budget already spent, or too short for them on this graph (estimated from its size), skips them.
    policy_s = POLICY_SECONDS_PER_OP_MESH * len(graph.ops) * min(2, len({id(s[4]) for s in scored}))
    spent = time.perf_counter() - t0
    if (policy is not None and time_budget_s >= 1.0 and spent < 0.9 * time_budget_s
            and spent + policy_s < time_budget_s):
        _add_policy_seeds(policy, graph, topology, scored, seeds)
        if progress:
            _say(f"policy seeds: best {min(s[0] for s in scored):.4g} s", t0)
    scored.sort(key=lambda s: s[0])
    best_score, best_name, best_cost, best_strategy = scored[0][:4]
    decisions = {}
    history.append((time.perf_counter() - t0, best_score))
    # Improve the two most promising meshes, sharing what is left. On each: argument-sharding
    # annealing from its best seed that has a decision vector, where re-propagating is cheap
    # enough to try many candidates; then op-option annealing with incremental pricing from the
    # better of that and its seed and, when the mesh has a seed the decision vector cannot
    # express (the ILP's plan, the 2-D plan), from the best such seed too, in equal parts: such a
    # seed lies in another basin, which moves from the first would not reach (and annealing the
    # arguments from the ILP's plan would lose what makes it good). The better result counts.
    tops, seen = [], set()
    for s in scored:
        # The baselines pick the meshes (a policy seed may only replace the start on its mesh):
        # the policy's mesh ranking is its weakest output, and a wrong one would cost a mesh.
        if s[4].mesh not in seen and math.isfinite(s[0]) and not s[1].startswith("policy"):
            seen.add(s[4].mesh)
            tops.append([t for t in scored if t[4] is s[4]])
        if len(tops) == 2:
            break
    evaluations = len(scored)
    # a mesh whose best seed is an optimal ILP plan has less to gain: the other gets more time
    weights = [SETTLED_WEIGHT if m[0][1] in settled else 1.0 for m in tops]
    for i, on_mesh in enumerate(tops):
        remaining = time_budget_s - (time.perf_counter() - t0)
        if remaining <= 0:
            break
        share = remaining * weights[i] / sum(weights[i:])
        deadline = time.perf_counter() + share
        ann = on_mesh[0][4]
        first = next(t for t in on_mesh if t[5] is not None)  # the baselines always have one
        other = next((t for t in on_mesh if t[5] is None and math.isfinite(t[0])
                      and t[1] not in settled), None)
        phases = 2 if other is None else 3
        score, name, cost, strategy = first[:4]
        if share > 40 * seed_seconds:
            def improved(value: float, _name=first[1]) -> None:
                history.append((time.perf_counter() - t0, value))
                if progress:
                    _say(f"annealing shardings from {_name}: {value:.4g} s", t0)

            until = time.perf_counter() + (deadline - time.perf_counter()) / phases
            s2, c2, st2, decision = ann.run(first[5], until, rng, improved)
            evaluations += ann.evaluations
            if s2 < score:
                score, cost, strategy = s2, c2, st2
                name = f"{first[1]}, shardings annealed"
                decisions = {g.key: g.options[k] for g, k in zip(ann.groups, decision)}
        starts = [(score, name, cost, strategy)]
        if other is not None:
            starts.append(other[:4])
        results = []
        for j, (score, name, cost, strategy) in enumerate(starts):
            until = time.perf_counter() + (deadline - time.perf_counter()) / (len(starts) - j)
            strategy, cost, moves = anneal_ops(ann.sim, strategy, until, rng, memory_limit=ann.memory_limit,
                                               prior=ann.op_prior)
            evaluations += moves
            results.append((_score(cost, ann.memory_limit), name, cost, strategy))
            if progress:
                _say(f"annealed ops from {name}: {results[-1][0]:.4g} s ({moves} moves)", t0)
        score, name, cost, strategy = min(results, key=lambda r: r[0])
        if permute:  # device assignment: the same plan on other orders of the same devices
            for order in device_orders(ann.mesh, topology):
                moved = dataclasses.replace(strategy, mesh=order)
                c = ann.sim.with_mesh(order).cost(moved)
                evaluations += 1
                if _score(c, ann.memory_limit) < score:
                    strategy, cost, score = moved, c, _score(c, ann.memory_limit)
        if score < best_score:
            best_score, best_cost, best_strategy = score, cost, strategy
            best_name = f"annealed from {name}"
            history.append((time.perf_counter() - t0, best_score))
    if not math.isfinite(best_score):
        from tag_jax.plan import _bytes

        largest = max((graph.tensors[t] for t in graph.inputs), key=lambda t: t.nbytes)
        low = min(scored, key=lambda s: s[2].peak_memory_bytes)
        least, axes = low[2].peak_memory_bytes, low[3].mesh.axes
        # what that plan's peak holds: the arguments' shards (state, batch) and the rest
        # (activations kept for the backward pass, temporaries)
        held = sum(math.prod(ts.local_shape(graph.tensors[t].shape, axes)) * graph.tensors[t].dtype.itemsize
                   for t, ts in zip(graph.inputs, low[3].input_shardings))
        hint = ("most of it is activations and temporaries: rematerialise layers (jax.checkpoint, "
                "flax nn.remat), use " if least - held > held else "use ")
        raise PlanningError(
            f"no plan fits the memory limit of {_bytes(limit_of(meshes[0]))} per device: the best reached "
            f"{_bytes(least)} ({low[1]}: arguments {_bytes(held)} per device, activations and "
            f"temporaries {_bytes(max(0, least - held))}; largest tensor {largest.describe()}, "
            f"{_bytes(largest.nbytes)}); {hint}more devices, a smaller batch, or a larger memory_limit")
    best_strategy = dataclasses.replace(best_strategy, name=f"tag_jax ({best_name})")
    return SearchResult(strategy=best_strategy, cost=best_cost, evaluations=evaluations,
                        seconds=time.perf_counter() - t0, seeds=seeds, decisions=decisions,
                        history=tuple(history),
                        over_memory=frozenset(s[1] for s in scored if not math.isfinite(s[0])))


def _ilp_seed(graph: OpGraph, topology, scored: list, seeds: dict, settled: set, t0: float,
              time_budget_s: float, progress: bool) -> float:
    """The ILP on the first mesh, once the first mesh and one 2-D mesh are seeded (before the
    other meshes and the policy): it returns as soon as it proves its plan optimal (most models in about a second),
    and where it does not, its plan is the one the annealer is least likely to reach
    (benchmarks/RESULTS.md). Its limit, building the problem included, is at most ILP_SHARE of
    the budget (ILP_SHARE_LARGE for large graphs) and leaves a twentieth; it is skipped when that
    share, or what is left of the budget, is under 0.5 s. Returns the seconds it took."""
    start = time.perf_counter()
    spent = start - t0
    # Where one seed costs so much that argument annealing is out of reach (40 evaluations in
    # half the budget), the annealer can do little beyond the seeds: the ILP may take more. The
    # seed's cost is estimated from the op count, not timed, so the choice does not depend on load.
    seed_s = SEED_SECONDS_PER_OP * len(graph.ops)
    share = ILP_SHARE if 40 * seed_s < time_budget_s / 2 else ILP_SHARE_LARGE
    # Whether it runs depends on the budget (so that one seed gives the same seeds on a busier
    # machine), except where the seeds already used all but half a second of it.
    ilp_s = min(share * time_budget_s, 0.95 * time_budget_s - spent)
    info = None
    if share * time_budget_s >= 0.5 and ilp_s >= 0.5:
        # On large graphs the whole MIP rarely finishes in its share, and fixing the units its LP
        # relaxation already decides halves the time to the same plan (resnet-50 on 2x4-v100-25gbe:
        # 8.3 -> 4.6 s); on small ones the whole MIP is as fast or faster (recommender-real).
        info = _add_ilp_seed(graph, topology, scored[0][4], scored, seeds, ilp_s,
                             relax_and_fix=share == ILP_SHARE_LARGE)
    if info is not None and info["status"] == "optimal":
        settled.add(scored[-1][1])  # (for the ILP's objective, the no-overlap time it anneals)
    if progress and info is not None:
        _say(f"ILP seed ({info['status']}): best {min(s[0] for s in scored):.4g} s", t0)
    return time.perf_counter() - start


def _add_ilp_seed(graph: OpGraph, topology, ann: Annealer, scored: list, seeds: dict,
                  time_limit_s: float, relax_and_fix: bool = False) -> dict | None:
    """The Alpa-style ILP's plan (tag_jax.search.ilp) on `ann`'s mesh joins the seeds: over the
    same options it often beats the baselines by far (benchmarks/RESULTS.md), and annealing can
    still improve it. Time-limited; reuses the annealer's simulator and memory limit; no seed when
    nothing fits.
    Returns the ILP's info (None without a plan)."""
    from tag_jax.search.ilp import ilp_strategy

    try:
        strategy, info = ilp_strategy(graph, ann.op_strategies, topology, ann.mesh,
                                      time_limit_s=time_limit_s, memory_limit=ann.memory_limit,
                                      simulator=ann.sim, limit_includes_build=True,
                                      relax_and_fix=relax_and_fix, fallback=False)
    except PlanningError:
        return None
    if strategy is None:
        return info  # (no solution in time: data parallel, a seed already, stands in for it)
    cost = info["cost"]
    name = f"ilp {_mesh_label(ann.mesh)}"
    seeds[name] = cost.step_time_s
    scored.append((_score(cost, ann.memory_limit), name, cost, strategy, ann, None))
    return info


def _add_policy_seeds(policy, graph: OpGraph, topology, scored: list, seeds: dict) -> None:
    """The policy's plans on the two most promising seeded meshes join the seeds: its argument
    shardings (a decision vector, op options propagated) and its own op options (a seed for
    op-option annealing only); its scores become the two annealers' move priors."""
    from tag_jax.policy.features import context

    # Only the meshes the annealing will work on (the two with the best baseline seeds, as
    # `search` picks them): features and scores cost about four seeds per mesh.
    anns = []
    for s in sorted(scored, key=lambda s: s[0]):
        if math.isfinite(s[0]) and all(s[4] is not a for a in anns) and len(anns) < 2:
            anns.append(s[4])
    anns = anns or [scored[0][4]]
    guides = policy.guide(graph, topology, [a.mesh for a in anns],
                          [context(graph, a.mesh, a.op_strategies) for a in anns])
    for ann, g in zip(anns, guides):
        ann.prior, ann.op_prior = g.prior, g.op_prior
        score, cost, strategy = ann.evaluate(g.decision)
        name = f"policy {_mesh_label(ann.mesh)}"
        seeds[name] = cost.step_time_s
        scored.append((score, name, cost, strategy, ann, g.decision))
        strategy = g.strategy(graph, name="policy ops")
        cost = ann.sim.cost(strategy)
        name = f"policy ops {_mesh_label(ann.mesh)}"
        seeds[name] = cost.step_time_s
        scored.append((_score(cost, ann.memory_limit), name, cost, strategy, ann, None))


def two_d_strategy(graph: OpGraph, op_strategies, mesh: MeshSpec, carried: dict) -> Strategy:
    """2-D tensor parallelism on a (data, model) mesh, weights stationary: every parameter of two
    or more dimensions (and its optimizer state) stored split over both axes, `model` on its
    second-to-last dimension and `data` on its last, and used where it lies (Optimus/SUMMA style:
    no gathers, each matmul a partial sum); other parameters split over both axes on their
    largest dimension; the batch over `data`; op options by `propagate`. Its op options are far
    from the best, so it seeds op-option annealing rather than standing as a baseline."""
    from tag_jax.search.propagate import propagate

    data, model = mesh.axis_names
    axes = mesh.axes
    ins = []
    for tid in graph.inputs:
        t = graph.tensors[tid]
        nd, shape = len(t.shape), t.shape
        dims = [()] * nd
        if t.role in (Role.PARAMETER, Role.OPTIMIZER_STATE) and nd:
            if nd >= 2 and shape[-2] % axes[model] == 0 and shape[-1] % axes[data] == 0 \
                    and shape[-2] > 1 and shape[-1] > 1:
                dims[-2], dims[-1] = (model,), (data,)
            else:
                d = max(range(nd), key=lambda k: (shape[k], -k))
                if shape[d] % mesh.size == 0 and shape[d] > 1:
                    dims[d] = (data, model)
        elif t.role == Role.BATCH and nd and shape[0] % axes[data] == 0:
            dims[0] = (data,)
        ins.append(TensorSharding(tuple(dims)))
    by_input = dict(zip(graph.inputs, ins))
    wanted = {out: by_input[src] for out, src in carried.items()}
    choices = propagate(graph, op_strategies, mesh, ins, outputs=wanted)
    return Strategy(mesh, choices, tuple(ins), name="2d")


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
