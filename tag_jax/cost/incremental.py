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

    def _tensor_cost(self, t, changes, new_tsh) -> float:
        sh, sim = self.sim._sh, self.sim
        src = int(new_tsh.get(t, self.tsh[t]))
        dsts = set()
        for i, p in sh["consumers_of"][t]:
            c = changes.get(i, self.choices[i])
            dsts.add(int(sh["want"][sh["in_base"][i] + c * sh["nin"][i] + p]))
        if t in self._carried:
            dsts.add(int(self.tsh[self._carried[t]]))
        elif t in self._outputs:
            s = sh["sh"].items[src]
            if s.partial:
                dsts.add(sh["sh"](s.without_partial()))
                sim._ensure_shards()
        dsts.discard(src)
        return sum(sim.price(t, src, d)[0] for d in dsts)

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
