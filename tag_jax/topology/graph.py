"""The topology graph: devices (what computes) and links (what connects them).

Every pair of devices has a link. Most pairs take the topology's `intra_node` or `inter_node`
link; `links` overrides single pairs, which is how heterogeneous machines and arbitrary graphs are
written down. On a torus (TPU ICI) the pair link is the ICI link with one latency per hop.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
from typing import Iterable, Sequence

import numpy as np

from tag_jax.topology.errors import TopologyError


@dataclasses.dataclass(frozen=True)
class Device:
    """One accelerator; `id` is its index in `jax.devices()`. Figures are vendor dense peaks."""

    id: int
    kind: str
    flops: float             # FLOP/s, dense 16-bit peak where the device has tensor/matrix units
    flops_fp32: float        # FLOP/s, dense fp32 peak
    memory: float            # bytes
    memory_bandwidth: float  # bytes/s
    node: int                # machine (GPU host) or slice (TPU): devices sharing the fast link
    coords: tuple[int, ...] | None = None  # position in its node's torus, when there is one
    # FLOP/s of a float32 matmul or convolution at JAX's default precision, which is not true fp32
    # where the hardware has a faster path: TF32 tensor cores on NVIDIA Ampere and later, one
    # bf16 pass on TPU. None: no such path (`flops_fp32`).
    flops_fp32_matmul: float | None = None

    @property
    def matmul_flops_fp32(self) -> float:
        """What a float32 dot/conv runs at by default (`flops_fp32_matmul`, else `flops_fp32`)."""
        return self.flops_fp32 if self.flops_fp32_matmul is None else self.flops_fp32_matmul


@dataclasses.dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s, each direction
    latency: float    # seconds per message

    def __post_init__(self):
        if not (self.bandwidth > 0 and 0 <= self.latency < math.inf):
            raise TopologyError(f"Link(bandwidth={self.bandwidth!r}, latency={self.latency!r}): "
                                "bandwidth must be > 0 bytes/s and latency >= 0 seconds")


@dataclasses.dataclass(frozen=True)
class Topology:
    """Devices and links; immutable and hashable. Device ids are the keys of every method.

    `nics_per_node`: how many of a node's devices can use `inter_node` bandwidth at once (1 for a
    machine with one Ethernet card, 8 for a DGX with one InfiniBand card per GPU); more concurrent
    streams leaving a node share them.
    """

    devices: tuple[Device, ...]
    intra_node: Link
    inter_node: Link
    links: tuple[tuple[int, int, Link], ...] = ()  # per-pair overrides, stored with a < b
    torus: tuple[int, ...] | None = None           # shape of each node's ICI torus
    nics_per_node: int = 1
    name: str = "custom"
    notes: tuple[str, ...] = dataclasses.field(default=(), compare=False)  # what was guessed

    def __post_init__(self):
        devices = tuple(self.devices)
        if not devices:
            raise TopologyError("a topology needs at least one device")
        seen = set()
        for d in devices:
            if d.id in seen:
                raise TopologyError(f"device id {d.id} appears twice in topology '{self.name}'; "
                                    "ids must be unique (they index jax.devices())")
            seen.add(d.id)
        links = []
        for a, b, link in self.links:
            for x in (a, b):
                if x not in seen:
                    raise TopologyError(f"link ({a}, {b}): device {x} is not in topology "
                                        f"'{self.name}' (ids {_id_range(seen)})")
            if a == b:
                raise TopologyError(f"link ({a}, {b}): a device has no link to itself")
            links.append((min(a, b), max(a, b), link))
        if self.nics_per_node < 1:
            raise TopologyError(f"nics_per_node must be at least 1, got {self.nics_per_node}")
        if self.torus is not None:
            devices = _place_on_torus(devices, tuple(self.torus))
        object.__setattr__(self, "devices", devices)
        object.__setattr__(self, "links", tuple(sorted(links, key=lambda t: t[:2])))
        object.__setattr__(self, "torus", None if self.torus is None else tuple(self.torus))
        object.__setattr__(self, "notes", tuple(self.notes))

    # ---- devices -------------------------------------------------------------------------------
    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(d.id for d in self.devices)

    @property
    def nodes(self) -> tuple[tuple[int, ...], ...]:
        """Device ids grouped by node, nodes in ascending order."""
        groups: dict[int, list[int]] = {}
        for d in self.devices:
            groups.setdefault(d.node, []).append(d.id)
        return tuple(tuple(groups[k]) for k in sorted(groups))

    def device(self, i: int) -> Device:
        return self.devices[self._index(i)]

    def device_flops(self, i: int) -> float:
        return self.device(i).flops

    def device_memory(self, i: int) -> float:
        return self.device(i).memory

    def device_memory_bandwidth(self, i: int) -> float:
        return self.device(i).memory_bandwidth

    @functools.cached_property
    def _positions(self) -> dict[int, int]:
        return {d.id: k for k, d in enumerate(self.devices)}

    @functools.cached_property
    def _memo(self) -> dict:
        """Derived results (ring bandwidths) keyed by arguments; safe because self is immutable."""
        return {}

    @functools.cached_property
    def _overrides(self) -> dict[tuple[int, int], Link]:
        return {(a, b): link for a, b, link in self.links}

    def _index(self, i) -> int:
        try:
            return self._positions[i]
        except (KeyError, TypeError):
            raise TopologyError(f"device id {i!r} is not in topology '{self.name}' "
                                f"({self.num_devices} devices, ids {_id_range(self.ids)}); "
                                "use ids from topology.ids") from None

    def check_ids(self, device_ids: Iterable[int]) -> tuple[int, ...]:
        """The ids as a tuple, after checking each exists and none repeats."""
        ids = tuple(device_ids)
        for i in ids:
            self._index(i)
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise TopologyError(f"device id {dup} appears twice in the group {list(ids)}")
        return ids

    # ---- links ---------------------------------------------------------------------------------
    def link(self, a: int, b: int) -> Link:
        """The link from device a to device b; a device reaches itself for free (infinite bw)."""
        da, db = self.device(a), self.device(b)
        if a == b:
            return Link(math.inf, 0.0)
        override = self._overrides.get((min(a, b), max(a, b)))
        if override is not None:
            return override
        if da.node != db.node:
            return self.inter_node
        if self.torus is not None:  # routed over the torus: ICI bandwidth, one latency per hop
            hops = sum(min(abs(x - y), n - abs(x - y))
                       for x, y, n in zip(da.coords, db.coords, self.torus))
            return Link(self.intra_node.bandwidth, self.intra_node.latency * hops)
        return self.intra_node

    def bandwidth_matrix(self) -> np.ndarray:
        """[n, n] bytes/s per direction, rows and columns in `devices` order; 0 on the diagonal."""
        node = np.array([d.node for d in self.devices])
        m = np.where(node[:, None] == node[None, :], self.intra_node.bandwidth,
                     self.inter_node.bandwidth).astype(np.float64)
        for (a, b), link in self._overrides.items():
            i, j = self._positions[a], self._positions[b]
            m[i, j] = m[j, i] = link.bandwidth
        np.fill_diagonal(m, 0.0)
        return m

    def subset(self, device_ids: Sequence[int]) -> Topology:
        """The topology of just these devices, in this order; ids and nodes keep their values."""
        ids = self.check_ids(device_ids)
        if not ids:
            raise TopologyError("subset() needs at least one device id")
        keep = set(ids)
        return dataclasses.replace(
            self, devices=tuple(self.device(i) for i in ids),
            links=tuple(t for t in self.links if t[0] in keep and t[1] in keep),
            name=f"{self.name}[{','.join(map(str, ids))}]" if len(ids) <= 16
            else f"{self.name}[{len(ids)} devices]")

    # ---- collectives (the models live in collectives.py) ----------------------------------------
    def collective_time(self, kind: str, nbytes: float, device_ids: Sequence[int]) -> float:
        """Seconds for one collective over the group; see `tag_jax.topology.collectives`."""
        from tag_jax.topology import collectives
        return collectives.collective_time(self, kind, nbytes, device_ids)

    def ring_bandwidth(self, device_ids: Sequence[int]) -> float:
        """Slowest link of the ring visiting the devices in this order (bytes/s)."""
        from tag_jax.topology import collectives
        return collectives.ring_links(self, self.check_ids(device_ids))[0]

    # ---- construction and serialisation ---------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> Topology:
        """A named topology; `Topology.presets()` lists the names."""
        from tag_jax.topology import presets
        return presets.build(name)

    @staticmethod
    def presets() -> dict[str, str]:
        """Preset names with a one-line description each."""
        from tag_jax.topology import presets
        return {name: desc for name, (desc, _) in presets.PRESETS.items()}

    @classmethod
    def detect(cls, devices=None) -> Topology:
        from tag_jax.topology import detect
        return detect.detect(devices)

    @classmethod
    def from_json(cls, source) -> Topology:
        """From a dict, a JSON string, or a path to a JSON file (format: `jsonio.py`)."""
        from tag_jax.topology import jsonio
        return jsonio.load(source)

    def to_dict(self) -> dict:
        from tag_jax.topology import jsonio
        return jsonio.to_dict(self)

    def to_json(self, path=None) -> str:
        """JSON text that `from_json` reads back to an equal topology; also written to `path`."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    def fingerprint(self) -> str:
        """sha256 of everything that affects cost (not the name or notes): keys plan caches."""
        if "fingerprint" not in self._memo:
            d = self.to_dict()
            d.pop("name", None)
            d.pop("notes", None)
            text = json.dumps(d, sort_keys=True).encode()
            self._memo["fingerprint"] = hashlib.sha256(text).hexdigest()
        return self._memo["fingerprint"]

    def summary(self) -> str:
        """A readable table: one row per run of alike devices on a node, then the links."""
        lines = [f"Topology '{self.name}': {self.num_devices} devices on {len(self.nodes)} "
                 f"node(s), fingerprint {self.fingerprint()[:12]}",
                 f"  {'node':>4}  {'ids':<9} {'kind':<10} {'TFLOP/s':>8} {'fp32':>7} {'f32 mm':>7} "
                 f"{'mem GB':>7} {'mem GB/s':>9} {'link GB/s':>9}"]
        for key, run in itertools.groupby(self.devices, key=lambda d: (
                d.node, d.kind, d.flops, d.flops_fp32, d.matmul_flops_fp32, d.memory,
                d.memory_bandwidth)):
            ids = [d.id for d in run]
            span = str(ids[0]) if len(ids) == 1 else f"{ids[0]}-{ids[-1]}"
            node, kind, fl, fl32, mm32, mem, bw = key
            link = f"{self.link(ids[0], ids[1]).bandwidth / 1e9:g}" if len(ids) > 1 else "-"
            lines.append(f"  {node:>4}  {span:<9} {kind:<10} {fl / 1e12:>8.1f} {fl32 / 1e12:>7.1f} {mm32 / 1e12:>7.1f} "
                         f"{mem / 1e9:>7.1f} {bw / 1e9:>9.0f} {link:>9}")
        torus = f" (torus {'x'.join(map(str, self.torus))})" if self.torus else ""
        lines.append(f"  intra-node {_fmt_link(self.intra_node)}{torus}")
        lines.append(f"  inter-node {_fmt_link(self.inter_node)}, {self.nics_per_node} NIC(s)/node")
        if self.links:
            lines.append(f"  {len(self.links)} per-pair link(s) override these (see to_json())")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def _fmt_link(link: Link) -> str:
    return f"{link.bandwidth / 1e9:g} GB/s per direction, {link.latency * 1e6:g} us"


def _id_range(ids) -> str:
    ids = sorted(ids)
    if ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}..{ids[-1]}"
    return str(ids) if len(ids) <= 16 else f"{ids[:16]}..."


def _place_on_torus(devices: tuple[Device, ...], shape: tuple[int, ...]) -> tuple[Device, ...]:
    """Check torus coordinates, or give each node's devices row-major coordinates in id order."""
    if not shape or any(n < 1 for n in shape):
        raise TopologyError(f"torus shape {list(shape)}: expected positive dimension sizes")
    placed, taken = {}, set()
    for node, group in itertools.groupby(sorted(devices, key=lambda d: (d.node, d.id)),
                                         key=lambda d: d.node):
        group = list(group)
        if all(d.coords is None for d in group):
            if len(group) != math.prod(shape):
                raise TopologyError(
                    f"torus shape {list(shape)} holds {math.prod(shape)} devices but node {node} "
                    f"has {len(group)}; give each device its 'coords' or fix the shape")
            group = [dataclasses.replace(d, coords=tuple(map(int, np.unravel_index(k, shape))))
                     for k, d in enumerate(group)]
        for d in group:
            c = d.coords
            if c is None or len(c) != len(shape) or any(not 0 <= x < n for x, n in zip(c, shape)):
                raise TopologyError(f"device {d.id}: coords {c} do not lie in torus {list(shape)}")
            if (node, tuple(c)) in taken:
                raise TopologyError(f"device {d.id}: coords {c} are taken twice on node {node}")
            taken.add((node, tuple(c)))
            placed[d.id] = dataclasses.replace(d, coords=tuple(c))
    return tuple(placed[d.id] for d in devices)
