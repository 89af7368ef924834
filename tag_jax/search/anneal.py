"""Simulated annealing over argument shardings, mesh shape and device order.

The search state is one decision per *parameter group* (a weight and the same weight in every
repeated layer, with its optimizer state following it) plus one for the batch: a storage sharding,
and whether the weight is used in that layout (tensor parallel) or gathered at use (ZeRO-3 / FSDP).
Repeated layers sharing one decision is the coarsening that keeps the space small whatever the depth.
Op options follow from the decisions by `propagate`, and every candidate is priced by the simulator.
Starts from the best of the hand-written baselines on every candidate mesh, so the result is never
worse than them; anytime, seeded, bounded by `time_budget_s`.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable, Sequence

import numpy as np

from tag_jax.hlo.graph import OpGraph, Role
from tag_jax.strategy import MeshSpec, Strategy, TensorSharding

_LAYER_INDEX = re.compile(r"_\d+(?=/|$)")
_CARRIED = (Role.PARAMETER, Role.OPTIMIZER_STATE, Role.STATE)
PRIOR_WEIGHT = 0.8  # share of moves drawn from the policy's prior when one is set (the rest uniform)


@dataclasses.dataclass(frozen=True)
class Option:
    """One decision for a group: how its tensors are stored, and whether ops use them gathered."""

    dim: int | None  # split dimension (None: replicated)
    axes: tuple[str, ...]
    gather: bool  # store split, compute on the gathered (replicated) tensor

    def storage(self, ndim: int) -> TensorSharding:
        if self.dim is None or self.dim >= ndim:
            return TensorSharding.replicated(ndim)
        dims = [()] * ndim
        dims[self.dim] = self.axes
        return TensorSharding(tuple(dims))

    def compute(self, ndim: int) -> TensorSharding:
        return TensorSharding.replicated(ndim) if self.gather else self.storage(ndim)

    def __str__(self) -> str:
        if self.dim is None:
            return "replicated"
        return f"split dim {self.dim} over {','.join(self.axes)}" + (" (gathered at use)" if self.gather else "")


@dataclasses.dataclass(frozen=True)
class Group:
    key: str  # parameter path with layer indices replaced by *
    tensors: tuple[int, ...]  # input tensor ids: the parameters and their optimizer state
    shape: tuple[int, ...]
    options: tuple[Option, ...]


@dataclasses.dataclass(frozen=True)
class SearchResult:
    strategy: Strategy
    cost: Any
    evaluations: int
    seconds: float
    seeds: dict  # name -> predicted step time of each starting plan
    decisions: dict  # group key -> Option (for the summary)
    history: tuple  # (seconds, best step time) whenever the best improved
    over_memory: frozenset = frozenset()  # names of the seeds that do not fit in memory


def layer_key(path: str) -> str:
    """`state/params/h_3/attn/c_attn/kernel` -> `params/h_*/attn/c_attn/kernel` (shared decision)."""
    words = path.split("/")
    if "params" in words:
        words = words[words.index("params"):]
    return _LAYER_INDEX.sub("_*", "/".join(words))


def param_groups(graph: OpGraph, mesh: MeshSpec) -> tuple[Group, ...]:
    """Parameter groups with their options on `mesh`; optimizer state joins its parameter's group."""
    params = [t for t in (graph.tensors[i] for i in graph.inputs) if t.role == Role.PARAMETER]
    by_key: dict[tuple, list[int]] = {}
    for t in params:
        by_key.setdefault((layer_key(t.path or str(t.id)), t.shape), []).append(t.id)
    # Optimizer state tensors follow the parameter whose path ends theirs (mu/..., nu/...).
    tail_of = {}
    for t in params:
        words = (t.path or "").split("/")
        tail_of[("/".join(words[words.index("params") + 1:]) if "params" in words else t.path, t.shape)] = t.id
    owner = {}
    for tid in graph.inputs:
        t = graph.tensors[tid]
        if t.role != Role.OPTIMIZER_STATE or not t.path:
            continue
        words = t.path.split("/")
        for k in range(len(words)):
            hit = tail_of.get(("/".join(words[k:]), t.shape))
            if hit is not None:
                owner[tid] = hit
                break
    followers: dict[int, list[int]] = {}
    for o, p in owner.items():
        followers.setdefault(p, []).append(o)
    groups = []
    for (key, shape), tids in sorted(by_key.items()):
        members = tuple(sorted(tids + [f for p in tids for f in followers.get(p, [])]))
        groups.append(Group(key, members, shape, _options(shape, mesh)))
    return tuple(groups)


def _options(shape: Sequence[int], mesh: MeshSpec) -> tuple[Option, ...]:
    axes = mesh.axes
    axis_sets = [(a,) for a in mesh.axis_names]
    if len(mesh.axis_names) > 1:
        axis_sets.append(tuple(mesh.axis_names))
    opts = [Option(None, (), False)]
    for d, n in enumerate(shape):
        for s in axis_sets:
            if n % math.prod(axes[a] for a in s) == 0 and n > 1:
                opts.append(Option(d, s, False))
                opts.append(Option(d, s, True))
    return tuple(opts)


def batch_options(graph: OpGraph, mesh: MeshSpec) -> tuple[tuple[str, ...], ...]:
    """Axis sets that may split dimension 0 of every batch input (the batch dimension)."""
    batch = [graph.tensors[i] for i in graph.inputs
             if graph.tensors[i].role == Role.BATCH and graph.tensors[i].shape]
    axes = mesh.axes
    names = mesh.axis_names
    sets = [()] + [(a,) for a in names] + ([tuple(names)] if len(names) > 1 else [])
    return tuple(s for s in sets
                 if all(t.shape[0] % math.prod(axes[a] for a in s) == 0 for t in batch))


def decision_shardings(graph: OpGraph, groups: Sequence[Group], batch_sets, decision
                       ) -> tuple[tuple[TensorSharding, ...], tuple[TensorSharding, ...]]:
    """(storage, compute) sharding of every graph input under a decision vector: one option per
    argument group, then the batch's mesh axes (`batch_sets[decision[-1]]`)."""
    batch_axes = batch_sets[decision[-1]]
    storage, compute = {}, {}
    for tid in graph.inputs:
        t = graph.tensors[tid]
        ts = TensorSharding.replicated(len(t.shape))
        if t.role == Role.BATCH and t.shape and batch_axes:
            ts = TensorSharding(((batch_axes,) + ((),) * (len(t.shape) - 1)))
        storage[tid] = compute[tid] = ts
    for group, k in zip(groups, decision):
        opt = group.options[k]
        for tid in group.tensors:
            nd = len(graph.tensors[tid].shape)
            storage[tid], compute[tid] = opt.storage(nd), opt.compute(nd)
    return tuple(storage[t] for t in graph.inputs), tuple(compute[t] for t in graph.inputs)


class Annealer:
    """Evaluates decision vectors on one mesh; `run` anneals from a starting vector."""

    def __init__(self, graph: OpGraph, op_strategies, simulator, mesh: MeshSpec,
                 memory_limit: float | None):
        from tag_jax.search.propagate import carried_outputs

        self.graph, self.op_strategies, self.sim, self.mesh = graph, op_strategies, simulator, mesh
        self.groups = param_groups(graph, mesh)
        self.batch_sets = batch_options(graph, mesh)
        self.carried = carried_outputs(graph)
        self.memory_limit = memory_limit
        self.evaluations = 0
        self._cache: dict[tuple, tuple[float, Any, Strategy]] = {}
        # Optional move prior (tag_jax.policy): per unit, probabilities over its options.
        self.prior: tuple[np.ndarray, ...] | None = None
        # ... and per op class (`op_classes` order), for `anneal_ops`.
        self.op_prior: tuple[np.ndarray, ...] | None = None

    def shardings(self, decision: tuple[int, ...]) -> tuple[tuple[TensorSharding, ...], tuple[TensorSharding, ...]]:
        """(storage, compute) sharding of every graph input under a decision vector."""
        return decision_shardings(self.graph, self.groups, self.batch_sets, decision)

    def evaluate(self, decision: tuple[int, ...]) -> tuple[float, Any, Strategy]:
        """(score, cost, strategy); score is the step time, infinite when memory does not fit."""
        if decision in self._cache:
            return self._cache[decision]
        from tag_jax.search.propagate import propagate

        storage, compute = self.shardings(decision)
        by_input = dict(zip(self.graph.inputs, storage))
        wanted = {out: by_input[src] for out, src in self.carried.items()}
        choices = propagate(self.graph, self.op_strategies, self.mesh, compute, outputs=wanted)
        strategy = Strategy(self.mesh, choices, storage, name="tag_jax")
        cost = self.sim.cost(strategy)
        self.evaluations += 1
        score = cost.step_time_s
        if self.memory_limit is not None and cost.peak_memory_bytes > self.memory_limit:
            score = math.inf
        self._cache[decision] = (score, cost, strategy)
        return self._cache[decision]

    def neighbour(self, decision: tuple[int, ...], rng: np.random.Generator) -> tuple[int, ...]:
        d = list(decision)
        k = int(rng.integers(len(d)))
        n = len(self.batch_sets) if k == len(d) - 1 else len(self.groups[k].options)
        if n > 1 and self.prior is not None and rng.random() < PRIOR_WEIGHT:
            p = np.array(self.prior[k], np.float64)  # the policy's preference, never the current
            p[d[k]] = 0.0
            d[k] = int(rng.choice(n, p=p / p.sum())) if p.sum() > 1e-9 else (d[k] + 1) % n
        elif n > 1:
            d[k] = int((d[k] + rng.integers(1, n)) % n)
        # Chain move: sometimes give the same option index to groups of the same layer.
        if k < len(self.groups) and rng.random() < 0.3:
            prefix = self.groups[k].key.rsplit("/", 2)[0]
            for j, g in enumerate(self.groups):
                if g.key.startswith(prefix) and g.options == self.groups[k].options:
                    d[j] = d[k]
        return tuple(d)

    def run(self, start: tuple[int, ...], deadline: float, rng: np.random.Generator,
            on_best: Callable[[float], None],
            max_evaluations: int | None = None) -> tuple[float, Any, Strategy, tuple[int, ...]]:
        cur = start
        cur_score, cur_cost, cur_strategy = self.evaluate(cur)
        best = (cur_score, cur_cost, cur_strategy, cur)
        temp = 0.05  # relative: accept a 5% worse plan with probability 1/e at the start
        stop = math.inf if max_evaluations is None else self.evaluations + max_evaluations
        while time.perf_counter() < deadline and self.evaluations < stop:
            cand = self.neighbour(cur, rng)
            score, cost, strategy = self.evaluate(cand)
            if score <= cur_score or (math.isfinite(score) and rng.random() < math.exp(
                    -(score - cur_score) / max(cur_score * temp, 1e-12))):
                cur, cur_score = cand, score
                if score < best[0]:
                    best = (score, cost, strategy, cand)
                    on_best(score)
            temp *= 0.97
        return best


def candidate_meshes(device_ids: Sequence[int], topology, shape: tuple[int, ...] | None = None,
                     axis_names: tuple[str, ...] | None = None, permute: bool = True,
                     leave_out: bool = False) -> list[MeshSpec]:
    """Mesh shapes worth trying, devices sorted by node so that a minor (last) axis stays inside a
    node: the axis that talks most (tensor parallel) gets the fastest links. Other device orders
    are tried on the chosen plan by `device_orders`, which is cheap.

    `leave_out` (mixed device kinds, shape not fixed): also 1-D meshes on only the faster devices
    (`faster_subsets`), the first of them second in the list (before the first 2-D mesh of all
    devices, whose seeding costs more), the others third: one SPMD
    program runs at its slowest device's pace, so a slow kind can cost more than it adds (a V100
    does a float32 matmul at a tenth of an A100's TF32 rate). (1-D only: each mesh shape costs
    its seeding, a second or more for 10,000 ops, and the budget is shared.)"""
    ids = tuple(device_ids)
    if permute:
        ids = tuple(sorted(ids, key=lambda i: (topology.device(i).node, i)))
    if shape is not None:
        return [MeshSpec(tuple(shape), tuple(axis_names), ids)]
    full = _meshes_on(ids)
    if not leave_out:
        return full
    fewer = [_meshes_on(sub)[0] for sub in faster_subsets(ids, topology)]
    return full[:1] + fewer[:1] + full[1:2] + fewer[1:] + full[2:]


def _meshes_on(ids: tuple[int, ...]) -> list[MeshSpec]:
    n = len(ids)
    return [MeshSpec((n,), ("data",), ids)] + [MeshSpec((n // m, m), ("data", "model"), ids)
                                               for m in range(2, n) if n % m == 0]


def faster_subsets(device_ids: Sequence[int], topology) -> list[tuple[int, ...]]:
    """On mixed device kinds: the devices at least as fast as each speed level but the slowest
    (speed: float32 matmul FLOP/s, then memory bandwidth), largest first, then the devices of the
    node with the most of them (no slow link inside: TAG's cluster has 4 1080Ti on one machine
    and its V100 and P100 in pairs); each 2 devices or more."""
    def speed(i):
        d = topology.device(i)
        return (d.matmul_flops_fp32, d.memory_bandwidth)

    levels = sorted({speed(i) for i in device_ids}, reverse=True)
    if len(levels) < 2:
        return []
    subsets = [tuple(i for i in device_ids if speed(i) >= lv) for lv in levels[:-1]][::-1]
    nodes: dict[int, list[int]] = {}
    for i in device_ids:
        nodes.setdefault(topology.device(i).node, []).append(i)
    biggest = tuple(max(nodes.values(), key=lambda m: (len(m), speed(m[0]))))
    if len(nodes) > 1 and biggest not in subsets:
        subsets.append(biggest)
    return [s for s in subsets if len(s) >= 2]


def device_orders(mesh: MeshSpec, topology) -> list[MeshSpec]:
    """Other assignments of the same devices to the mesh's positions.

    The transposed order (the minor axis across nodes), nodes in reverse order, and devices sorted
    by speed (on mixed clusters, like devices then share the inner axis)."""
    ids = np.asarray(mesh.device_ids)
    orders = []
    if len(mesh.shape) == 2:
        orders.append(ids.reshape(mesh.shape[::-1]).T.reshape(-1))
    orders.append(np.asarray(sorted(ids.tolist(), key=lambda i: (-topology.device(i).node, i))))
    orders.append(np.asarray(sorted(ids.tolist(), key=lambda i: (-topology.device(i).flops, i))))
    out = []
    for o in orders:
        m = MeshSpec(mesh.shape, mesh.axis_names, tuple(int(i) for i in o))
        if m != mesh and m not in out:
            out.append(m)
    return out


def op_classes(graph: OpGraph, op_strategies) -> tuple[tuple[int, ...], ...]:
    """Ops that share one decision: the same op in every repeated layer (scope without layer
    indices, primitive, shapes) — TAG's op groups, and the coarsening that keeps moves few."""
    classes: dict[tuple, list[int]] = {}
    for op in graph.ops:
        if len(op_strategies[op.id]) < 2:
            continue  # nothing to decide
        shapes = tuple(graph.tensors[t].shape for t in op.inputs + op.outputs)
        key = (_LAYER_INDEX.sub("_*", op.scope), op.primitive, shapes, id(op_strategies[op.id]))
        classes.setdefault(key, []).append(op.id)
    return tuple(tuple(v) for v in classes.values())


def anneal_ops(simulator, strategy: Strategy, deadline: float, rng: np.random.Generator,
               classes: Sequence[Sequence[int]] | None = None, temperature: float = 0.02,
               memory_limit: float | None = None, prior: Sequence[np.ndarray] | None = None,
               max_moves: int | None = None) -> tuple[Strategy, Any, int]:
    """Anneal op options (inputs fixed) with class moves priced incrementally; confirm the best.

    Moves set one class of ops to one option; acceptance is Metropolis on the no-overlap step time,
    with a temperature relative to the current time that cools geometrically. The best strategy seen
    is re-priced by the full simulator (overlap, memory) and returned only if it beats the start.
    `prior` (tag_jax.policy, one probability vector per class of `classes`): a share PRIOR_WEIGHT
    of the moves draws the option from it (never the current one) instead of uniformly.
    `max_moves` stops after that many priced moves (the clock still bounds them).
    """
    graph, ops = simulator.graph, simulator.op_strategies
    classes = list(classes if classes is not None else op_classes(graph, ops))
    start_cost = simulator.cost(strategy)
    if not classes:
        return strategy, start_cost, 1
    if prior is not None and len(prior) != len(classes):
        prior = None  # scores for other classes (another rule set): moves stay uniform
    inc = simulator.incremental(strategy)
    cur = inc.time
    best_time, best_choices = cur, inc.choices.copy()
    moves = 0
    temp = temperature
    stop = math.inf if max_moves is None else max_moves
    while time.perf_counter() < deadline and moves < stop:
        for _ in range(64):  # check the clock every few moves
            if moves >= stop:
                break
            c = int(rng.integers(len(classes)))
            members = classes[c]
            n = len(ops[members[0]])
            if prior is not None and rng.random() < PRIOR_WEIGHT:
                p = np.array(prior[c][:n], np.float64)
                p[inc.choices[members[0]]] = 0.0
                k = int(rng.choice(n, p=p / p.sum())) if p.sum() > 1e-9 else int(rng.integers(n))
            else:
                k = int(rng.integers(n))
            changes = {i: k for i in members if inc.choices[i] != k}
            if not changes:
                continue
            new = inc.propose(changes)
            moves += 1
            if new <= cur or rng.random() < math.exp(-(new - cur) / max(cur * temp, 1e-12)):
                cur = inc.commit(changes)
                if cur < best_time:
                    best_time, best_choices = cur, inc.choices.copy()
        temp *= 0.9
    candidate = dataclasses.replace(strategy, choices=tuple(int(x) for x in best_choices))
    cost = simulator.cost(candidate)
    fits = memory_limit is None or cost.peak_memory_bytes <= memory_limit
    if fits and cost.step_time_s < start_cost.step_time_s:
        return candidate, cost, moves
    return strategy, start_cost, moves
