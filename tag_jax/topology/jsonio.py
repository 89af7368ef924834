"""Topology <-> JSON, with errors that name the field and device at fault.

Format (units: FLOP/s, bytes, bytes/s per direction, seconds):

    {"name": "my-cluster",
     "devices": [{"kind": "v100", "node": 0}, ...],     # figures default from the known-kind table;
                                                       # optional: id, flops, flops_fp32,
                                                       # flops_fp32_matmul, memory,
                                                       # memory_bandwidth, coords
     "intra_node": {"bandwidth": 1.5e11, "latency": 2e-6},
     "inter_node": {"bandwidth": 3.125e9, "latency": 1e-5, "nics": 1},   # needed with >1 node
     "links": [{"a": 0, "b": 1, "bandwidth": 2e10, "latency": 5e-6}],   # optional pair overrides
     "torus": {"shape": [2, 2, 2]}}                                       # optional, TPU-like
"""
from __future__ import annotations

import json
import math
import numbers
import os

from tag_jax.topology.errors import TopologyError
from tag_jax.topology.graph import Device, Link, Topology
from tag_jax.topology.hardware import KNOWN_KINDS, match_kind

_TOP_KEYS = {"name", "devices", "intra_node", "inter_node", "links", "torus", "notes"}
_DEVICE_KEYS = {"id", "kind", "flops", "flops_fp32", "flops_fp32_matmul", "memory", "memory_bandwidth",
                "node", "coords"}
_UNITS = {"flops": "FLOP/s", "flops_fp32": "FLOP/s", "flops_fp32_matmul": "FLOP/s", "memory": "bytes",
          "memory_bandwidth": "bytes/s", "bandwidth": "bytes/s"}


def load(source) -> Topology:
    """From a dict, JSON text, or a path; file errors are prefixed with the path."""
    if isinstance(source, dict):
        return from_dict(source)
    if isinstance(source, str) and source.lstrip().startswith("{"):
        return from_dict(_parse(source, "JSON text"))
    if not isinstance(source, (str, os.PathLike)):
        raise TopologyError(f"from_json expects a dict, JSON text or a path, got "
                            f"{type(source).__name__}")
    try:
        with open(source) as f:
            text = f.read()
    except OSError as e:
        raise TopologyError(f"cannot read topology file {os.fspath(source)!r}: {e}") from None
    try:
        return from_dict(_parse(text, os.fspath(source)))
    except TopologyError as e:
        raise TopologyError(f"{os.fspath(source)}: {e}") from None


def _parse(text: str, where: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TopologyError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise TopologyError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


def from_dict(d: dict) -> Topology:
    _no_unknown_keys(d, _TOP_KEYS, "topology")
    raw = d.get("devices")
    if not isinstance(raw, list) or not raw:
        raise TopologyError(f"devices: expected a non-empty list of devices, got {raw!r}")
    devices = tuple(_device(k, x) for k, x in enumerate(raw))
    ids = [x.id for x in devices]
    for k, i in enumerate(ids):
        if ids.index(i) != k:
            raise TopologyError(f"devices[{k}].id: id {i} is already used by "
                                f"devices[{ids.index(i)}]; ids must be unique (device i stands "
                                "for jax.devices()[i])")
    intra = _link(d.get("intra_node"), "intra_node")
    if "inter_node" in d or len({x.node for x in devices}) > 1:
        inter = _link(d.get("inter_node"), "inter_node")
        nics = d["inter_node"].get("nics", 1)
        if not isinstance(nics, int) or isinstance(nics, bool) or nics < 1:
            raise TopologyError(f"inter_node.nics: expected a whole number >= 1 of network cards "
                                f"per node, got {nics!r}")
    else:  # one node: nothing crosses nodes, so nothing to ask for
        inter, nics = intra, 1
    links = []
    for k, x in enumerate(_list(d.get("links", []), "links")):
        where = f"links[{k}]"
        _no_unknown_keys(x, {"a", "b", "bandwidth", "latency"}, where)
        a, b = (_member(x.get(e), ids, f"{where}.{e}") for e in ("a", "b"))
        links.append((a, b, _link(x, where)))
    torus = None
    if d.get("torus") is not None:
        t = d["torus"]
        shape = t.get("shape") if isinstance(t, dict) else None
        if not isinstance(shape, list) or not shape or not all(_is_int(n) and n > 0 for n in shape):
            raise TopologyError(f"torus.shape: expected a list of positive sizes like [2, 2, 2], "
                                f"got {shape!r}")
        torus = tuple(shape)
    name = d.get("name", "custom")
    if not isinstance(name, str):
        raise TopologyError(f"name: expected a string, got {name!r}")
    notes = tuple(str(n) for n in _list(d.get("notes", []), "notes"))
    return Topology(devices, intra, inter, tuple(links), torus, nics, name, notes)


def _device(k: int, x) -> Device:
    where = f"devices[{k}]"
    if not isinstance(x, dict):
        raise TopologyError(f"{where}: expected an object like "
                            f"{{\"kind\": \"v100\", \"node\": 0}}, got {x!r}")
    _no_unknown_keys(x, _DEVICE_KEYS, where)
    kind = x.get("kind")
    if not isinstance(kind, str) or not kind:
        raise TopologyError(f"{where}.kind: expected a device kind such as 'v100', got {kind!r}")
    known = match_kind(kind)
    table = KNOWN_KINDS.get(known)
    figures = {}
    for field in ("flops", "flops_fp32", "memory", "memory_bandwidth"):
        if field in x:
            figures[field] = _positive(x[field], f"{where}.{field}", _UNITS[field])
        elif table is not None:
            figures[field] = getattr(table, field)
        elif field == "flops_fp32" and "flops" in figures:
            figures[field] = figures["flops"]
        else:
            raise TopologyError(f"{where}.{field}: missing, and kind {kind!r} is not a known kind "
                                f"({', '.join(KNOWN_KINDS)}); give {field} in {_UNITS[field]}")
    # float32 matmuls at JAX's default precision: given, else the known kind's (TF32, one bf16
    # pass), else none — but a device given its own fp32 figure keeps it unless it says otherwise
    if "flops_fp32_matmul" in x:
        figures["flops_fp32_matmul"] = _positive(x["flops_fp32_matmul"], f"{where}.flops_fp32_matmul",
                                                 _UNITS["flops_fp32_matmul"])
    elif table is not None and "flops_fp32" not in x:
        figures["flops_fp32_matmul"] = table.flops_fp32_matmul
    dev_id, node = x.get("id", k), x.get("node", 0)
    for field, v in (("id", dev_id), ("node", node)):
        if not _is_int(v) or v < 0:
            raise TopologyError(f"{where}.{field}: expected a whole number >= 0, got {v!r}")
    coords = x.get("coords")
    if coords is not None and (not isinstance(coords, list) or not all(_is_int(c) for c in coords)):
        raise TopologyError(f"{where}.coords: expected a list of torus coordinates, got {coords!r}")
    coords = None if coords is None else tuple(coords)
    return Device(dev_id, known or kind, node=node, coords=coords, **figures)


def _link(x, where: str) -> Link:
    if not isinstance(x, dict):
        raise TopologyError(f"{where}: expected an object like {{\"bandwidth\": 1.5e11, "
                            f"\"latency\": 2e-6}}, got {x!r}")
    bw = _positive(x.get("bandwidth"), f"{where}.bandwidth", "bytes/s per direction")
    lat = x.get("latency")
    if not _is_real(lat) or not 0 <= lat < math.inf:
        raise TopologyError(f"{where}.latency: expected a number of seconds >= 0, got {lat!r}")
    return Link(float(bw), float(lat))


def to_dict(t: Topology) -> dict:
    def device(d: Device) -> dict:
        out = {"id": d.id, "kind": d.kind, "flops": d.flops, "flops_fp32": d.flops_fp32,
               "memory": d.memory, "memory_bandwidth": d.memory_bandwidth, "node": d.node}
        if d.flops_fp32_matmul is not None:
            out["flops_fp32_matmul"] = d.flops_fp32_matmul
        return out if d.coords is None else {**out, "coords": list(d.coords)}

    out = {"name": t.name, "devices": [device(d) for d in t.devices],
           "intra_node": {"bandwidth": t.intra_node.bandwidth, "latency": t.intra_node.latency},
           "inter_node": {"bandwidth": t.inter_node.bandwidth, "latency": t.inter_node.latency,
                          "nics": t.nics_per_node},
           "links": [{"a": a, "b": b, "bandwidth": x.bandwidth, "latency": x.latency}
                     for a, b, x in t.links]}
    if t.torus is not None:
        out["torus"] = {"shape": list(t.torus)}
    if t.notes:
        out["notes"] = list(t.notes)
    return out


def _positive(v, where: str, unit: str) -> float:
    if not _is_real(v) or not 0 < v < math.inf:
        raise TopologyError(f"{where}: expected a positive number of {unit}, got {v!r}")
    return float(v)


def _member(v, ids, where: str) -> int:
    if not _is_int(v) or v not in ids:
        raise TopologyError(f"{where}: expected a device id (one of {sorted(ids)[:16]}), got {v!r}")
    return v


def _list(v, where: str) -> list:
    if not isinstance(v, list):
        raise TopologyError(f"{where}: expected a list, got {v!r}")
    return v


def _no_unknown_keys(x, allowed: set, where: str):
    if not isinstance(x, dict):
        raise TopologyError(f"{where}: expected an object, got {x!r}")
    extra = sorted(set(x) - allowed)
    if extra:
        raise TopologyError(f"{where}: unknown key {extra[0]!r}; expected keys among "
                            f"{', '.join(sorted(allowed))}")


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)
