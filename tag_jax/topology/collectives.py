"""How long a collective takes on a group of devices: alpha-beta models.

`nbytes` (S) is the per-device RESULT size: all-reduce the array; all-gather the gathered array;
reduce-scatter the shard each device keeps (s); all-to-all the per-device buffer; permute the bytes
each device sends. n devices, alpha the message latency, B the bandwidth per direction.

Ring (one node, or any group as a flat ring; B = slowest link on the ring, alpha = largest latency):
    all-gather      (n-1) (alpha + S / (n B))
    reduce-scatter  (n-1) (alpha + s / B)
    all-reduce      2 (n-1) (alpha + S / (n B))        reduce-scatter, then all-gather
    all-to-all      (n-1) (alpha + S / (n B))
    permute         alpha + S / B                      each device sends to the next on the ring

Hierarchical (the group spans m nodes with the same k > 1 devices on each):
    all-reduce      RS inside nodes (shard S/k) + AR across nodes of S/k + AG inside nodes (S)
    all-gather      AG across nodes (result S/k) + AG inside nodes (result S)
    reduce-scatter  RS inside nodes (shard m s) + RS across nodes (shard s)
  Local rank r of every node forms one cross-node ring; the k rings run at once, so each gets
  B_inter * min(1, nics_per_node / k). The smaller of this and the flat ring is returned.
  Other kinds, and groups uneven across nodes, use the flat ring.

Flat rings that leave a node c times share its NICs: a hop leaving or entering that node runs at
B / max(1, c / nics_per_node). That is why device order matters: (0,4,1,5,..) on two nodes crosses
8 times where (0,1,..,7) crosses twice.

All-to-all across nodes is also bounded by what a node must push through its NICs: a node with
k_i devices sends k_i S (n - k_i) / n bytes off-node over min(k_i, nics) links.

Torus (the topology has a torus and the group is one node's full sub-torus along some dimensions
of sizes n_1..n_r, n = prod n_j): a reduce-scatter / all-gather per dimension, each a
BIDIRECTIONAL ring (both directions of the ICI links carry half), which halves the traffic term.
Summing the phases telescopes (sum_j (n_j-1)/(n_1..n_j) = (n-1)/n):
    all-gather      sum_j (n_j-1) alpha + (n-1)/n S / (2B)
    reduce-scatter  sum_j (n_j-1) alpha + (n-1) s / (2B)
    all-reduce      2 sum_j (n_j-1) alpha + (n-1)/n S / B
    all-to-all      sum_j (n_j-1) (alpha + S / (2 n_j B))
    permute         alpha + S / B
  with the ICI (intra_node) link. Other groups on a torus use the flat ring.
"""
from __future__ import annotations

import math
import numbers
from collections import Counter

from tag_jax.topology.errors import TopologyError

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_ALIASES = {"permute": "collective-permute"}


def normalize_kind(kind: str) -> str:
    k = str(kind).strip().lower().replace("_", "-")
    k = _ALIASES.get(k, k)
    if k not in KINDS:
        raise TopologyError(f"unknown collective kind {kind!r}; expected one of "
                            f"{', '.join(KINDS)} (or 'permute')")
    return k


def ring_time(kind: str, nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """The ring closed forms above (kind already normalised)."""
    if n <= 1 or nbytes == 0:
        return 0.0
    a, S, B = latency, nbytes, bandwidth
    if kind == "all-reduce":
        return 2 * (n - 1) * (a + S / (n * B))
    if kind in ("all-gather", "all-to-all"):
        return (n - 1) * (a + S / (n * B))
    if kind == "reduce-scatter":
        return (n - 1) * (a + S / B)
    return a + S / B


def torus_time(kind: str, nbytes: float, dims: tuple[int, ...], bandwidth: float,
               latency: float) -> float:
    """The torus closed forms above, for a group spanning whole torus dimensions of sizes `dims`."""
    n = math.prod(dims)
    if n <= 1 or nbytes == 0:
        return 0.0
    a, S, B = latency, nbytes, bandwidth
    steps = sum(d - 1 for d in dims)
    if kind == "all-reduce":
        return 2 * steps * a + (n - 1) / n * S / B
    if kind == "all-gather":
        return steps * a + (n - 1) / n * S / (2 * B)
    if kind == "reduce-scatter":
        return steps * a + (n - 1) * S / (2 * B)
    if kind == "all-to-all":
        return sum((d - 1) * (a + S / (2 * d * B)) for d in dims)
    return a + S / B


def ring_links(topo, ids: tuple[int, ...]) -> tuple[float, float]:
    """(slowest effective bandwidth, largest latency) of the ring ids[0] -> ids[1] .. -> ids[0]."""
    key = ("ring", ids)
    if key not in topo._memo:
        topo._memo[key] = _ring_links(topo, ids)
    return topo._memo[key]


def _ring_links(topo, ids):
    if len(ids) < 2:
        return math.inf, 0.0
    hops = [(ids[k], ids[(k + 1) % len(ids)]) for k in range(len(ids))]
    node = {i: topo.device(i).node for i in ids}
    leaving = Counter(node[a] for a, b in hops if node[a] != node[b])  # = entering, on a ring
    bw, lat = math.inf, 0.0
    for a, b in hops:
        link = topo.link(a, b)
        share = 1.0
        if node[a] != node[b]:
            share = max(1.0, max(leaving[node[a]], leaving[node[b]]) / topo.nics_per_node)
        bw, lat = min(bw, link.bandwidth / share), max(lat, link.latency)
    return bw, lat


def collective_time(topo, kind: str, nbytes: float, device_ids) -> float:
    """Seconds for collective `kind` moving `nbytes` (per-device result) over `device_ids`."""
    kind = normalize_kind(kind)
    ids = topo.check_ids(device_ids)
    if not isinstance(nbytes, numbers.Real) or not nbytes >= 0 or math.isinf(nbytes):
        raise TopologyError(f"{kind}: nbytes must be a finite number >= 0, got {nbytes!r}")
    if len(ids) <= 1 or nbytes == 0:
        return 0.0
    groups = _by_node(topo, ids)
    if len(groups) == 1:
        return _one_node(topo, kind, nbytes, ids)
    best = ring_time(kind, nbytes, len(ids), *ring_links(topo, ids))
    hier = _hierarchical(topo, kind, nbytes, groups)
    if hier is not None:
        best = min(best, hier)
    if kind == "all-to-all":
        best = max(best, _egress_bound(topo, nbytes, groups, len(ids)))
    return best


def _by_node(topo, ids) -> list[tuple[int, ...]]:
    groups: dict[int, list[int]] = {}
    for i in ids:  # nodes in order of first appearance, devices in the given order
        groups.setdefault(topo.device(i).node, []).append(i)
    return [tuple(g) for g in groups.values()]


def _one_node(topo, kind, nbytes, ids) -> float:
    flat = ring_time(kind, nbytes, len(ids), *ring_links(topo, ids))
    dims = _torus_dims(topo, ids)
    if dims is None:
        return flat
    link = topo.intra_node
    return min(flat, torus_time(kind, nbytes, dims, link.bandwidth, link.latency))


def _torus_dims(topo, ids) -> tuple[int, ...] | None:
    """Sizes of the torus dimensions the group fills completely, or None if it fills none."""
    if topo.torus is None:
        return None
    coords = [topo.device(i).coords for i in ids]
    varying = [d for d in range(len(topo.torus)) if len({c[d] for c in coords}) > 1]
    dims = tuple(topo.torus[d] for d in varying)
    # coords are unique per node, so n == prod(dims) means every combination is present
    return dims if dims and math.prod(dims) == len(ids) else None


def _hierarchical(topo, kind, S, groups) -> float | None:
    k, m = len(groups[0]), len(groups)
    if kind not in ("all-reduce", "all-gather", "reduce-scatter") or k == 1 \
            or any(len(g) != k for g in groups):
        return None
    share = max(1.0, k / topo.nics_per_node)  # k cross-node rings leave each node at once

    def inside(kind_, size):
        return max(_one_node(topo, kind_, size, g) for g in groups)

    def across(kind_, size):
        worst = 0.0
        for r in range(k):
            bw, lat = ring_links(topo, tuple(g[r] for g in groups))
            worst = max(worst, ring_time(kind_, size, m, bw / share, lat))
        return worst

    if kind == "all-reduce":
        return inside("reduce-scatter", S / k) + across("all-reduce", S / k) \
            + inside("all-gather", S)
    if kind == "all-gather":
        return across("all-gather", S / k) + inside("all-gather", S)
    return inside("reduce-scatter", m * S) + across("reduce-scatter", S)


def _egress_bound(topo, S, groups, n) -> float:
    worst = 0.0
    for g in groups:
        links = [topo.link(g[0], h[0]) for h in groups if h is not g]
        bw, lat = min(x.bandwidth for x in links), max(x.latency for x in links)
        k = len(g)
        worst = max(worst, lat + k * S * (n - k) / (n * min(k, topo.nics_per_node) * bw))
    return worst
