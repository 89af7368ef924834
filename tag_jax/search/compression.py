"""Choose, per gradient, how to synchronise it: plain reduction, SFB, row-sparse, or (opt-in) lossy.

TAG's 0/1 program (REFERENCE.md), in tag_jax's strategy space and with the overlap of gradient
communication with the rest of the backward pass.

Candidates. A gradient is a partial sum the plan all-reduces over data axes (the simulator's
reduction of its root, `Cost.reshards`), traced back through transposes, reshapes and elementwise
ops to its source ops, plus every embedding-table scatter-add of a replicated table. Only gradients
of replicated parameters are eligible (data parallel, all-reduce synchronised).

- "sfb" (dot_general / conv / reduce_sum source): the source and the ops that carry its partial sum
  to the update take option 0 (replicated in and out). Its batch-split factors are then all-gathered
  and each device computes the full gradient: exactly how the simulator prices option 0, and what
  emission does with `constrain="operands"` (no new emission code).
- "row_sparse" (scatter-add source): the same strategy change; emission replaces the scatter-add by
  `tag_jax.compress.row_sparse_psum` in `jax.shard_map` (`tag_jax.emit.compressed`), indices and
  rows split over the data axes. `compressed_cost` prices its collectives from
  `tag_jax.compress.costs` in place of the gathers option 0 would imply.
- "lossy_bf16" / "lossy_int8" (mode "lossy" only, single dot/conv/reduce_sum source): the strategy is
  unchanged; emission reduces the source's partial result with `lossy_psum_*`. The simulator cannot
  express a narrower all-reduce, so their saving is subtracted from the simulated cost
  (`compressed_cost`): an estimate, marked so in the plan.

The MILP (`scipy.optimize.milp`). Binary x[g,m] (gradient g by method m, at most one per g), binary
b[a] (added all-gather a happens; b[a] >= x[g,lossless] for each g that needs it, so factors shared
by several gradients are gathered once), continuous T (step time). Minimise T + EPS * (comm seconds):

    T >= C + sum_g,m dC[g,m] x[g,m]                                     (compute stream)
    T >= R_j(x) + sum_{k = j..K} d_k(x) + tail_K(x)   for cut points j <= K of the comm stream

Comm items (the plan's reshards, the new gathers, the new row-sparse / lossy collectives) run in
order of their source's readiness: R_j = prefix compute up to the item's producer (shifted by the
extra compute chosen before it), d_k = its seconds (removed reductions drop out, new ones join),
tail_K = compute from the first op that waits for item K to the end. All are priced by the plan's
simulator on the plan's mesh and topology (the same collective times, the same device groups).
The simulator is the final judge: the MILP's choice is kept only if the simulated step (with the
memory limit) is no worse than the plan without compression; otherwise choices are dropped one by
one, and the best single choice is tried, so "never worse than without" holds by construction.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Mapping, Sequence

import numpy as np

from tag_jax.hlo.graph import OpGraph, Role
from tag_jax.rules.elementwise import ELEMENTWISE
from tag_jax.strategy import Strategy, TensorSharding

MODES = ("none", "lossless", "lossy")
LOSSLESS = ("sfb", "row_sparse")
LOSSY = ("lossy_bf16", "lossy_int8")
SFB_SOURCES = frozenset({"dot_general", "conv_general_dilated", "reduce_sum"})
SCATTER_ADD = frozenset({"scatter-add", "scatter_add"})
# ops that carry a gradient from its source to the update, elementwise over it or moving it whole
CARRY = frozenset(ELEMENTWISE) | {"transpose", "reshape", "squeeze", "expand_dims", "broadcast_in_dim",
                                  "copy", "copy_p"}
EPS = 1e-3          # weight of total comm seconds in the objective: fewer bytes when time ties
MAX_CUTS = 80       # start points j of the comm-stream bounds
MAX_ENDS = 40       # end points K


class CompressionError(ValueError):
    """A compression request cannot be honoured; the message says which gradient and why."""


@dataclasses.dataclass(frozen=True)
class CompressionChoice:
    """How one gradient is synchronised in a plan.

    `gradient`: the parameter path it updates (or the tensor); `method`: "sfb", "row_sparse",
    "sfb+row_sparse", "lossy_bf16" or "lossy_int8"; `sources`: (op id, method) of the ops emission
    treats; `axes`: the mesh axes it is summed over; `bytes_saved`: per-device collective result
    bytes the plan no longer moves (removed minus added, as `tag_jax.hlo.collectives` counts them);
    `seconds_saved`: the simulator's change of communication seconds (not all were exposed).
    """

    gradient: str
    method: str
    sources: tuple[tuple[int, str], ...]
    axes: tuple[str, ...]
    bytes_saved: int
    seconds_saved: float
    exact: bool = True

    def to_dict(self) -> dict:
        return {"gradient": self.gradient, "method": self.method,
                "sources": [list(s) for s in self.sources], "axes": list(self.axes),
                "bytes_saved": int(self.bytes_saved), "seconds_saved": float(self.seconds_saved),
                "exact": self.exact}

    @staticmethod
    def from_dict(d: Mapping) -> "CompressionChoice":
        return CompressionChoice(d["gradient"], d["method"], tuple((int(a), str(b)) for a, b in d["sources"]),
                                 tuple(d["axes"]), int(d["bytes_saved"]), float(d["seconds_saved"]),
                                 bool(d.get("exact", True)))


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One gradient (or group of gradients sharing ops) the selector may treat."""

    gradient: str
    sources: tuple[tuple[int, str], ...]  # (op id, lossless method)
    ops: tuple[int, ...]                  # ops set to option 0 by the lossless method
    axes: tuple[str, ...]
    root: int | None                      # tensor whose reduction the plan prices, if any
    methods: tuple[str, ...]              # allowed: a lossless one and/or lossy ones


@dataclasses.dataclass(frozen=True)
class Selection:
    """What `select_compression` returns: the strategy to emit, the choices, and both costs."""

    strategy: Strategy
    choices: tuple[CompressionChoice, ...]
    cost: Any            # judged (simulated; lossy savings subtracted)
    base_cost: Any       # the same plan without compression
    model: dict          # MILP facts: candidates, variables, objective, status, seconds

    @property
    def speedup(self) -> float:
        return self.base_cost.step_time_s / self.cost.step_time_s


# ---- candidates ----------------------------------------------------------------------------------

def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise CompressionError(f"compression={mode!r}: give one of {', '.join(map(repr, MODES))} "
                               "('lossless' allows SFB and row-sparse, 'lossy' also bf16/int8 psums)")
    return mode


def _produced(graph: OpGraph, strategy: Strategy, ops) -> dict[int, TensorSharding]:
    from tag_jax.emit.program import produced_shardings
    return produced_shardings(graph, strategy, ops)


def row_sparse_pattern(graph: OpGraph, op) -> str | None:
    """Why `op` is not a table-gradient scatter-add that row_sparse_psum can do, or None if it is."""
    if op.primitive not in SCATTER_ADD or len(op.inputs) != 3:
        return f"{op.primitive} is not a scatter-add"
    dn, mode = op.params.get("dimension_numbers"), str(op.params.get("mode"))
    operand, idx, upd = (graph.tensors[t] for t in op.inputs)
    if dn is None or tuple(dn.inserted_window_dims) != (0,) or tuple(dn.scatter_dims_to_operand_dims) != (0,) \
            or dn.operand_batching_dims or dn.scatter_indices_batching_dims:
        return "its indices do not pick whole rows of dimension 0"
    if not idx.shape or idx.shape[-1] != 1 or tuple(upd.shape) != tuple(idx.shape[:-1]) + tuple(operand.shape[1:]):
        return "its updates are not one row per index"
    if tuple(dn.update_window_dims) != tuple(range(len(idx.shape) - 1, len(upd.shape))):
        return "its row dims are not the trailing dims of the updates"
    if "CLIP" in mode:
        return "it clips out-of-range indices (row_sparse_psum drops them)"
    return None


def row_sparse_layout(graph: OpGraph, made: Mapping[int, TensorSharding], op) -> tuple[str, ...]:
    """Mesh axes the scatter-add's indices are split over on dim 0 (and only there), when its rows
    come replicated or split alike: the layout row_sparse_psum takes them in; () when unusable."""
    if row_sparse_pattern(graph, op) is not None:
        return ()
    ids, upd = made[op.inputs[1]], made[op.inputs[2]]
    axes = ids.dims[0] if ids.dims else ()
    if not axes or ids.partial or upd.partial or any(ids.dims[1:]):
        return ()
    if not (upd.is_replicated() or (upd.dims[0] == axes and not any(upd.dims[1:]))):
        return ()
    return tuple(axes)


def _walk_back(graph: OpGraph, made: Mapping[int, TensorSharding], root: int, axes: frozenset):
    """Source ops of the partial sum `root` (through CARRY ops), or None if one is not a source."""
    sources, seen, stack = [], set(), [root]
    while stack:
        t = stack.pop()
        p = graph.tensors[t].producer
        if p is None:
            return None
        if p in seen:
            continue
        seen.add(p)
        op = graph.ops[p]
        if op.primitive in SFB_SOURCES or op.primitive in SCATTER_ADD:
            sources.append(p)
            continue
        if op.primitive not in CARRY:
            return None
        ins = [u for u in op.inputs if set(made[u].partial) & axes]
        if not ins:
            return None  # made partial by a local select: nothing to compress
        stack.extend(ins)
    return sources


def _closure(graph: OpGraph, sources: Sequence[int]) -> tuple[int, ...]:
    """The sources, the CARRY ops downstream of them (the gradient's path to its update), and the
    CARRY ops that feed only those (e.g. ``b1 * mu`` of Adam): all of them become replicated."""
    out, stack = set(sources), [t for s in sources for t in graph.ops[s].outputs]
    while stack:
        for i in graph.tensors[stack.pop()].consumers:
            op = graph.ops[i]
            if i not in out and op.primitive in CARRY and not op.subgraphs:
                out.add(i)
                stack.extend(op.outputs)
    grew = True
    while grew:
        grew = False
        for i in sorted(out):
            for t in graph.ops[i].inputs:
                p = graph.tensors[t].producer
                if p is None or p in out or graph.ops[p].primitive not in CARRY or graph.ops[p].subgraphs:
                    continue
                if all(c in out for u in graph.ops[p].outputs for c in graph.tensors[u].consumers):
                    out.add(p)
                    grew = True
    return tuple(sorted(out))


def _param_path(graph: OpGraph, ops: Sequence[int], carried: Mapping[int, int]) -> tuple[str, list[int]]:
    outs = [t for i in ops for t in graph.ops[i].outputs if t in carried]
    params = [carried[t] for t in outs]
    names = [graph.tensors[p].path or graph.tensors[p].describe() for p in params]
    pick = [n for n in names if "param" in n] or names
    return (", ".join(sorted(set(pick))) if pick else graph.tensors[graph.ops[ops[0]].outputs[0]].describe()), params


def candidates(graph: OpGraph, op_strategies, strategy: Strategy, base_cost, mode: str = "lossless"):
    """The gradients `strategy` may compress under `mode` (`base_cost` with `per_op=True`)."""
    from tag_jax.search.propagate import carried_outputs

    made = _produced(graph, strategy, op_strategies)
    carried = carried_outputs(graph)
    inputs = dict(zip(graph.inputs, strategy.input_shardings))
    groups: list[dict] = []
    # 1. weight-gradient ops, however the plan synchronises their parameter (all-reduce,
    #    reduce-scatter + all-gather, sharded gradient + all-gather of the update)
    for op in graph.ops:
        if op.primitive in SFB_SOURCES and any(graph.tensors[t].role == Role.GRADIENT for t in op.outputs):
            groups.append(dict(sources={op.id}, axes=frozenset(), root=None))
        elif op.primitive in SCATTER_ADD and row_sparse_layout(graph, made, op):
            groups.append(dict(sources={op.id}, axes=frozenset(row_sparse_layout(graph, made, op)), root=None))
    # 2. the partial sums the plan all-reduces: the roots a lossy psum could replace
    roots: dict[int, tuple[int, frozenset]] = {}
    for tid, src, dst, comms, secs in base_cost.reshards:
        if src.partial and not dst.partial and comms and all(c.kind == "all-reduce" for c in comms) \
                and not set(src.partial) & set(dst.axes):
            srcs = _walk_back(graph, made, tid, frozenset(src.partial))
            if srcs and len(srcs) == 1:
                roots[srcs[0]] = (tid, frozenset(src.partial))
    # merge groups that share a source or a carried op (e.g. tied embeddings: scatter + dot)
    merged: list[dict] = []
    for g in groups:
        g["ops"] = set(_closure(graph, sorted(g["sources"])))
        if not any(t in carried for i in g["ops"] for t in graph.ops[i].outputs):
            continue  # not on the way to an update: an activation gradient
        (s0,) = g["sources"]
        if s0 in roots:
            g["root"], g["axes"] = roots[s0]
        for h in [h for h in merged if h["ops"] & g["ops"]]:
            merged.remove(h)
            g = dict(sources=g["sources"] | h["sources"], axes=g["axes"] | h["axes"], root=None,
                     ops=g["ops"] | h["ops"], many=True)
        merged.append(g)
    out = []
    for g in merged:
        ops = tuple(sorted(g["ops"]))
        name, params = _param_path(graph, ops, carried)
        if not params or any(not inputs[p].is_replicated() for p in params):
            continue  # only replicated-weight (data-parallel) gradients
        srcs = []
        for s in sorted(g["sources"]):
            op = graph.ops[s]
            if op.primitive in SCATTER_ADD:
                if not row_sparse_layout(graph, made, op):
                    break
                srcs.append((s, "row_sparse"))
            else:
                srcs.append((s, "sfb"))
        else:
            methods = ("lossless",)
            lossy_ok = (mode == "lossy" and g["root"] is not None and len(srcs) == 1
                        and srcs[0][1] == "sfb" and not g.get("many"))
            if lossy_ok:
                k = strategy.choices[srcs[0][0]]
                lossy_ok = set(op_strategies[srcs[0][0]][k].outputs[0].partial) == set(g["axes"])
            methods += LOSSY if lossy_ok else ()
            axes = g["axes"] or {a for s, _ in srcs for t in graph.ops[s].inputs for a in made[t].axes}
            out.append(Candidate(name, tuple(srcs), ops, tuple(sorted(axes)), g["root"], methods))
    return tuple(out)


def lossless_label(c: Candidate) -> str:
    return "+".join(sorted({m for _, m in c.sources}))


# ---- pricing --------------------------------------------------------------------------------------

def _with_ops(strategy: Strategy, ops: Sequence[int]) -> Strategy:
    ch = list(strategy.choices)
    for i in ops:
        ch[i] = 0
    return dataclasses.replace(strategy, choices=tuple(ch))


def _reshard_map(cost) -> dict:
    """(tensor, target) -> (seconds, per-device bytes, comms) of a cost's reshards."""
    return {(t, dst): (secs, sum(c.bytes for c in comms), comms, src) for t, src, dst, comms, secs in cost.reshards}


def _readers(graph: OpGraph, op_strategies, strategy: Strategy) -> dict:
    """(tensor, wanted sharding) -> the ops that read it so, in graph order."""
    out: dict = {}
    for op, k in zip(graph.ops, strategy.choices):
        for t, ts in zip(op.inputs, op_strategies[op.id][k].inputs):
            out.setdefault((t, ts), []).append(op.id)
    return out


def _first_reader(graph: OpGraph, op_strategies, readers: dict, replicated_ops: Sequence[int], key,
                  default: int) -> int:
    """The first op reading `key` once `replicated_ops` take option 0 (the others as in `readers`):
    one candidate's change, without rescanning the graph."""
    changed = set(replicated_ops)
    first = next((i for i in readers.get(key, ()) if i not in changed), default)
    for i in replicated_ops:
        if i < first and any((t, ts) == key for t, ts in
                             zip(graph.ops[i].inputs, op_strategies[i][0].inputs)):
            first = i
    return first


def _lossy_cost(method: str, shape, dtype, m: int):
    from tag_jax.compress import costs
    if method == "lossy_bf16":
        return costs.lossy_bf16_cost(shape, dtype, m)
    return costs.lossy_int8_cost(shape, dtype, m)


def _collective_seconds(sim, collectives, axes) -> float:
    from tag_jax.cost.reshard import Comm
    return sum(sim.comm_seconds(Comm(kind, tuple(axes), int(b))) for kind, b in collectives)


@dataclasses.dataclass
class Problem:
    """The MILP in matrix form: rows `T >= const + coef @ z` over z = (x..., b...), plus picks."""

    names: list            # per x variable: (candidate index, method)
    n_b: int
    adders: list           # per b: x indices that need it
    const: np.ndarray      # per row
    coef: np.ndarray       # rows x (n_x + n_b)
    comm_const: float      # total comm seconds at z = 0 (for the EPS term)
    comm_coef: np.ndarray  # change of total comm seconds per variable
    groups: list           # x indices of one candidate (at most one of them)

    def objective(self, x: Sequence[int]) -> float:
        """The model's objective for a 0/1 assignment of the x variables (b at their minimum)."""
        x = np.asarray(x, float)
        b = np.array([max((x[i] for i in a), default=0.0) for a in self.adders])
        z = np.concatenate([x, b])
        return float(np.max(self.const + self.coef @ z)) + EPS * float(self.comm_const + self.comm_coef @ z)


def build_problem(graph: OpGraph, op_strategies, strategy: Strategy, sim, cands: Sequence[Candidate],
                  base_cost, deadline: float | None = None) -> tuple[Problem, list]:
    """Price every candidate with the simulator (one simulation each) and lay out the MILP.
    Candidates come largest first; past `deadline` the rest are left out (never chosen)."""
    mesh_axes = strategy.mesh.axes
    n_ops = len(graph.ops)
    comp0 = np.array([c for _, c, _ in base_cost.per_op])
    S = np.cumsum(comp0)
    C = float(comp0.sum())
    base = _reshard_map(base_cost)
    readers = _readers(graph, op_strategies, strategy)
    firsts = {key: ops[0] for key, ops in readers.items()}
    # comm items: key -> dict(ready op, first consumer, base secs)
    items: dict = {}

    def item(key, prod, first, secs=0.0):
        it = items.setdefault(key, dict(prod=prod, first=first, secs=secs, terms={}))
        it["first"] = min(it["first"], first)
        return it

    for (t, dst), (secs, _, _, _) in base.items():
        p = graph.tensors[t].producer
        item(("r", t, dst), -1 if p is None else p, firsts.get((t, dst), n_ops), secs)
    names, priced, comp_terms = [], [], []   # comp_terms[x]: {op: delta compute}
    b_index: dict = {}
    adders: list = []
    b_terms: list = []                       # per b: item key
    for ci, c in enumerate(cands):
        if deadline is not None and names and time.perf_counter() > deadline:
            break
        for method in c.methods:
            xi = len(names)
            names.append((ci, method))
            if method == "lossless":
                st = _with_ops(strategy, c.ops)
                cost = sim.cost(st, per_op=True)
                new = _reshard_map(cost)
                dcomp = {i: cc - comp0[i] for i, cc, _ in cost.per_op if abs(cc - comp0[i]) > 0}
                comp_terms.append(dcomp)
                removed = [k for k in base if k not in new]
                added = [k for k in new if k not in base]
                rs_inputs = {graph.ops[s].inputs[p] for s, m in c.sources if m == "row_sparse" for p in (1, 2)}
                for t, dst in removed:
                    items[("r", t, dst)]["terms"][xi] = -base[(t, dst)][0]
                for t, dst in added:
                    if t in rs_inputs:
                        continue  # priced below by the primitive's own formula
                    key = ("r", t, dst)
                    p = graph.tensors[t].producer
                    it = item(key, -1 if p is None else p,
                              _first_reader(graph, op_strategies, readers, c.ops, (t, dst), n_ops))
                    if key not in b_index:
                        b_index[key] = len(adders)
                        adders.append([])
                        b_terms.append((key, new[(t, dst)][0]))
                    adders[b_index[key]].append(xi)
                for s, m in c.sources:
                    if m != "row_sparse":
                        continue
                    op = graph.ops[s]
                    rc = _row_sparse_cost(graph, op, c.axes, mesh_axes)
                    it = item(("rs", s), max(graph.tensors[op.inputs[2]].producer or 0, 0), s)
                    it["terms"][xi] = _collective_seconds(sim, rc.collectives, c.axes)
                priced.append(dict(cost=cost, removed=removed, added=added))
            else:
                root = graph.tensors[c.root]
                mloc = math.prod(mesh_axes[a] for a in c.axes)
                lc = _lossy_cost(method, root.shape, root.dtype, mloc)
                keys = [k for k in base if k[0] == c.root]
                for t, dst in keys:
                    items[("r", t, dst)]["terms"][xi] = -base[(t, dst)][0]
                p = graph.tensors[c.root].producer
                it = item(("lossy", c.root, method), p, n_ops)
                it["terms"][xi] = _collective_seconds(sim, lc.collectives, c.axes)
                rate = min(sim.topology.device(i).matmul_flops_fp32  # (the factors' matmuls)
                           for i in strategy.mesh.device_ids) * sim.efficiency
                comp_terms.append({p: lc.extra_flops / rate} if lc.extra_flops else {})
                priced.append(dict(lossy=lc, removed=keys, added=[]))
    for b, (key, secs) in enumerate(b_terms):
        items[key]["terms"][("b", b)] = secs
    n_x, n_b = len(names), len(adders)
    nz = n_x + n_b

    def col(v):
        return v if isinstance(v, int) else n_x + v[1]

    order = sorted(items, key=lambda k: (S[items[k]["prod"]] if items[k]["prod"] >= 0 else 0.0, items[k]["first"]))
    # per-op compute deltas as a matrix: ops x nz
    dC = np.zeros((n_ops, nz))
    for xi, terms in enumerate(comp_terms):
        for i, v in terms.items():
            dC[i, xi] += v
    cum = np.cumsum(dC, axis=0)          # shift of ready times: extra compute up to op p
    total = cum[-1] if n_ops else np.zeros(nz)
    dur_const = np.array([items[k]["secs"] for k in order])
    dur_coef = np.zeros((len(order), nz))
    for r, k in enumerate(order):
        for v, s in items[k]["terms"].items():
            dur_coef[r, col(v)] += s
    rows_c, rows_a = [C], [total.copy()]
    L = len(order)
    starts = np.unique(np.linspace(0, L - 1, min(L, MAX_CUTS)).round().astype(int)) if L else []
    tails = [(r, items[k]["first"]) for r, k in enumerate(order)]
    ends = [r for r, f in tails if f < n_ops]
    if len(ends) > MAX_ENDS:
        ends = list(np.array(ends)[np.linspace(0, len(ends) - 1, MAX_ENDS).round().astype(int)])
    ends = sorted(set(ends) | ({L - 1} if L else set()))
    pre_c, pre_a = np.cumsum(dur_const), np.cumsum(dur_coef, axis=0)
    for j in starts:
        k = order[j]
        p = items[k]["prod"]
        r_c = S[p] if p >= 0 else 0.0
        r_a = cum[p] if p >= 0 else np.zeros(nz)
        for K in ends:
            if K < j:
                continue
            f = items[order[K]]["first"]
            t_c = C - (S[f - 1] if f > 0 else 0.0) if f < n_ops else 0.0
            t_a = (total - (cum[f - 1] if f > 0 else 0)) if f < n_ops else np.zeros(nz)
            s_c = pre_c[K] - (pre_c[j - 1] if j > 0 else 0.0)
            s_a = pre_a[K] - (pre_a[j - 1] if j > 0 else 0)
            rows_c.append(r_c + s_c + t_c)
            rows_a.append(r_a + s_a + t_a)
    groups = [[xi for xi, (ci, _) in enumerate(names) if ci == k] for k in range(len(cands))]
    prob = Problem(names, n_b, adders, np.array(rows_c), np.array(rows_a).reshape(len(rows_c), nz),
                   float(dur_const.sum()), dur_coef.sum(axis=0) if L else np.zeros(nz), groups)
    return prob, priced


def solve(prob: Problem, time_limit_s: float = 10.0) -> tuple[list[int], dict]:
    """Solve the MILP; returns the x assignment and facts (status, objective, seconds)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    n_x, n_b = len(prob.names), prob.n_b
    nz = n_x + n_b
    if n_x == 0:
        return [], dict(status="no candidates", objective=prob.objective([]), seconds=0.0)
    t0 = time.perf_counter()
    # z = (x, b, T); T - coef z >= const
    A = np.hstack([-prob.coef, np.ones((len(prob.const), 1))])
    cons = [LinearConstraint(A, prob.const, np.inf)]
    pairs = [(b, xi) for b, xs in enumerate(prob.adders) for xi in xs]  # b >= x
    if pairs:
        B = np.zeros((len(pairs), nz + 1))
        for k, (b, xi) in enumerate(pairs):
            B[k, n_x + b], B[k, xi] = 1.0, -1.0
        cons.append(LinearConstraint(B, 0, np.inf))
    G = np.zeros((len(prob.groups), nz + 1))
    for k, xs in enumerate(prob.groups):
        G[k, xs] = 1
    cons.append(LinearConstraint(G, 0, 1))
    obj = np.concatenate([EPS * prob.comm_coef, [1.0]])
    integrality = np.concatenate([np.ones(nz), [0]])
    lb = np.concatenate([np.zeros(nz), [0.0]])
    ub = np.concatenate([np.ones(nz), [np.inf]])
    res = milp(obj, constraints=cons, integrality=integrality, bounds=Bounds(lb, ub),
               options={"time_limit": time_limit_s, "disp": False})
    if res.x is None:
        return [0] * n_x, dict(status=f"milp failed: {res.message}", objective=prob.objective([0] * n_x),
                               seconds=time.perf_counter() - t0)
    x = [int(round(v)) for v in res.x[:n_x]]
    return x, dict(status=res.message, objective=prob.objective(x), seconds=time.perf_counter() - t0)


# ---- judging and applying ----------------------------------------------------------------------

def _row_sparse_cost(graph: OpGraph, op, axes, mesh_axes):
    from tag_jax.compress import costs as ccosts

    table, idx, upd = (graph.tensors[t] for t in op.inputs)
    m = math.prod(mesh_axes[a] for a in axes)
    n = idx.size // max(idx.shape[-1], 1) // m  # this device's indices
    return ccosts.row_sparse_cost(table.shape[0], table.shape[1:], upd.dtype, m, min(n, table.shape[0]))


def compressed_cost(graph: OpGraph, op_strategies, sim, strategy: Strategy,
                    choices: Sequence[CompressionChoice]):
    """The simulator's cost of a compressed plan, with what it cannot express priced from
    `tag_jax.compress.costs`: a row-sparse source's collectives replace the gathers of its indices
    and rows that option 0 implies (which it does not do); lossy choices subtract their saving
    (an estimate: assumed exposed, never below the compute time)."""
    cost = sim.cost(strategy, per_op=True)
    if not any(m in ("row_sparse",) + LOSSY for ch in choices for _, m in ch.sources):
        return cost
    by_kind = dict(cost.comm_bytes_by_kind)
    dt = 0.0
    wants: dict = {}
    for op, k in zip(graph.ops, strategy.choices):
        for t, ts in zip(op.inputs, op_strategies[op.id][k].inputs):
            wants.setdefault((t, ts), set()).add(op.id)
    rs = {op_id for ch in choices for op_id, m in ch.sources if m == "row_sparse"}
    for ch in choices:
        for op_id, m in ch.sources:
            if m == "row_sparse":
                op = graph.ops[op_id]
                for t, src, dst, comms, secs in cost.reshards:
                    if t in op.inputs[1:] and wants.get((t, dst), set()) <= rs:
                        dt -= secs
                        for c in comms:
                            by_kind[c.kind] = by_kind.get(c.kind, 0) - c.bytes
                rc = _row_sparse_cost(graph, op, ch.axes, sim.mesh.axes)
                dt += _collective_seconds(sim, rc.collectives, ch.axes)
                for kind, nb in rc.collectives:
                    by_kind[kind] = by_kind.get(kind, 0) + nb
            elif m in LOSSY:
                dt -= ch.seconds_saved
                by_kind["all-reduce"] = by_kind.get("all-reduce", 0) - ch.bytes_saved
    step = cost.step_time_s + dt if dt >= 0 else max(cost.compute_s, cost.step_time_s + dt)
    by_kind = {k: max(0, int(v)) for k, v in by_kind.items()}
    return dataclasses.replace(cost, step_time_s=step, comm_s=max(0.0, cost.comm_s + dt),
                               comm_bytes=sum(by_kind.values()), comm_bytes_by_kind=by_kind)


def _choices(graph, sim, cands, picks, priced, names, base_cost) -> tuple[CompressionChoice, ...]:
    """Per-gradient choices with their bytes and seconds saved; a gather shared by several
    gradients is charged to the one whose reduction saves most (a kernel, not its bias)."""
    base = _reshard_map(base_cost)
    charged: set = set()
    out = {}
    removed_bytes = {xi: sum(base[k][1] for k in priced[xi]["removed"]) for xi, on in enumerate(picks) if on}
    for xi in sorted(removed_bytes, key=lambda i: -removed_bytes[i]):
        ci, method = names[xi]
        c, pr = cands[ci], priced[xi]
        rem_b = sum(base[k][1] for k in pr["removed"])
        rem_s = sum(base[k][0] for k in pr["removed"])
        if method == "lossless":
            new = _reshard_map(pr["cost"])
            rs_in = {graph.ops[s].inputs[p] for s, m in c.sources if m == "row_sparse" for p in (1, 2)}
            added = [k for k in pr["added"] if k not in charged and k[0] not in rs_in]
            charged.update(added)
            add_b = sum(new[k][1] for k in added)
            add_s = sum(new[k][0] for k in added)
            for s, m in c.sources:
                if m == "row_sparse":
                    rc = _row_sparse_cost(graph, graph.ops[s], c.axes, sim.mesh.axes)
                    add_b += sum(b for _, b in rc.collectives)
                    add_s += _collective_seconds(sim, rc.collectives, c.axes)
            out[xi] = CompressionChoice(c.gradient, lossless_label(c), c.sources, c.axes,
                                        int(rem_b - add_b), rem_s - add_s)
        else:
            lc = pr["lossy"]
            add_s = _collective_seconds(sim, lc.collectives, c.axes)
            out[xi] = CompressionChoice(c.gradient, method, ((c.sources[0][0], method),), c.axes,
                                        int(rem_b - sum(b for _, b in lc.collectives)), rem_s - add_s,
                                        exact=False)
    return tuple(out[xi] for xi in sorted(out))


def select_compression(graph: OpGraph, op_strategies, strategy: Strategy, simulator, mode: str = "lossless", *,
                       memory_limit: float | None = None, time_limit_s: float = 10.0,
                       deadline: float | None = None) -> Selection:
    """Per-gradient compression of `strategy` (see the module docstring). `simulator`: a
    `tag_jax.cost.Simulator` of this graph on `strategy.mesh` (with `carried`, as the planner's).

    Returns a `Selection` whose cost is never worse than the uncompressed plan's (simulated, and
    within `memory_limit` when given)."""
    check_mode(mode)
    sim = simulator
    base_cost = sim.cost(strategy, per_op=True)
    empty = Selection(strategy, (), base_cost, base_cost, dict(candidates=0, status="off", objective=None))
    if mode == "none":
        return empty
    cands = candidates(graph, op_strategies, strategy, base_cost, mode)
    if not cands:
        return dataclasses.replace(empty, model=dict(candidates=0, status="no eligible gradient", objective=None))
    if deadline is not None:  # the largest gradients first: they save the most
        cands = sorted(cands, key=lambda c: -(graph.tensors[c.root].nbytes if c.root is not None else 0))
    prob, priced = build_problem(graph, op_strategies, strategy, sim, cands, base_cost, deadline)
    picks, info = solve(prob, time_limit_s)
    info.update(candidates=len(cands), variables=len(prob.names) + prob.n_b + 1, rows=len(prob.const),
                base_objective=prob.objective([0] * len(prob.names)))

    def judged(pk):
        ops = [i for xi, on in enumerate(pk) if on and prob.names[xi][1] == "lossless"
               for i in cands[prob.names[xi][0]].ops]
        st = _with_ops(strategy, sorted(set(ops)))
        ch = _choices(graph, sim, cands, pk, priced, prob.names, base_cost)
        cost = compressed_cost(graph, op_strategies, sim, st, ch)
        fits = memory_limit is None or cost.peak_memory_bytes <= memory_limit
        return (cost.step_time_s if fits else math.inf), st, ch, cost

    base_score = base_cost.step_time_s if memory_limit is None or base_cost.peak_memory_bytes <= memory_limit \
        else math.inf
    best = (base_score, strategy, (), base_cost)
    score = judged(picks)
    info["milp_judged_s"] = score[0]
    info["kept"] = "milp"
    if score[0] <= best[0]:
        best = score
    else:
        info["kept"] = "repaired"  # drop choices one at a time, least model benefit first, while that helps
        cur = list(picks)
        on = [xi for xi, v in enumerate(cur) if v]
        for xi in sorted(on, key=lambda i: -prob.objective([int(j == i) for j in range(len(cur))])):
            trial = list(cur)
            trial[xi] = 0
            s = judged(trial)
            if s[0] < score[0]:
                cur, score = trial, s
        if score[0] <= best[0]:
            best = score
        singles = sorted(range(len(picks)), key=lambda i: prob.objective([int(j == i) for j in range(len(picks))]))
        for xi in singles[:3]:
            s = judged([int(j == xi) for j in range(len(picks))])
            if s[0] < best[0]:
                best = s
    _, st, ch, cost = best
    if not ch:
        info["kept"] = "none"
    name = strategy.name if not ch else f"{strategy.name} + compression"
    return Selection(dataclasses.replace(st, name=name), ch, cost, base_cost, info)


# ---- inside the search: compression-aware choice among the search's candidates ---------------------

def joint_select(graph: OpGraph, topology, result, device_ids: Sequence[int], mode: str = "lossless", *,
                 mesh_shape=None, axis_names=None, permute: bool = True, memory_limit: float | None = None,
                 time_limit_s: float = 5.0, deadline: float | None = None) -> tuple[Selection, Selection]:
    """(joint, after): compression chosen after the search (on its result only) and jointly, on the
    result and on the data-parallel plan of every candidate mesh the search seeds (where SFB and
    row-sparse apply). `joint` is the better of the two, so never worse than `after`.

    `deadline` (a `time.perf_counter()` value) stops trying data-parallel plans once passed; a plan
    whose compute alone is slower than the best so far is skipped (compression only adds compute)."""
    from tag_jax import rules
    from tag_jax.baselines import baseline_strategy
    from tag_jax.cost import Simulator
    from tag_jax.search.anneal import candidate_meshes
    from tag_jax.search.propagate import carried_outputs

    carried = carried_outputs(graph)
    strategies: dict = {}

    def select(strategy):
        key = tuple(strategy.mesh.axes.items())
        if key not in strategies:
            strategies[key] = rules.for_graph(graph, strategy.mesh.axes)
        ops = strategies[key]
        sim = Simulator(graph, ops, topology, strategy.mesh, carried=carried)
        return select_compression(graph, ops, strategy, sim, mode, memory_limit=memory_limit,
                                  time_limit_s=time_limit_s, deadline=deadline), ops

    after, _ = select(result.strategy)
    best = after
    if mode == "none":
        return after, after
    seen = set()
    for mesh in candidate_meshes(device_ids, topology, mesh_shape, axis_names, permute, leave_out=permute):
        if mesh in seen or len(seen) >= 4:
            continue
        seen.add(mesh)
        key = tuple(mesh.axes.items())
        if key not in strategies:
            strategies[key] = rules.for_graph(graph, mesh.axes)
        if deadline is not None and time.perf_counter() > deadline:
            break
        sim = Simulator(graph, strategies[key], topology, mesh, carried=carried)
        dp = baseline_strategy("data_parallel", graph, strategies[key], mesh, simulator=sim)
        bound = sim.cost(dp)
        if bound.compute_s >= best.cost.step_time_s:
            continue
        sel, _ = select(dataclasses.replace(dp, name=f"data_parallel {mesh.axes}"))
        if sel.cost.step_time_s < best.cost.step_time_s and (
                memory_limit is None or sel.cost.peak_memory_bytes <= memory_limit):
            best = sel
    # judged against the search's own (uncompressed) best, whatever plan it started from
    return dataclasses.replace(best, base_cost=after.base_cost), after
