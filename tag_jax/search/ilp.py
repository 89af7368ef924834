"""An Alpa-style ILP baseline over tag_jax's strategy space, solved with `scipy.optimize.milp`.

    ilp_strategy(graph, op_strategies, topology, mesh, *, time_limit_s, memory_limit) -> (Strategy, info)

Alpa's intra-operator pass redone on tag_jax's data, for one mesh:

- variables: one binary one-hot vector s_u per decision unit (`ilp_units`: op classes shared by
  repeated layers, argument groups, trivial ops merged into their operand's unit);
- node cost: sum over ops of compute(op, option) . s (the simulator's per-op compute table);
- edge cost: per tensor, the seconds of resharding it from the sharding its producer gives to each
  DISTINCT sharding its consumers want (as the simulator dedupes reshards), priced with
  `cost.reshard_collectives` + `cost.comm_time` on the topology. Consumers include the carried
  result (new state back to its argument's sharding) and the all-reduce of a partial result.
  Linearised per tensor over (source sharding k, target sharding l) pairs with continuous e_kl:
  one consumer: sum_l e_kl = a_k, sum_k e_kl = b_l (Alpa's tight form); several: w_l >= b_cl for
  each consumer c, sum_k e_kl = w_l, e_kl <= a_k, sum_l e_kl >= a_k;
- memory: bytes per device of the arguments (parameters, optimizer state, batch, state) and of
  the carried results (the new state, sharded as its argument) under the chosen argument
  shardings <= budget. Activations are not modelled linearly: when the simulated
  peak exceeds the limit, the budget is lowered by the excess and the ILP solved again;
- objective: compute + communication with no overlap (the simulator's `overlap=False` time, up
  to its partial-sum-root rule: a partial sum carried into an op pays its reduction there). The
  simulator's overlapped step time of the result is reported beside it.

Tensors of the same shape whose producers and consumers belong to the same units (the same tensor
in every layer) share one set of edge variables with their cost multiplied by their count.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
from scipy.optimize import LinearConstraint, milp
from scipy.sparse import coo_matrix

from tag_jax.cost import Simulator, comm_time, reshard_collectives
from tag_jax.hlo.graph import OpGraph
from tag_jax.search.ilp_units import Units, decision_units
from tag_jax.search.propagate import carried_outputs
from tag_jax.strategy import MeshSpec, Strategy, TensorSharding

_SCALE = 1e6  # objective in microseconds: HiGHS's tolerances are absolute
MEMORY_ROUNDS = 3  # re-solves with a lower argument budget when activations overflow the limit


@dataclasses.dataclass
class _Problem:
    """The MILP under construction: objective, bounds, integrality, sparse rows."""

    c: list
    integral: list
    rows: list  # (row, col, value)
    lb: list
    ub: list
    constant: float = 0.0
    off: set = dataclasses.field(default_factory=set)  # binaries fixed at 0 (options not allowed)

    def var(self, cost: float = 0.0, integral: bool = False) -> int:
        self.c.append(cost)
        self.integral.append(1 if integral else 0)
        return len(self.c) - 1

    def row(self, terms: dict, lb: float, ub: float) -> None:
        r = len(self.lb)
        for col, v in terms.items():
            self.rows.append((r, col, v))
        self.lb.append(lb)
        self.ub.append(ub)


# An indicator: a frozenset of binary variables whose sum it is, or True (constant 1).
def _terms(ind, sign: float = 1.0, into: dict | None = None) -> tuple[dict, float]:
    """Adds `sign * ind` to the row terms `into`; returns (terms, rhs): what moves to the right
    hand side, -sign for the constant indicator True (a row `terms == rhs` then means
    `into + sign * ind == 0`), 0 otherwise."""
    into = {} if into is None else into
    if ind is True:
        return into, -sign
    for v in ind:
        into[v] = into.get(v, 0.0) + sign
    return into, 0.0


def _add(a, b):
    if a is True or b is True:
        return True
    return a | b


class _Builder:
    """Assembles the MILP of one graph on one mesh (module docstring)."""

    def __init__(self, graph: OpGraph, ops, topology, mesh: MeshSpec, units: Units, sim: Simulator):
        self.g, self.ops, self.topology, self.mesh, self.u = graph, ops, topology, mesh, units
        self.base = np.concatenate([[0], np.cumsum([x.size for x in units.units])]).astype(int)
        rb = sim._sh["row_base"]  # the simulator's per-(op, option) compute seconds
        self.compute = [sim._comp[rb[i]:rb[i] + len(ops[i])] for i in range(len(ops))]
        self.carried = carried_outputs(graph)
        self._carried_into = set(self.carried.values())
        self._prices: dict = {}
        self._op_options: dict = {}

    def price(self, t: int, src: TensorSharding, dst: TensorSharding) -> float:
        if src.partial and set(src.partial) <= set(dst.partial):
            # A consumer carrying the partial sum on: XLA reduces it where it is made anyway (the
            # simulator's partial-root rule), so each carry pays the reduction (a chain of carries
            # pays it more than once: the model leans to reducing at the root, as XLA does).
            dst = dst.without_partial()
        if src == dst:
            return 0.0
        tensor = self.g.tensors[t]
        key = (tensor.shape, tensor.dtype.str, src, dst)
        p = self._prices.get(key)
        if p is None:
            comms = reshard_collectives(src, dst, tensor.shape, tensor.dtype, self.mesh)
            p = self._prices[key] = sum(comm_time(c, self.mesh, self.topology) for c in comms)
        return p

    # ---- indicators: sharding -> which unit options produce / want it --------------------------
    def op_options(self, i: int) -> list[tuple[int, Any]]:
        """(op option, indicator) pairs of op i (cached: asked once per use of each tensor)."""
        got = self._op_options.get(i)
        if got is not None:
            return got
        ch = self.u.op_choice[i]
        if ch.unit is None:
            got = [(0, True)]
        else:
            b = self.base[ch.unit]
            allowed = self.u.units[ch.unit].allowed
            by: dict[int, set] = {}
            for k, j in enumerate(ch.of_unit):
                if allowed and not allowed[k]:
                    continue
                by.setdefault(j, set()).add(int(b + k))
            got = [(j, frozenset(v)) for j, v in by.items()]
        self._op_options[i] = got
        return got

    def source(self, t: int) -> dict:
        tensor = self.g.tensors[t]
        if tensor.producer is not None:
            p = tensor.producer
            pos = self.g.ops[p].outputs.index(t)
            out: dict = {}
            for j, ind in self.op_options(p):
                s = self.ops[p][j].outputs[pos]
                out[s] = _add(out.get(s, frozenset()), ind)
            return out
        if t in self.u.input_unit:
            return self.argument(t)
        return {TensorSharding.replicated(len(tensor.shape)): True}  # constants: replicated

    def argument(self, t: int) -> dict:
        ui = self.u.input_unit[t]
        unit = self.u.units[ui]
        if unit.size == 1:
            return {unit.input_options[0]: True}
        return {s: frozenset({int(self.base[ui] + k)}) for k, s in enumerate(unit.input_options)}

    def targets(self, t: int, src: dict) -> list[dict]:
        """One indicator map per distinct consumer (ops, carried result, partial result)."""
        out = []
        for i in self.g.tensors[t].consumers:
            op = self.g.ops[i]
            for pos, x in enumerate(op.inputs):
                if x != t:
                    continue
                want: dict = {}
                for j, ind in self.op_options(i):
                    s = self.ops[i][j].inputs[pos]
                    want[s] = _add(want.get(s, frozenset()), ind)
                out.append(want)
        if t in self.carried:
            out.append(self.argument(self.carried[t]))
        elif t in self.g.outputs and any(s.partial for s in src):
            want = {}
            for s, ind in src.items():
                want[s.without_partial()] = _add(want.get(s.without_partial(), frozenset()), ind)
            out.append(want)
        unique = []
        for w in out:
            if w not in unique:
                unique.append(w)
        return unique

    # ---- the problem ----------------------------------------------------------------------------
    def build(self, budget: float | None) -> _Problem:
        units = self.u.units
        n = int(self.base[-1])
        pb = _Problem(c=[0.0] * n, integral=[1] * n, rows=[], lb=[], ub=[])
        for ui, unit in enumerate(units):  # one-hot
            pb.row({int(self.base[ui] + k): 1.0 for k in range(unit.size)}, 1.0, 1.0)
            pb.off.update(int(self.base[ui] + k) for k, ok in enumerate(unit.allowed) if not ok)
        for i in range(len(self.g.ops)):  # node costs
            for j, ind in self.op_options(i):
                cost = float(self.compute[i][j]) * _SCALE
                if ind is True:
                    pb.constant += cost
                else:
                    for v in ind:
                        pb.c[v] += cost
        edges: dict = {}
        for t in range(len(self.g.tensors)):
            tensor = self.g.tensors[t]
            if not tensor.consumers and t not in self.g.outputs:
                continue
            src = self.source(t)
            tg = self.targets(t, src)
            if not tg:
                continue
            key = (tensor.shape, tensor.dtype.str, tuple(src.items()), tuple(tuple(w.items()) for w in tg))
            if key in edges:
                edges[key][1] += 1
            else:
                edges[key] = [t, 1, src, tg]
        for t, count, src, tg in edges.values():
            self._edge(pb, t, count * _SCALE, src, tg)
        if budget is not None:
            row = {}
            for ui, unit in enumerate(units):
                for k, s in enumerate(unit.input_options):
                    b = sum(self._resident(t) / s.shards(self.mesh.axes) for t in unit.inputs)
                    if b:
                        row[int(self.base[ui] + k)] = b / max(budget, 1.0)
            pb.row(row, -np.inf, 1.0)
        return pb

    def _edge(self, pb: _Problem, t: int, weight: float, src: dict, tg: list[dict]) -> None:
        pairs = {(k, l): self.price(t, k, l) for k in src for w in tg for l in w}
        if not any(pairs.values()):
            return
        if len(src) == 1 and next(iter(src.values())) is True:  # fixed source: linear in targets
            (k,) = src
            ls = {l for w in tg for l in w}
            for l in ls:
                p = weight * pairs[(k, l)]
                if p:
                    self._cost_of_max(pb, [w[l] for w in tg if l in w], p)
            return
        if len(tg) == 1:
            (w,) = tg
            if len(w) == 1 and next(iter(w.values())) is True:  # fixed target: linear in sources
                (l,) = w
                for k, ind in src.items():
                    self._cost_of(pb, ind, weight * pairs[(k, l)])
                return
            e = {(k, l): pb.var(weight * pairs[(k, l)]) for k in src for l in w}
            for k, ind in src.items():  # sum_l e_kl = a_k
                terms, const = _terms(ind, -1.0, {e[(k, l)]: 1.0 for l in w})
                pb.row(terms, const, const)
            for l, ind in w.items():  # sum_k e_kl = b_l
                terms, const = _terms(ind, -1.0, {e[(k, l)]: 1.0 for k in src})
                pb.row(terms, const, const)
            return
        ls = list(dict.fromkeys(l for w in tg for l in w))
        need = {l: self._max_var(pb, [w[l] for w in tg if l in w]) for l in ls}
        e = {(k, l): pb.var(weight * pairs[(k, l)]) for k in src for l in ls}
        for l in ls:  # sum_k e_kl = w_l
            terms, const = _terms(need[l], -1.0, {e[(k, l)]: 1.0 for k in src})
            pb.row(terms, const, const)
        for k, ind in src.items():
            for l in ls:  # e_kl <= a_k
                terms, const = _terms(ind, -1.0, {e[(k, l)]: 1.0})
                pb.row(terms, -np.inf, const)
            terms, const = _terms(ind, -1.0, {e[(k, l)]: 1.0 for l in ls})  # sum_l e_kl >= a_k
            pb.row(terms, const, np.inf)

    def _cost_of(self, pb: _Problem, ind, cost: float) -> None:
        if not cost:
            return
        if ind is True:
            pb.constant += cost
        else:
            for v in ind:
                pb.c[v] += cost

    def _max_var(self, pb: _Problem, inds: list):
        """An indicator equal to the max of `inds` at integer points (w >= each; minimised)."""
        if any(i is True for i in inds):
            return True
        if len(set(inds)) == 1:
            return inds[0]
        w = pb.var()
        for ind in set(inds):
            terms, _ = _terms(ind, -1.0, {w: 1.0})
            pb.row(terms, 0.0, np.inf)
        return frozenset({w})

    def _cost_of_max(self, pb: _Problem, inds: list, cost: float) -> None:
        self._cost_of(pb, self._max_var(pb, inds), cost)

    # ---- decoding -------------------------------------------------------------------------------
    def decode(self, x: np.ndarray, name: str) -> Strategy:
        pick = [int(np.argmax(x[self.base[ui]:self.base[ui + 1]])) for ui in range(len(self.u.units))]
        choices = tuple(0 if ch.unit is None else int(ch.of_unit[pick[ch.unit]]) for ch in self.u.op_choice)
        ins = []
        for t in self.g.inputs:
            ui = self.u.input_unit[t]
            ins.append(self.u.units[ui].input_options[pick[ui]])
        return Strategy(self.mesh, choices, tuple(ins), name=name)

    def _resident(self, t: int) -> float:
        """Bytes an argument keeps resident all step: itself, and its new value when it is carried
        (results sit in the output allocation from the start, sharded as the argument)."""
        return self.g.tensors[t].nbytes * (2 if t in self._carried_into else 1)

    def min_argument_bytes(self) -> float:
        return sum(min(sum(self._resident(t) / s.shards(self.mesh.axes) for t in unit.inputs)
                       for s in unit.input_options)
                   for unit in self.u.units if unit.input_options)


def _solve(pb: _Problem, time_limit_s: float, relaxed: bool = False, fixed: np.ndarray | None = None):
    """HiGHS on the problem; `relaxed`: its LP relaxation; `fixed`: binaries held at 1."""
    n = len(pb.c)
    r, col, v = zip(*pb.rows) if pb.rows else ((), (), ())
    a = coo_matrix((v, (r, col)), shape=(len(pb.lb), n)).tocsr()
    lb, ub = np.zeros(n), np.ones(n)
    ub[list(pb.off)] = 0.0
    if fixed is not None:
        lb[fixed] = 1.0
    return milp(np.asarray(pb.c), integrality=np.zeros(n) if relaxed else np.asarray(pb.integral),
                bounds=(lb, ub), constraints=LinearConstraint(a, pb.lb, pb.ub),
                options={"time_limit": max(time_limit_s, 0.01), "disp": False})


INTEGRAL = 0.999  # an LP value this close to 1 counts as the unit's choice (relax-and-fix)


def _solve_relax_and_fix(pb: _Problem, base: np.ndarray, time_limit_s: float):
    """The LP relaxation first; the units it already sets (one option at ~1) are fixed there and
    the MIP is solved over the rest. On the 1-D meshes of the zoo the relaxation is integral for
    most units (resnet-50 on 2x4-v100-25gbe: 614 of 888), so this finds the same plan in half the
    time or less. Where that plan is not proven optimal (its objective above the LP bound) and at
    least twice the time it took is left, the whole MIP runs with the rest too (resnet-50 on
    1x8-a100-nvlink: the whole MIP needs 4.5 s). The LP gets half the time at most (on 2-D meshes
    it may not finish); without it, the whole MIP gets what is left.
    Returns (candidates, LP bound or nan): (result, units fixed: 0 for the whole MIP) for each
    solve that found a plan, the fixed one first; empty when time ran out. A result with status 2
    (infeasible) comes alone."""
    t0 = time.perf_counter()
    lp = _solve(pb, time_limit_s / 2, relaxed=True)
    left = time_limit_s - (time.perf_counter() - t0)
    if left <= 0.05:  # no time left (HiGHS takes its setup time even when told 0 s)
        return [], math.nan
    if lp.x is None:
        whole = _solve(pb, left)
        return ([(whole, 0)] if whole.x is not None or whole.status == 2 else []), math.nan
    bound = float(lp.fun)
    fixed = [int(base[u] + np.argmax(lp.x[base[u]:base[u + 1]])) for u in range(len(base) - 1)
             if lp.x[base[u]:base[u + 1]].max() >= INTEGRAL]
    res = _solve(pb, left, fixed=np.asarray(fixed, dtype=int))
    took = time.perf_counter() - t0
    left = time_limit_s - took
    out = [(res, len(fixed))] if res.x is not None else []
    if res.status == 2:  # the fixed units leave the rest no feasible choice (memory): the whole MIP
        whole = _solve(pb, left) if left > 0.05 else None
        return ([(whole, 0)] if whole is not None and (whole.x is not None or whole.status == 2)
                else []), bound
    if (res.x is None or not _proven(float(res.fun), bound)) and left >= 2 * took:
        whole = _solve(pb, left)
        if whole.x is not None:
            out.append((whole, 0))
    return out, bound


def _pick(candidates, builder, sim, memory_limit):
    """The candidate (result, units fixed) whose plan the simulator prices fastest, fitting first."""
    if len(candidates) == 1 or candidates[0][0].x is None:
        return candidates[0]

    def key(c):
        cost = sim.cost(builder.decode(c[0].x, "ilp"))
        return (memory_limit is not None and cost.peak_memory_bytes > memory_limit, cost.step_time_s)

    return min(candidates, key=key)


def _proven(objective: float, bound: float) -> bool:
    """An objective within HiGHS's own relative gap (1e-4) of a lower bound is optimal."""
    return bound == bound and (objective - bound) <= 1e-4 * max(abs(bound), 1e-12)


def ilp_strategy(graph: OpGraph, ops, topology, mesh: MeshSpec, *, time_limit_s: float = 30.0,
                 memory_limit: float | None = None, merge: bool = True,
                 simulator: Simulator | None = None,
                 limit_includes_build: bool = False,
                 relax_and_fix: bool = False, fallback: bool = True) -> tuple[Strategy | None, dict]:
    """Solve the ILP (module docstring) on `mesh`; returns the Strategy and an info dict:
    objective_s (the ILP's model time), status ("optimal" / "time-limited" / "no solution in time
    limit: data_parallel"), variables, integer_variables, constraints, units, merged_ops,
    build_s, solve_s, seconds, rounds, cost (the simulator's Cost of the strategy).

    `simulator`: a `Simulator` of the same graph, options, topology and mesh (with the carried
    results) to reuse, as the planner has one; built here otherwise (for large graphs that is a
    good part of the time outside the solver). `limit_includes_build`: `time_limit_s` bounds the
    whole call (building the problem included, as a caller with a time budget wants), not only
    the solver's time. `relax_and_fix`: solve the LP relaxation first and fix the units it
    already decides (`_solve_relax_and_fix`; faster on large graphs, exact only when the status
    says "optimal"; otherwise "optimal over the LP's free units" and `lp_gap`, the relative gap to
    the relaxation's bound, say how far from proven). `fallback=False`: with no solution in
    time, return (None, info) at once instead of data parallel priced in its place (the planner has
    that seed already)."""
    from tag_jax.plan import _bytes
    from tag_jax.search.planner import PlanningError

    t0 = time.perf_counter()
    sim = simulator if simulator is not None else Simulator(graph, ops, topology, mesh,
                                                            carried=carried_outputs(graph))
    units = decision_units(graph, ops, mesh, merge=merge)
    b = _Builder(graph, ops, topology, mesh, units, sim)
    if memory_limit is not None and b.min_argument_bytes() > memory_limit:
        raise PlanningError(
            f"no ILP plan fits the memory limit of {_bytes(memory_limit)} per device: the arguments "
            f"(parameters, optimizer state, batch) alone need at least {_bytes(b.min_argument_bytes())} "
            f"per device on mesh {mesh.axes} even split as far as it allows; use more devices, a "
            "smaller batch, or a larger memory_limit")
    budget = memory_limit
    info: dict = {}
    solve_s = build_s = 0.0
    cost = cost_of = None
    for rnd in range(1, MEMORY_ROUNDS + 1):
        tb = time.perf_counter()
        pb = b.build(budget)
        build_s += time.perf_counter() - tb
        ts = time.perf_counter()
        left = time_limit_s - (time.perf_counter() - t0 if limit_includes_build else solve_s)
        # no time left after building: HiGHS would still take its setup time before stopping
        bound, fixed, candidates = math.nan, 0, []
        if left <= 0.05 and limit_includes_build:
            res = None
        elif relax_and_fix:
            candidates, bound = _solve_relax_and_fix(pb, b.base, left)
            # the ILP's objective is the no-overlap time: among plans it finds (about) as good,
            # the simulator's step time, with overlap, picks (moe-base on tag-hetero: the fixed
            # plan 0.992 s, the whole MIP's equally optimal-looking one 1.003 s)
            res, fixed = _pick(candidates, b, sim, memory_limit) if candidates else (None, 0)
        else:
            res = _solve(pb, left)
        solve_s += time.perf_counter() - ts
        info = dict(variables=len(pb.c), integer_variables=int(sum(pb.integral)),
                    constraints=len(pb.lb), units=len(units.units), merged_ops=units.merged,
                    rounds=rnd, budget_bytes=budget)
        if relax_and_fix:
            info["fixed_units"] = fixed
        if res is None or res.x is None:
            if res is not None and res.status == 2 and memory_limit is None:
                raise PlanningError(f"the ILP over mesh {mesh.axes} has no feasible solution although "
                                    "no memory limit was set: a bug in tag_jax.search.ilp, please report")
            if res is not None and res.status == 2:  # infeasible: the argument budget cannot be met
                raise PlanningError(
                    f"no ILP plan fits the memory limit of {_bytes(memory_limit)} per device: with "
                    f"activations the arguments must fit in {_bytes(budget)}, which no choice on "
                    f"mesh {mesh.axes} meets; use more devices, a smaller batch, or a larger "
                    "memory_limit")
            if not fallback:
                info.update(status="no solution in time limit", objective_s=math.nan,
                            build_s=build_s, solve_s=solve_s, seconds=time.perf_counter() - t0)
                return None, info
            from tag_jax.baselines import baseline_strategy

            strategy = baseline_strategy("data_parallel", graph, ops, mesh, simulator=sim,
                                         memory_limit=memory_limit)
            strategy = dataclasses.replace(strategy, name="ilp (no solution in time: data_parallel)")
            info.update(status="no solution in time limit: data_parallel", objective_s=math.nan)
            break
        strategy = b.decode(res.x, "ilp")
        status = "optimal" if res.status == 0 else "time-limited"
        if relax_and_fix:
            info["lp_gap"] = (float(res.fun) - bound) / max(abs(bound), 1e-12) if bound == bound else math.nan
            proven = [float(r.fun) for r, k in candidates if r.status == 0 and not k]  # whole MIP
            if fixed and status == "optimal" and not _proven(float(res.fun), bound) and not (
                    proven and float(res.fun) <= min(proven) + 1e-9 * abs(min(proven))):
                status = "optimal over the LP's free units"
        info.update(status=status, objective_s=(float(res.fun) + pb.constant) / _SCALE,
                    mip_gap=float(getattr(res, "mip_gap", math.nan) or 0.0))
        cost, cost_of = sim.cost(strategy), strategy
        excess = 0.0 if memory_limit is None else cost.peak_memory_bytes - memory_limit
        spent = time.perf_counter() - t0 if limit_includes_build else solve_s
        if excess <= 0 or spent >= time_limit_s:
            break
        budget = budget - 1.05 * excess
        if budget < b.min_argument_bytes():
            break
    cost = sim.cost(strategy) if cost is None or cost_of is not strategy else cost
    if memory_limit is not None and cost.peak_memory_bytes > memory_limit:
        raise PlanningError(
            f"no ILP plan fits the memory limit of {_bytes(memory_limit)} per device: the best "
            f"found peaks at {_bytes(cost.peak_memory_bytes)} (activations included) after {info['rounds']} "
            f"round(s) on mesh {mesh.axes}; use more devices, a smaller batch, a larger memory_limit "
            "or a longer time_limit_s")
    info.update(build_s=build_s, solve_s=solve_s, seconds=time.perf_counter() - t0, cost=cost,
                step_time_s=cost.step_time_s,
                no_overlap_s=sim.cost(strategy, overlap=False).step_time_s)
    return strategy, info
