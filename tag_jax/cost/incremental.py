"""Cheap re-pricing of search moves: the no-overlap time of a strategy, updated op by op.

A move changes the choices of a few ops. Only the ops' own compute and the reshards of the tensors
they read and write change, so `Incremental` keeps, per tensor, the seconds of its distinct reshards
(one per target sharding, as `Simulator.cost` dedupes them) and re-prices just those. A partial sum
is priced where the strategy reduces it (`Simulator.cost` moves the reduction to the ops that made
it, `Simulator._partial_roots`): the two agree where partial sums are not carried across ops. The overlap
schedule and peak memory are global; confirm the moves a search keeps with `Simulator.cost`.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Mapping

import numpy as np

from tag_jax.strategy import Strategy

if TYPE_CHECKING:
    from tag_jax.cost.simulate import Simulator


class _Choices:
    """The op choices with a move's changes on top, indexable like the choice array."""

    def __init__(self, choices, changes):
        self.choices, self.changes = choices, changes

    def __getitem__(self, i):
        return self.changes.get(int(i), self.choices[i])


class Incremental:
    """No-overlap step time (compute + comm) of a strategy, updated cheaply when a few ops change.

    For search moves: `propose({op: choice})` returns the new no-overlap time without changing the
    state; `commit({op: choice})` applies it. The overlap schedule and memory are global, so confirm
    chosen candidates with `Simulator.cost(inc.strategy)`. Input shardings are fixed here.
    """

    def __init__(self, sim: Simulator, strategy: Strategy):
        self.sim = sim
        self.base = strategy
        c, tsh = sim._shardings(strategy)
        self.choices = c.copy()
        self.tsh = tsh
        sh = sim._sh
        self._outputs = set(sh["outputs"].tolist())
        self._carried = sim.carried
        self.comp = sim._comp[sh["row_base"] + c]
        self.contrib = np.zeros(len(sim.graph.tensors))
        for t in np.unique(sh["e_t"]).tolist() + list(self._outputs):
            self.contrib[t] = self._tensor_cost(t, {}, {})
        self.compute_s = float(self.comp.sum())
        self.comm_s = float(self.contrib.sum())

    @property
    def time(self) -> float:
        return self.compute_s + self.comm_s

    @property
    def strategy(self) -> Strategy:
        return dataclasses.replace(self.base, choices=tuple(int(x) for x in self.choices))

    def _select_source(self, t: int, src: int, changes, new_tsh) -> int:
        """`src` without its partial axes when `t` is only a local select, as `Simulator.cost`
        takes it (its fast path and `_partial_roots`): no operand of its producer carries a partial
        sum into it (partial where wanted partial over the same axis) and the producer is
        elementwise or shape-only, or its option makes no sum (`Simulator._makes_sum`: no partial
        axis of the result splits an operand, e.g. a scatter-add of selects); or every partial
        operand carried in is itself such a select (`_pure`)."""
        sim, sh = self.sim, self.sim._sh
        p = int(sh["producer"][t])
        pbits = sim._partial_bits()
        if p < 0 or not pbits[src]:
            return src
        kind = sim._op_kind()
        if kind[p] == 0:
            return src
        c = int(changes.get(p, self.choices[p]))
        base = sh["in_base"][p] + c * sh["nin"][p]
        ins = sim.graph.ops[p].inputs
        carries = any(pbits[self._sharding(u, new_tsh)] & pbits[int(sh["want"][base + k])]
                      for k, u in enumerate(ins))
        if not carries:
            select = kind[p] == 2 or not sim._makes_sum(p, c)
            return int(sim._plain_ids()[src]) if select else src
        items = sh["sh"].items
        return int(sim._plain_ids()[src]) if self._pure(t, frozenset(items[src].partial), changes,
                                                         new_tsh, {}) else src

    def _sharding(self, u: int, new_tsh) -> int:
        return int(new_tsh.get(u, self.tsh[u]))

    def _pure(self, t: int, want: frozenset, changes, new_tsh, memo) -> bool:
        """`Simulator._partial_roots(t)` is empty: t's partial sum (over `want`, the partial axes
        of the tensor the walk started from) was made only by selects. An operand carried in with
        other partial axes than `want` ends the walk at a root, except one partial over more axes,
        or over fewer where the op splits no operand by the others (`Simulator._split_axes`)."""
        if t in memo:
            return memo[t]
        sim, sh = self.sim, self.sim._sh
        memo[t] = False
        p = int(sh["producer"][t])
        kind = sim._op_kind()
        if p < 0 or kind[p] == 0:
            return False
        pbits, items = sim._partial_bits(), sh["sh"].items
        c = int(changes.get(p, self.choices[p]))
        base = sh["in_base"][p] + c * sh["nin"][p]
        ins = [(u, self._sharding(u, new_tsh), int(sh["want"][base + k]))
               for k, u in enumerate(sim.graph.ops[p].inputs)]
        ins = [(u, su) for u, su, w in ins if pbits[su] & pbits[w]]  # carried in
        for _, su in ins:
            have = frozenset(items[su].partial)
            if have == want or have > want:
                continue
            if have < want and not (want - have) & sim._split_axes(p, c):
                continue
            return False  # a root
        if not ins:
            ok = kind[p] == 2 or not sim._makes_sum(p, c)
        else:
            ok = all(self._pure(u, want, changes, new_tsh, memo) for u, _ in ins)
        memo[t] = ok
        return ok

    def _tensor_cost(self, t, changes, new_tsh) -> float:
        sh, sim = self.sim._sh, self.sim
        raw = int(new_tsh.get(t, self.tsh[t]))
        src = self._select_source(t, raw, changes, new_tsh)
        dsts = set()
        for i, p in sh["consumers_of"][t]:
            c = changes.get(i, self.choices[i])
            dsts.add(int(sh["want"][sh["in_base"][i] + c * sh["nin"][i] + p]))
        made = {}
        if src != raw and len(dsts) == 1:  # a select wanted one way is made where it is pinned
            (d,) = dsts
            made[d] = int(sim._select_sources(np.array([t]), np.array([raw]), np.array([d]),
                                              _Choices(self.choices, changes))[0])
        if t in self._carried:
            dsts.add(int(self.tsh[self._carried[t]]))
        elif t in self._outputs:
            s = sh["sh"].items[src]
            if s.partial:
                dsts.add(sh["sh"](s.without_partial()))
                sim._ensure_shards()
        return sum(sim.price(t, made.get(d, src), d)[0] for d in dsts if made.get(d, src) != d)

    def _delta(self, changes: Mapping[int, int]):
        sh, g = self.sim._sh, self.sim.graph
        changes = {int(i): int(c) for i, c in changes.items()}
        new_tsh, touched = {}, set()
        dcomp = 0.0
        for i, c in changes.items():
            if not 0 <= c < sh["nst"][i]:
                raise ValueError(f"choice {c} for {g.ops[i].where()}, which has {sh['nst'][i]} strategies")
            dcomp += self.sim._comp[sh["row_base"][i] + c] - self.comp[i]
            op = g.ops[i]
            for p, t in enumerate(op.outputs):
                new_tsh[t] = int(sh["give"][sh["out_base"][i] + c * sh["nout"][i] + p])
            touched.update(op.inputs)
            touched.update(op.outputs)
        # results downstream may stop (or start) being local selects: follow partial tensors
        pbits = self.sim._partial_bits()
        todo = [t for i in changes for t in g.ops[i].outputs]
        seen = set(todo)
        while todo:
            t = todo.pop()
            for k, _ in sh["consumers_of"][t]:
                for o in g.ops[k].outputs:
                    if o not in seen and (pbits[int(self.tsh[o])] or (o in new_tsh and pbits[new_tsh[o]])):
                        seen.add(o)
                        touched.add(o)
                        todo.append(o)
        new = {t: self._tensor_cost(t, changes, new_tsh) for t in touched}
        dcomm = sum(v - self.contrib[t] for t, v in new.items())
        return dcomp, dcomm, new, new_tsh, changes

    def propose(self, changes: Mapping[int, int]) -> float:
        dcomp, dcomm, *_ = self._delta(changes)
        return self.compute_s + dcomp + self.comm_s + dcomm

    def commit(self, changes: Mapping[int, int]) -> float:
        dcomp, dcomm, new, new_tsh, changes = self._delta(changes)
        sh = self.sim._sh
        for i, c in changes.items():
            self.choices[i] = c
            self.comp[i] = self.sim._comp[sh["row_base"][i] + c]
        for t, s in new_tsh.items():
            self.tsh[t] = s
        for t, v in new.items():
            self.contrib[t] = v
        self.compute_s = float(self.comp.sum())
        self.comm_s = float(self.contrib.sum())
        return self.time
