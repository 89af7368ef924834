"""Named topologies built from the vendor figures in hardware.py (dense peaks)."""
from __future__ import annotations

from typing import Callable

from tag_jax.topology import hardware as hw
from tag_jax.topology.errors import TopologyError
from tag_jax.topology.graph import Device, Link, Topology


def machines(name: str, nodes: list[tuple[str, int, Link]], inter: Link, nics: int = 1,
             torus: tuple[int, ...] | None = None) -> Topology:
    """Nodes of (known kind, device count, intra-node link); ids run node by node from 0.

    The first node's link is the topology's `intra_node`; nodes with another link get per-pair
    overrides, so one Topology holds machines of different kinds.
    """
    devices, links = [], []
    for node, (kind, count, intra) in enumerate(nodes):
        f = hw.KNOWN_KINDS[kind]
        ids = range(len(devices), len(devices) + count)
        devices += [Device(i, kind, f.flops, f.flops_fp32, f.memory, f.memory_bandwidth, node,
                           flops_fp32_matmul=f.flops_fp32_matmul) for i in ids]
        if intra != nodes[0][2]:
            links += [(a, b, intra) for a in ids for b in ids if a < b]
    return Topology(tuple(devices), nodes[0][2], inter, tuple(links), torus, nics, name)


PRESETS: dict[str, tuple[str, Callable[[], Topology]]] = {
    "1x8-a100-nvlink": (
        "one node of 8 A100 40GB on NVSwitch (p4d-like)",
        lambda: machines("1x8-a100-nvlink", [("a100", 8, hw.NVLINK3)], hw.IB_EDR, nics=4)),
    "2x4-v100-25gbe": (
        "2 nodes x 4 V100 on NVLink, 25 GbE between nodes",
        lambda: machines("2x4-v100-25gbe", [("v100", 4, hw.NVLINK2)] * 2, hw.ETH_25G)),
    "2x8-v100-p3": (
        "2 x p3.16xlarge: 8 V100 on NVLink per node, 25 Gb/s between nodes",
        lambda: machines("2x8-v100-p3", [("v100", 8, hw.NVLINK2)] * 2, hw.ETH_25G)),
    "tag-hetero": (
        "TAG-like, 8 devices: 2 V100 + 4 1080Ti + 2 P100 machines on PCIe, 2.81 GB/s between",
        lambda: machines("tag-hetero", [("v100", 2, hw.TAG_PCIE_FAST),
                                        ("1080ti", 4, hw.TAG_PCIE_SLOW),
                                        ("p100", 2, hw.TAG_PCIE_FAST)], hw.TAG_ETH)),
    "tag-hetero-16": (
        "TAG's cluster: 4 V100 + 8 1080Ti + 4 P100 machines on PCIe, 2.81 GB/s between",
        lambda: machines("tag-hetero-16", [("v100", 4, hw.TAG_PCIE_FAST),
                                           ("1080ti", 8, hw.TAG_PCIE_SLOW),
                                           ("p100", 4, hw.TAG_PCIE_FAST)], hw.TAG_ETH)),
    "tpu-v4-2x2x2": (
        "8 TPU v4 chips on a 2x2x2 ICI torus (one slice)",
        lambda: machines("tpu-v4-2x2x2", [("tpu-v4", 8, hw.ICI_V4)], hw.IB_EDR, torus=(2, 2, 2))),
    "4xa100-4xv100": (
        "mixed: a node of 4 A100 (NVLink 3) and a node of 4 V100 (NVLink 2), 100 Gb/s IB between",
        lambda: machines("4xa100-4xv100", [("a100", 4, hw.NVLINK3), ("v100", 4, hw.NVLINK2)],
                         hw.IB_EDR)),
    "8x8-a100-ib": (
        "64 devices: 8 nodes x 8 A100 80GB on NVSwitch, one 200 Gb/s HDR card per GPU",
        lambda: machines("8x8-a100-ib", [("a100-80gb", 8, hw.NVLINK3)] * 8, hw.IB_HDR, nics=8)),
    "32x8-h100-ib": (
        "256 devices: 32 nodes x 8 H100 on NVSwitch, one 400 Gb/s NDR card per GPU",
        lambda: machines("32x8-h100-ib", [("h100", 8, hw.NVLINK4)] * 32, hw.IB_NDR, nics=8)),
}


def build(name: str) -> Topology:
    try:
        _, make = PRESETS[name]
    except (KeyError, TypeError):
        raise TopologyError(f"unknown topology preset {name!r}; valid names: "
                            f"{', '.join(PRESETS)} (or use Topology.from_json / detect)") from None
    return make()
