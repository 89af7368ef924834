"""Build a Topology from the devices JAX sees, guessing what JAX cannot tell us (and saying so)."""
from __future__ import annotations

import dataclasses
import os

import jax

from tag_jax.topology import hardware as hw
from tag_jax.topology.graph import Device, Topology

# Intra-node link by kind; anything else is assumed to sit on PCIe.
_INTRA = {"h100": hw.NVLINK4, "h200": hw.NVLINK4, "a100": hw.NVLINK3, "a100-80gb": hw.NVLINK3,
          "v100": hw.NVLINK2, "v100-32gb": hw.NVLINK2, "tpu-v4": hw.ICI_V4,
          "tpu-v5e": hw.ICI_V5E, "cpu": hw.HOST_COPY}
_UNKNOWN = hw.Figures(1e14, 1e13, 16e9, 1e12)  # a mid-range accelerator, used with a note


def detect(devices=None) -> Topology:
    """One Device per JAX device; Device.id is its index in `jax.devices()`.

    node = the slice index on multi-slice TPUs, else the process index (one process per host).
    Figures come from the known-kind table; GPU memory from `memory_stats()` when it reports a
    limit. Links are guessed from the kind; every guess is recorded in `Topology.notes`.
    """
    everything = jax.devices()
    devices = list(everything if devices is None else devices)
    position = {(d.platform, d.id): k for k, d in enumerate(everything)}
    notes, out = [], []
    for k, d in enumerate(devices):
        kind = hw.match_kind("cpu" if d.platform == "cpu" else d.device_kind)
        figures = hw.KNOWN_KINDS.get(kind)
        if figures is None:
            kind, figures = d.device_kind, _UNKNOWN
            notes.append(f"device kind {d.device_kind!r} is not known: figures are placeholders; "
                         "describe it with Topology.from_json for real numbers")
        memory = _memory_limit(d) or figures.memory
        if d.platform == "cpu":
            memory = _host_memory() / max(1, sum(x.platform == "cpu" for x in everything))
        node = getattr(d, "slice_index", None)
        node = d.process_index if node is None else node
        coords = getattr(d, "coords", None) if d.platform == "tpu" else None
        out.append(Device(position.get((d.platform, d.id), k), kind, figures.flops,
                          figures.flops_fp32, memory, figures.memory_bandwidth, int(node),
                          None if coords is None else tuple(int(c) for c in coords),
                          figures.flops_fp32_matmul))
    kind = out[0].kind
    intra = _INTRA.get(kind, hw.PCIE3)
    inter = hw.IB_EDR if kind != "cpu" else hw.ETH_25G
    notes.append(f"links guessed from device kind: intra-node {intra.bandwidth / 1e9:g} GB/s, "
                 f"inter-node {inter.bandwidth / 1e9:g} GB/s; measure and pass JSON to be exact")
    if kind == "cpu":
        notes.append("CPU devices: FLOP/s is a modest guess and memory is host RAM split evenly")
    torus = None
    if all(d.coords is not None for d in out) and kind.startswith("tpu"):
        torus = tuple(max(d.coords[j] for d in out) + 1 for j in range(len(out[0].coords)))
        if len({(d.node, d.coords) for d in out}) != len(out):  # several cores per chip: no torus
            torus, out = None, [dataclasses.replace(d, coords=None) for d in out]
    return Topology(tuple(out), intra, inter, (), torus, 1, f"detected-{len(out)}x{kind}",
                    tuple(dict.fromkeys(notes)))


def _memory_limit(d) -> float | None:
    try:
        stats = d.memory_stats() or {}
    except Exception:  # not every backend implements memory_stats
        return None
    return float(stats["bytes_limit"]) if stats.get("bytes_limit") else None


def _host_memory() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return hw.KNOWN_KINDS["cpu"].memory * 8
