"""Known device kinds and link technologies, with vendor figures.

All FLOP/s figures are vendor dense peaks (no structured sparsity); real kernels reach 40-70% of
them. `flops` is the 16-bit (bf16/fp16) tensor-core or matrix-unit peak where the device has one;
devices without fast 16-bit math (GTX 1080 Ti: fp16 runs at 1/64 rate) use their fp32 peak, since
that is how they train. Memory is decimal bytes as vendors print them. Sources: REFERENCE.md.
"""
from __future__ import annotations

import dataclasses
import re

from tag_jax.topology.graph import Link


@dataclasses.dataclass(frozen=True)
class Figures:
    flops: float             # FLOP/s, dense 16-bit peak (fp32 where no fast 16-bit path exists)
    flops_fp32: float        # FLOP/s, dense fp32 peak
    memory: float            # bytes
    memory_bandwidth: float  # bytes/s
    # float32 matmul/conv at JAX's default precision ("TF32 on recent GPUs, bfloat16 on TPU", JAX's
    # matmul-precision docs): NVIDIA's TF32 dense peak is half its bf16 dense peak on A100, H100
    # and L4 (their sheets: 156 / 494.7 / 60 TFLOPS dense); a TPU's one bf16 pass runs at its bf16
    # peak. None where there is no such path (Volta, Pascal, Turing: true fp32).
    flops_fp32_matmul: float | None = None


KNOWN_KINDS: dict[str, Figures] = {
    "h100": Figures(989e12, 67e12, 80e9, 3.35e12, 494.7e12),
    # H200 is an H100 with HBM3e; its vendor sheet (not in REFERENCE.md) gives 141 GB at 4.8 TB/s.
    "h200": Figures(989e12, 67e12, 141e9, 4.8e12, 494.7e12),
    "a100": Figures(312e12, 19.5e12, 40e9, 1.6e12, 156e12),
    "a100-80gb": Figures(312e12, 19.5e12, 80e9, 2.0e12, 156e12),
    "v100": Figures(125e12, 15.7e12, 16e9, 900e9),
    "v100-32gb": Figures(125e12, 15.7e12, 32e9, 900e9),
    "p100": Figures(18.7e12, 9.3e12, 16e9, 732e9),  # PCIe part; packed fp16, no tensor cores
    "1080ti": Figures(11.3e12, 11.3e12, 11e9, 484e9),
    "t4": Figures(65e12, 8.1e12, 16e9, 320e9),
    "l4": Figures(121e12, 30e12, 24e9, 300e9, 60e12),
    # TPUs publish no fp32 peak; estimate: an fp32 matmul at HIGHEST precision takes 6 bf16 passes.
    "tpu-v4": Figures(275e12, 275e12 / 6, 32e9, 1.2e12, 275e12),
    "tpu-v5e": Figures(197e12, 197e12 / 6, 16e9, 819e9, 197e12),
    # A host CPU device: modest guesses, only so CPU runs of the planner have numbers to work with.
    "cpu": Figures(1e11, 1e11, 8e9, 2e10),
}

# Kind-string patterns, first match wins: jax's device_kind ("NVIDIA H100 80GB HBM3", "TPU v4",
# "Tesla V100-SXM2-16GB") or a short name from a JSON file ("v100").
_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"h200", "h200"), (r"h100", "h100"),
    (r"a100.*80\s*gb", "a100-80gb"), (r"a100", "a100"),
    (r"v100.*32\s*gb", "v100-32gb"), (r"v100", "v100"),
    (r"p100", "p100"), (r"1080\s*-?\s*ti", "1080ti"),
    (r"\bt4\b", "t4"), (r"\bl4\b", "l4"),
    (r"tpu\s*-?\s*v4", "tpu-v4"), (r"tpu\s*-?\s*v5\s*(e|\s*lite)", "tpu-v5e"),
    (r"^cpu$", "cpu"),
)


def match_kind(text: str) -> str | None:
    """The KNOWN_KINDS key a device-kind string names, or None when it is not recognised."""
    t = text.strip().lower()
    if t in KNOWN_KINDS:
        return t
    for pattern, kind in _PATTERNS:
        if re.search(pattern, t):
            return kind
    return None


# Links, bandwidth per direction. NVLink totals in the vendor tables count both directions.
NVLINK2 = Link(150e9, 2e-6)     # V100: 300 GB/s total
NVLINK3 = Link(300e9, 2e-6)     # A100 + NVSwitch: 600 GB/s total
NVLINK4 = Link(450e9, 2e-6)     # H100 + NVSwitch: 900 GB/s total
PCIE3 = Link(12e9, 5e-6)        # x16, usable
TAG_PCIE_FAST = Link(20e9, 5e-6)  # TAG's intra-machine figures: 20 or 8 GB/s
TAG_PCIE_SLOW = Link(8e9, 5e-6)
ETH_25G = Link(3.125e9, 30e-6)  # TCP over Ethernet: tens of microseconds
TAG_ETH = Link(2.81e9, 30e-6)   # TAG's evaluation cluster between machines
IB_EDR = Link(12.5e9, 5e-6)     # 100 Gb/s InfiniBand
IB_HDR = Link(25e9, 5e-6)       # 200 Gb/s
IB_NDR = Link(50e9, 5e-6)       # 400 Gb/s
# TPU v4 ICI: 2,400 Gb/s per chip over 6 links (Cloud TPU docs), about 50 GB/s a link.
ICI_V4 = Link(50e9, 1e-6)
ICI_V5E = Link(50e9, 1e-6)      # 1,600 Gb/s over 4 links
HOST_COPY = Link(10e9, 1e-6)    # between CPU devices of one process: a memory copy (guess)
