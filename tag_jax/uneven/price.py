"""Pricing an uneven plan with the simulator, program by program.

- A group program runs `grad_fn` on each device's slice of the group's share, with no collective
  (the gradients are reduced once, across all groups, by the combining program). Every device of
  the group does the same work, so its time is the simulator's cost of `grad_fn` traced at the
  LOCAL batch b = share / group size, replicated on one device of the group's kind. The graph is
  re-traced at each local batch the search asks about (no linear scaling of op times: the traced
  FLOPs and bytes are exact at that batch); the MILP's time model is the straight line through two
  such probes, and the chosen shares are priced again exactly.
- The combining program all-reduces every gradient (and metric) leaf over all devices taking part:
  `Topology.collective_time("all-reduce", leaf bytes, devices)` per leaf, on the links between
  groups, in the devices' order.
- The apply program runs `apply_fn` replicated on every device: the slowest device's time.

Mode "one" (one program over all devices, per-device microbatch counts, the all-reduce overlapped
with the last microbatch's backward pass) is priced in `tag_jax.uneven.one` with this `Pricer`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np

from tag_jax.plan import abstract
from tag_jax.uneven.groups import Group
from tag_jax.uneven.shares import GroupModel
from tag_jax.uneven.steps import UnevenStep


class UnevenError(ValueError):
    """An uneven plan cannot be made for these inputs; the message says what to change."""


def global_batch(batch: Any) -> int:
    """The batch size: the leading dimension that every leaf of `batch` shares."""
    leaves = jax.tree_util.tree_leaves_with_path(abstract(batch))
    if not leaves:
        raise UnevenError("the batch has no arrays; an uneven split needs examples to split")
    sizes = {}
    for path, x in leaves:
        where = "batch" + jax.tree_util.keystr(path)
        if not x.shape:
            raise UnevenError(f"{where} is a scalar; every batch leaf needs a leading example dimension")
        sizes[where] = x.shape[0]
    if len(set(sizes.values())) > 1:
        raise UnevenError(f"batch leaves disagree on the number of examples: {sizes}; "
                          "the leading dimension of every leaf must be the example dimension")
    return next(iter(sizes.values()))


def batch_at(batch: Any, n: int) -> Any:
    """Abstract `batch` with `n` examples."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((n,) + tuple(x.shape[1:]), x.dtype),
                                  abstract(batch))


@dataclasses.dataclass(frozen=True)
class Probe:
    """One group program's prediction: per-device time and peak memory at a local batch."""

    local_batch: int
    time_s: float
    peak_memory_bytes: int


class Pricer:
    """Prices the three kinds of program of an uneven plan; traces and costs are memoised (the
    inputs are immutable abstract values, so a memo is only a cache)."""

    def __init__(self, step: UnevenStep, state: Any, batch: Any, topology):
        self.step, self.topology = step, topology
        self.state = abstract(state)
        self.batch = abstract(batch)
        self.n = global_batch(batch)
        self.inputs = abstract(step.inputs(self.state))
        self._graphs: dict[int, Any] = {}
        self._costs: dict[tuple, Probe] = {}
        self._apply: dict[str, Any] = {}
        out = jax.eval_shape(step.grad_fn, self.inputs, batch_at(self.batch, 1))
        self.combined = out  # (grads, metrics): what the combining program reduces
        leaves = jax.tree_util.tree_leaves(out)
        self.combined_bytes = tuple(int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
        resident = _nbytes(self.state) - _nbytes(self.inputs)
        self.resident_bytes = max(0, int(resident))  # state the group program does not read
        self.inputs_bytes = _nbytes(self.inputs)

    # ---- group programs ---------------------------------------------------------------------
    def local_graph(self, b: int):
        if b not in self._graphs:
            from tag_jax.hlo.trace import trace

            grad_fn = self.step.grad_fn

            def local_gradients(params, batch):
                return grad_fn(params, batch)

            local_gradients.__name__ = f"{self.step.name}_gradients_b{b}"
            self._graphs[b] = trace(local_gradients, self.inputs, batch_at(self.batch, b),
                                    roles={"params": "parameter", "batch": "batch"})
        return self._graphs[b]

    def probe(self, b: int, device_id: int) -> Probe:
        """The group program of a device of this kind at local batch b (resident state included)."""
        kind = self.topology.device(device_id)
        key = (b, kind.kind, kind.flops_fp32, kind.matmul_flops_fp32, kind.memory_bandwidth)
        if key not in self._costs:
            cost = _replicated_cost(self.local_graph(b), self.topology, device_id)
            self._costs[key] = Probe(b, cost.step_time_s, cost.peak_memory_bytes)
        return self._costs[key]

    def group_probe(self, b: int, group: Group, local: int = 1, mode: str = "rows") -> Probe:
        """The group program at local batch b in the layout of sub-groups of `local`.

        mode "rows": the gradient work, after all-gathering the sharded parameters within the
        sub-groups (not overlapped); memory: the work's peak plus the state this device keeps
        (1/local of it when sharded). mode "spmd": the simulator's cost of the group's own SPMD
        program (`group_spmd`) at share b x |g|, plus the optimizer state this device keeps."""
        if mode == "spmd":
            gs = self.group_strategy(b, group, local)
            extra = 0 if local == 1 else (self.resident_bytes + self.inputs_bytes) // local
            return Probe(b, gs.cost.step_time_s + self.gather_s(group, local),
                         gs.cost.peak_memory_bytes + (self.resident_bytes if local == 1 else extra))
        p = self.probe(b, group.device_ids[0])
        extra = self.resident_bytes if local == 1 else (self.resident_bytes + self.inputs_bytes) // local
        return Probe(b, p.time_s + self.gather_s(group, local), p.peak_memory_bytes + extra)

    def group_strategy(self, b: int, group: Group, local: int):
        """`group_spmd.GroupStrategy` of the group at local batch b (memoised)."""
        from tag_jax.uneven.group_spmd import group_strategy

        key = ("spmd", b, group.device_ids, local)
        if key not in self._costs:
            self._costs[key] = group_strategy(self.local_graph(b * group.size), self.topology, group, local)
        return self._costs[key]

    def gather_s(self, group: Group, local: int) -> float:
        from tag_jax.uneven import layout

        if local == 1:
            return 0.0
        rows = layout.sub_groups([group.device_ids], local)
        return sum(max(self.topology.collective_time("all-gather", layout.nbytes(x.shape, x.dtype), r)
                       for r in rows)
                   for x in jax.tree_util.tree_leaves(self.inputs)
                   if layout.shard_dim(x.shape, local) is not None)

    def group_model(self, group: Group, probes: tuple[int, int], memory_limit: float | None,
                    local: int = 1, mode: str = "rows") -> GroupModel:
        """Time (and memory) of the group as a straight line in its share, through two probes."""
        lo, hi = (self.group_probe(b, group, local, mode) for b in probes)
        db = hi.local_batch - lo.local_batch
        slope = max(0.0, (hi.time_s - lo.time_s) / db)
        fixed = max(0.0, lo.time_s - slope * lo.local_batch)
        max_share = None
        if memory_limit is not None:
            m_slope = (hi.peak_memory_bytes - lo.peak_memory_bytes) / db
            m0 = lo.peak_memory_bytes - m_slope * lo.local_batch
            if m_slope > 0:
                max_share = max(0, int((memory_limit - m0) // m_slope)) * group.size
            elif m0 > memory_limit:
                max_share = 0
        return GroupModel(group.name, fixed, slope / group.size, group.size, max_share)

    # ---- combining and apply programs ---------------------------------------------------------
    def combine_s(self, device_ids: Sequence[int], groups: Sequence[Group] = (), local: int = 1,
                  reduced: bool = False) -> float:
        """The combining program: one all-reduce per buffer of leaves (local = 1), or per buffer of
        leaves (`layout.buckets`) a reduce-scatter within the sub-groups and an all-reduce of the
        shards across them; the `local` rings across sub-groups run at once, so where they leave a
        node they share its NICs. `reduced`: the groups' programs reduced their gradients already
        (mode "spmd"): no reduce-scatter within the sub-groups."""
        from tag_jax.uneven import layout

        ids = tuple(device_ids)
        if local == 1 and not reduced:
            return sum(self.topology.collective_time("all-reduce", b, ids)
                       for _, b in layout.combine_buffers(self.combined, 1))
        rows = layout.sub_groups([g.device_ids for g in groups], local)
        cols = [tuple(r[c] for r in rows) for c in range(local)]
        topo = self.topology
        share = [max(1.0, local / topo.nics_per_node)
                 if len({topo.device(i).node for i in col}) > 1 else 1.0 for col in cols]
        t = 0.0
        for sharded, b in layout.combine_buffers(self.combined, local):
            if not sharded:
                t += topo.collective_time("all-reduce", b, ids)
                continue
            if not reduced:
                t += max(topo.collective_time("reduce-scatter", b / local, r) for r in rows)
            t += max(topo.collective_time("all-reduce", b / local * k, col) for col, k in zip(cols, share))
        return t

    def apply_probe(self, device_id: int, local: int = 1) -> Probe:
        """The optimizer update on one device's shards (the whole state when local = 1)."""
        from tag_jax.uneven import layout

        d = self.topology.device(device_id)
        key = (d.kind, local)
        if key not in self._apply:
            from tag_jax.hlo.trace import trace

            apply_fn = self.step.apply_fn

            def apply_update(state, grads):
                return apply_fn(state, grads)

            apply_update.__name__ = f"{self.step.name}_apply"
            graph = self._apply.get(("graph", local))
            if graph is None:
                graph = self._apply[("graph", local)] = trace(
                    apply_update, layout.local_abstract(self.state, local),
                    layout.local_abstract(self.combined[0], local), roles={"grads": "gradient"})
            cost = _replicated_cost(graph, self.topology, device_id)
            self._apply[key] = Probe(0, cost.step_time_s, cost.peak_memory_bytes)
        return self._apply[key]


def _replicated_cost(graph, topology, device_id: int, per_op: bool = False):
    """The simulator's cost of the graph run whole on one device (`per_op`: with op times)."""
    from tag_jax import rules
    from tag_jax.cost import Simulator
    from tag_jax.strategy import MeshSpec, Strategy, TensorSharding

    mesh = MeshSpec((1,), ("data",), (device_id,))
    ops = rules.for_graph(graph, mesh.axes)
    strategy = Strategy(mesh, (0,) * len(graph.ops),
                        tuple(TensorSharding.replicated(len(graph.tensors[t].shape)) for t in graph.inputs),
                        name="replicated")
    return Simulator(graph, ops, topology, mesh).cost(strategy, per_op=per_op)


def _nbytes(tree) -> int:
    return sum(int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))
