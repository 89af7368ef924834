"""Pictures of a plan: a per-device timeline of the predicted step and per-device memory bars.

matplotlib is an optional extra (`pip install tag_jax[plots]`), imported only when a plot is drawn.
Both functions take a `Plan` with a cost (planned with a topology) and return a `Figure`.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("tag_jax.plots needs matplotlib: pip install 'tag_jax[plots]' "
                          "(or pip install matplotlib)") from exc
    return plt


def _per_op(plan) -> tuple[np.ndarray, np.ndarray]:
    """(compute s, incoming reshard s) per op, from the plan's cost or by re-simulating."""
    cost = plan.cost
    if cost is None:
        raise ValueError(f"the plan of {plan.function} has no cost: plan it with a topology")
    rows = getattr(cost, "per_op", None)
    if rows is None:
        if plan.graph is None or plan.topology is None:
            raise ValueError(f"the plan of {plan.function} has no per-op costs (a loaded plan): "
                             "load it with its function and topology, Plan.load(path, fn, *args, "
                             "topology=...)")
        from tag_jax.cost import Simulator
        from tag_jax.search.propagate import carried_outputs

        sim = Simulator(plan.graph, plan.op_strategies, plan.topology, plan.strategy.mesh,
                        carried=carried_outputs(plan.graph))
        rows = sim.cost(plan.strategy, per_op=True).per_op
    arr = np.asarray([(c, r) for _, c, r in rows], float).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def _segments(starts: np.ndarray, widths: np.ndarray, gap: float) -> list[tuple[float, float]]:
    """Merge touching bars (thousands of ops) into few segments: one draw call per lane."""
    out: list[list[float]] = []
    for s, w in zip(starts.tolist(), widths.tolist()):
        if w <= 0:
            continue
        if out and s - (out[-1][0] + out[-1][1]) <= gap:
            out[-1][1] = s + w - out[-1][0]
        else:
            out.append([s, w])
    return [(s, w) for s, w in out]


def timeline(plan, ax: Any = None):
    """Per device, a compute lane and a communication lane of the predicted step.

    Ops run in program order; the reshards an op waits for (the cost's `per_op`) are drawn just
    before it on the communication lane, without the simulator's overlap; collectives it prices
    outside `per_op` (compressed gradient exchanges) are not drawn. The dashed line is the
    predicted step time. Every device runs the same
    SPMD program at the pace of the slowest one; a faster device's compute is drawn shorter by the
    ratio of peak FLOP/s (its idle time is the gap).
    """
    plt = _pyplot()
    comp, comm = _per_op(plan)
    start = np.zeros_like(comp)
    t = 0.0
    for i in range(len(comp)):  # the op waits for its reshards, then computes
        t += comm[i]
        start[i] = t
        t += comp[i]
    devices = list(plan.strategy.mesh.device_ids)
    topo = plan.topology
    rates = [topo.device_flops(d) if topo is not None else 1.0 for d in devices]
    slowest = min(rates)
    fig = ax.figure if ax is not None else plt.figure(figsize=(9, 0.5 + 0.45 * len(devices)))
    ax = ax or fig.add_subplot()
    scale, unit = _time_unit(max(t, plan.cost.step_time_s))
    gap = t * 2e-3
    for row, (dev, rate) in enumerate(zip(devices, rates)):
        y = 2 * (len(devices) - 1 - row)
        ax.broken_barh(_scaled(_segments(start, comp * slowest / rate, gap), scale), (y + 1, 0.8),
                       color="tab:blue", label="compute" if row == 0 else None)
        ax.broken_barh(_scaled(_segments(start - comm, comm, gap), scale), (y, 0.8),
                       color="tab:orange", label="communication" if row == 0 else None)
    ax.axvline(plan.cost.step_time_s * scale, color="k", ls="--", lw=1, label="predicted step")
    kinds = [topo.device(d).kind if topo is not None else "" for d in devices]
    ax.set_yticks([2 * (len(devices) - 1 - r) + 0.9 for r in range(len(devices))],
                  [f"device {d} {k}".strip() for d, k in zip(devices, kinds)])
    ax.set_xlabel(f"time ({unit})")
    ax.set_title(f"{plan.strategy.name}: compute {plan.cost.compute_s * scale:.3g} {unit}, "
                 f"communication {plan.cost.comm_s * scale:.3g} {unit}", fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def memory(plan, ax: Any = None):
    """Per device, stacked bytes of the arguments by role (parameters, optimizer state, batch, ...)
    and the rest of the predicted peak (activations, temporaries), against the device's memory."""
    plt = _pyplot()
    axes = plan.strategy.mesh.axes
    by_role: dict[str, float] = {}
    for a in plan.arguments:
        local = a.sharding.local_shape(a.shape, axes)
        by_role[a.role] = by_role.get(a.role, 0.0) + math.prod(local) * a.itemsize
    peak = float(plan.cost.peak_memory_bytes) if plan.cost is not None else sum(by_role.values())
    parts = dict(sorted(by_role.items()))
    parts["activations and temporaries"] = max(0.0, peak - sum(by_role.values()))
    devices = list(plan.strategy.mesh.device_ids)
    fig = ax.figure if ax is not None else plt.figure(figsize=(max(4.0, 0.6 * len(devices) + 2), 3.5))
    ax = ax or fig.add_subplot()
    scale, unit = _bytes_unit(peak)
    x = np.arange(len(devices))
    bottom = np.zeros(len(devices))
    for role, b in parts.items():  # the same SPMD layout on every device
        ax.bar(x, b * scale, bottom=bottom, label=role)
        bottom += b * scale
    title = f"{plan.strategy.name}: peak {peak * scale:.3g} {unit} per device"
    if plan.topology is not None:
        cap = [plan.topology.device_memory(d) * scale for d in devices]
        if max(cap) <= 20 * max(bottom):  # otherwise the bars would be invisible next to it
            ax.scatter(x, cap, marker="_", s=400, color="k", label="device memory")
        else:
            title += f" (device memory {min(cap):.3g}-{max(cap):.3g} {unit}, off the scale)"
    ax.set_xticks(x, [str(d) for d in devices])
    ax.set_xlabel("device")
    ax.set_ylabel(f"{unit} per device")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _scaled(segments, scale):
    return [(s * scale, w * scale) for s, w in segments]


def _time_unit(t: float) -> tuple[float, str]:
    for scale, unit in ((1.0, "s"), (1e3, "ms"), (1e6, "us")):
        if t * scale >= 1:
            return scale, unit
    return 1e9, "ns"


def _bytes_unit(n: float) -> tuple[float, str]:
    for scale, unit in ((2 ** -30, "GiB"), (2 ** -20, "MiB"), (2 ** -10, "KiB")):
        if n * scale >= 1:
            return scale, unit
    return 1.0, "B"
