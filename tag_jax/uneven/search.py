"""The best uneven plan: which groups take part, and their shares (the MILP of `shares.py`).

For every non-empty set of groups (all of them when the caller fixes the groups), the MILP splits
the batch by the groups' fitted time models; the chosen shares are then priced exactly (re-traced
at their local batches) and the step is slowest group + combining all-reduce over the set's
devices + optimizer update. The fastest set wins: leaving a slow group out pays when what it adds
in compute is less than what its links add to the all-reduce.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Sequence

from tag_jax.uneven.groups import Group, check_groups, device_groups
from tag_jax.uneven.plan import GroupShare, UnevenPlan
from tag_jax.uneven.price import Pricer, UnevenError
from tag_jax.uneven.shares import SharesError, solve_shares
from tag_jax.uneven.steps import UnevenStep

MAX_SUBSET_GROUPS = 8  # 255 sets: each a MILP of a few variables


def plan_uneven(step: UnevenStep, state: Any, batch: Any, topology, device_ids: Sequence[int] | None = None,
                *, groups: Sequence[Group] | None = None, by: str = "node",
                memory_limit: float | None = None, leave_out: bool | None = None,
                pricer: Pricer | None = None) -> UnevenPlan:
    """The fastest uneven plan of `step` on these devices (abstract state and batch are fine).

    `groups`: fixed groups (default: `device_groups(topology, device_ids, by=by)`). `leave_out`:
    may groups get no share (default: yes for automatic groups, no for fixed ones).
    `memory_limit`: bytes per device (default: `USABLE_MEMORY` x each group's device memory).
    """
    from tag_jax.cost.simulate import USABLE_MEMORY

    pricer = pricer or Pricer(step, state, batch, topology)
    auto = groups is None
    groups = device_groups(topology, device_ids, by=by) if auto else check_groups(groups, topology)
    leave_out = auto if leave_out is None else leave_out
    n = pricer.n
    devices = sum(g.size for g in groups)
    even = max(1, n // devices)
    probes = (max(1, even // 2), max(max(1, even // 2) + 1, 2 * even))
    limits = {g.name: memory_limit if memory_limit is not None else
              USABLE_MEMORY * min(topology.device_memory(i) for i in g.device_ids) for g in groups}
    models = {g.name: pricer.group_model(g, probes, limits[g.name]) for g in groups}
    if len(groups) > MAX_SUBSET_GROUPS and leave_out:
        raise UnevenError(f"{len(groups)} device groups are too many to try every subset "
                          f"(at most {MAX_SUBSET_GROUPS}); pass groups=... or leave_out=False")
    sets = [tuple(groups)] if not leave_out else [
        c for r in range(len(groups), 0, -1) for c in itertools.combinations(groups, r)]
    best, first_error = None, None
    for chosen in sets:
        try:
            plan = _priced(pricer, chosen, [models[g.name] for g in chosen], limits, n, topology)
        except (SharesError, UnevenError) as e:
            first_error = first_error or e
            continue
        if plan is not None and (best is None or plan.step_time_s < best.step_time_s):
            best = plan
    if best is None:
        if first_error is not None:
            raise first_error
        raise UnevenError(f"no uneven plan of {step.name} fits in memory on groups "
                          f"{[g.name for g in groups]}; use a smaller batch or more devices")
    kept = {g.group.name for g in best.groups}
    return dataclasses.replace(best, left_out=tuple(g for g in groups if g.name not in kept),
                               topology_name=topology.name)


def _priced(pricer: Pricer, chosen, models, limits, n: int, topology) -> UnevenPlan | None:
    """The MILP's shares for this set of groups, priced exactly; None when over memory."""
    sol = solve_shares(models, n)
    probes = [pricer.probe(k // g.size, g.device_ids[0]) for g, k in zip(chosen, sol.shares)]
    if any(p.peak_memory_bytes > limits[g.name] for g, p in zip(chosen, probes)):
        return None
    slowest = max(p.time_s for p in probes)
    ids = tuple(i for g in chosen for i in g.device_ids)
    apply = [pricer.apply_probe(g.device_ids[0]) for g in chosen]
    if any(a.peak_memory_bytes > limits[g.name] for g, a in zip(chosen, apply)):
        return None
    return UnevenPlan(
        groups=tuple(GroupShare(g, k, p.time_s, slowest - p.time_s, p.peak_memory_bytes)
                     for g, k, p in zip(chosen, sol.shares, probes)),
        batch=n, combine_s=pricer.combine_s(ids) if len(ids) > 1 else 0.0,
        combine_bytes=sum(pricer.combined_bytes) if len(ids) > 1 else 0,
        apply_s=max(a.time_s for a in apply), relaxed=sol.relaxed)
