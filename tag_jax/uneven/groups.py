"""Device groups: runs of like devices that each run one SPMD program of their own.

A group is the devices of one kind on one node (by="node", the default: its program's collectives
stay on the node's fast links) or of one kind anywhere (by="kind"). Within a group every device does
the same work, so a group is only as fast as its slowest member; that is why groups hold like devices.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from tag_jax.topology import TopologyError


@dataclasses.dataclass(frozen=True)
class Group:
    """One sub-mesh: `device_ids` (indices in jax.devices()), all of device kind `kind`."""

    name: str
    kind: str
    device_ids: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.device_ids)


def device_groups(topology, device_ids: Sequence[int] | None = None, *, by: str = "node") -> tuple[Group, ...]:
    """The groups of `device_ids` (default: all of the topology's), fastest kind first.

    Devices of one group share a kind (and with by="node" a node); groups keep the devices' order.
    """
    if by not in ("node", "kind"):
        raise ValueError(f"device_groups(by={by!r}): group devices by 'node' (kind and node) or 'kind'")
    ids = topology.ids if device_ids is None else topology.check_ids(device_ids)
    if not ids:
        raise TopologyError("device_groups needs at least one device id")
    runs: dict[tuple, list[int]] = {}
    for i in ids:
        d = topology.device(i)
        key = (d.kind, d.node) if by == "node" else (d.kind,)
        runs.setdefault(key, []).append(i)
    groups = [Group(f"{key[0]}@node{key[1]}" if by == "node" else key[0], key[0], tuple(members))
              for key, members in runs.items()]
    # fastest first (fp32 matmul peak, then memory bandwidth): reports and the LP read best that way
    speed = {g.name: (topology.device(g.device_ids[0]).matmul_flops_fp32,
                      topology.device(g.device_ids[0]).memory_bandwidth) for g in groups}
    return tuple(sorted(groups, key=lambda g: (-speed[g.name][0], -speed[g.name][1], g.device_ids[0])))


def check_groups(groups: Sequence[Group], topology=None) -> tuple[Group, ...]:
    """The groups as a tuple, after checking they are non-empty, named uniquely and disjoint."""
    groups = tuple(groups)
    if not groups:
        raise ValueError("an uneven plan needs at least one device group")
    seen: dict[int, str] = {}
    names = set()
    for g in groups:
        if not g.device_ids:
            raise ValueError(f"device group {g.name!r} has no devices")
        if g.name in names:
            raise ValueError(f"two device groups are named {g.name!r}; names must be unique")
        names.add(g.name)
        for i in g.device_ids:
            if i in seen:
                raise ValueError(f"device {i} is in groups {seen[i]!r} and {g.name!r}; "
                                 "a device belongs to one group")
            seen[i] = g.name
        if topology is not None:
            topology.check_ids(g.device_ids)
    return groups
