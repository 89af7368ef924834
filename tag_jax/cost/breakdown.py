"""Per-device breakdown of a predicted step: each device's own compute, idle, communication, memory.

`Simulator` prices a step at the pace of the slowest device: every op runs at the MINIMUM FLOP/s
and memory bandwidth among the mesh's devices (work is split evenly, and collectives make every
device wait for the slowest shard). `breakdown` says what that means for each device:

- `compute_s`: the same ops and shards priced with this device's own figures (the Simulator's
  roofline, run on a copy of the mesh's devices that all have this device's FLOP/s and memory
  bandwidth). The slowest device's busy time is the Cost's `compute_s`; when no single
  device is slowest in all three figures (16-bit FLOP/s, fp32 FLOP/s, memory bandwidth, e.g. P100
  next to 1080Ti), every device's busy time is below it.
- `idle_s`: `cost.compute_s - compute_s`, the compute time the device spends waiting for the pace
  the slowest figures set (0 for the slowest, positive for faster ones).
- `comm_s`: the collectives of the step (the Cost's reshards, and shard_map bodies' own) priced
  on this device's own group
  (`Topology.collective_time` per group, the call `reshard.comm_time` takes the maximum of); the
  Cost's `comm_s` is the sum over collectives of the slowest group, so it bounds every device's.
  Compression the Simulator cannot express (row-sparse, lossy) is not in the per-device figure.
- `comm_bytes`: the Cost's per-device collective result bytes (the same on every device of an
  SPMD program); `peak_memory_bytes`: the Cost's per-device peak (shards are even, so it is the
  same everywhere); `memory_bytes`: the device's capacity, `memory_fraction` the share used.

`group_rows` merges like devices (same kind and figures) for clusters too large to list.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from tag_jax.cost.simulate import Cost, Simulator
from tag_jax.strategy import MeshSpec, OpStrategy, Strategy


@dataclasses.dataclass(frozen=True)
class DeviceRow:
    """One device's share of a predicted step (see the module docstring); `devices` lists the ids a
    grouped row stands for (just `device` for one device), `nodes` their nodes."""

    device: int
    kind: str
    node: int
    compute_s: float
    idle_s: float
    comm_s: float
    comm_bytes: int
    peak_memory_bytes: int
    memory_bytes: float
    devices: tuple[int, ...] = ()
    nodes: tuple[int, ...] = ()
    comm_s_min: float | None = None  # grouped rows: the least comm_s in the group (comm_s the most)

    @property
    def memory_fraction(self) -> float:
        return self.peak_memory_bytes / self.memory_bytes if self.memory_bytes else float("inf")


def breakdown(graph, op_strategies: Sequence[Sequence[OpStrategy]], strategy: Strategy, topology,
              cost: Cost | None = None, *, carried: Mapping[int, int] | None = None,
              simulator: Simulator | None = None) -> tuple[DeviceRow, ...]:
    """One `DeviceRow` per device of `strategy.mesh`, in mesh order.

    `cost` is the prediction to break down (e.g. `Plan.cost`; priced here when None); `carried`
    as for `Simulator` (a plan's steady state: `tag_jax.search.propagate.carried_outputs(graph)`).
    A `simulator` already built for this graph, topology and mesh is reused.
    """
    mesh = strategy.mesh
    sim = simulator or Simulator(graph, op_strategies, topology, mesh, carried=carried)
    priced = cost if cost is not None and cost.reshards is not None else sim.cost(strategy, per_op=True)
    cost = cost if cost is not None else priced
    busy = _busy_by_figures(graph, op_strategies, strategy, topology, sim, cost, carried)
    comm = _comm_by_device(tuple(priced.reshards or ()) + ((None, None, None, sim.manual_comms(), 0.0),),
                           mesh, topology)
    rows = []
    for i in mesh.device_ids:
        d = topology.device(i)
        b = busy[_figures(d)]
        rows.append(DeviceRow(device=i, kind=d.kind, node=d.node, compute_s=b,
                              idle_s=max(0.0, cost.compute_s - b), comm_s=comm.get(i, 0.0),
                              comm_bytes=int(cost.comm_bytes),
                              peak_memory_bytes=int(cost.peak_memory_bytes),
                              memory_bytes=float(d.memory), devices=(i,), nodes=(d.node,)))
    return tuple(rows)


def group_rows(rows: Sequence[DeviceRow]) -> tuple[DeviceRow, ...]:
    """Rows of like devices (kind, figures, capacity, busy time) merged, in order of first
    appearance: `device` is the group's first id, `comm_s` its most and `comm_s_min` its least."""
    groups: dict[tuple, list[DeviceRow]] = {}
    for r in rows:
        key = (r.kind, r.compute_s, r.memory_bytes, r.peak_memory_bytes, r.comm_bytes)
        groups.setdefault(key, []).append(r)
    out = []
    for members in groups.values():
        first = members[0]
        out.append(dataclasses.replace(
            first, comm_s=max(r.comm_s for r in members),
            comm_s_min=min(r.comm_s for r in members),
            devices=tuple(d for r in members for d in r.devices),
            nodes=tuple(sorted({n for r in members for n in r.nodes}))))
    return tuple(out)


def _figures(d) -> tuple[float, float, float, float]:
    return (d.flops, d.flops_fp32, d.matmul_flops_fp32, d.memory_bandwidth)


def _busy_by_figures(graph, op_strategies, strategy, topology, sim, cost, carried) -> dict:
    """Compute seconds of the step at each distinct (FLOP/s, fp32 FLOP/s, fp32 matmul FLOP/s,
    bandwidth) of the mesh.

    Each is the Simulator's compute time on a copy of the topology where every mesh device has
    those figures. The copy's mesh devices get fresh ids (and the strategy a mesh of them), so the
    per-graph arrays of `sim` are reused while its per-mesh compute table is never.
    """
    mesh = strategy.mesh
    kinds = {_figures(topology.device(i)) for i in mesh.device_ids}
    if len(kinds) == 1:  # homogeneous: the Simulator's pace is every device's own
        return {kinds.pop(): float(cost.compute_s)}
    out = {}
    step = max(topology.ids) + 1
    on_mesh = set(mesh.device_ids)
    for k, f in enumerate(sorted(kinds)):
        flops, flops32, mm32, bw = f
        shift = (k + 1) * step
        alike = dataclasses.replace(topology, links=(), devices=tuple(
            dataclasses.replace(d, id=d.id + shift, flops=flops, flops_fp32=flops32,
                                flops_fp32_matmul=mm32, memory_bandwidth=bw) for d in topology.devices if d.id in on_mesh))
        moved = MeshSpec(mesh.shape, mesh.axis_names, tuple(i + shift for i in mesh.device_ids))
        s = Simulator(graph, op_strategies, alike, moved, efficiency=sim.efficiency,
                      memory_efficiency=sim.memory_efficiency, carried=carried, _shared=sim._sh)
        out[f] = float(s.cost(dataclasses.replace(strategy, mesh=moved), overlap=False).compute_s)
    return out


def _comm_by_device(reshards, mesh, topology) -> dict[int, float]:
    """Seconds each device spends in the step's collectives, each priced on the device's group."""
    per: dict[tuple, list[tuple[tuple[int, ...], float]]] = {}
    total: dict[int, float] = {}
    for _tid, _src, _dst, comms, _secs in reshards:
        for c in comms:
            key = (c.kind, c.axes, c.bytes)
            if key not in per:
                per[key] = [(g, topology.collective_time(c.kind, c.bytes, g))
                            for g in mesh.groups(c.axes)]
            for g, t in per[key]:
                for i in g:
                    total[i] = total.get(i, 0.0) + t
    return total
