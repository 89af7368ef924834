"""The best uneven plan: which groups take part, and their shares (the MILP of `shares.py`).

For every non-empty set of groups (all of them when the caller fixes the groups), the MILP splits
the batch by the groups' fitted time models; the chosen shares are then priced exactly (re-traced
at their local batches) and the step is slowest group + combining all-reduce over the set's
devices + optimizer update. Mode "one" (`tag_jax.uneven.one`) is priced next to the
group-program modes: one program, per-device microbatch counts from the same MILP, the
all-reduce overlapped with the last microbatch's backward pass. The fastest set wins: leaving a
slow group out pays when what it adds in compute is less than what its links add to the
all-reduce.
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
                pricer: Pricer | None = None, local: int | None = None,
                group_program: str | None = None, microbatch: int | None = None) -> UnevenPlan:
    """The fastest uneven plan of `step` on these devices (abstract state and batch are fine).

    `groups`: fixed groups (default: `device_groups(topology, device_ids, by=by)`). `leave_out`:
    may groups get no share (default: yes for automatic groups, no for fixed ones).
    `memory_limit`: bytes per device (default: `USABLE_MEMORY` x each group's device memory).
    `local`: the sub-group size of the layout (`tag_jax.uneven.layout`; default: the fastest of
    those dividing every group taking part; 1 = replicated state, flat combine).
    `group_program`: "rows" (per-device gradients, `program`), "spmd" (each group one SPMD
    program, `group_spmd`), "one" (one program over all devices, each its own number of
    microbatches, the all-reduce overlapped with the last backward pass: `one`) or None
    (default: the fastest). `microbatch`: mode "one"'s microbatch size (default: the fastest of
    `one.microbatch_sizes`).
    """
    if group_program not in (None, "rows", "spmd", "one"):
        raise ValueError(f"plan_uneven(group_program={group_program!r}): 'rows', 'spmd', 'one' or None")
    if group_program == "one" and local not in (None, 1):
        raise UnevenError(f"plan_uneven(group_program='one', local={local}): the one-program mode keeps "
                          "the state replicated (local=1); pass local=None or 1")
    modes = ("rows", "spmd", "one") if group_program is None else (group_program,)
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
    if len(groups) > MAX_SUBSET_GROUPS and leave_out:
        raise UnevenError(f"{len(groups)} device groups are too many to try every subset "
                          f"(at most {MAX_SUBSET_GROUPS}); pass groups=... or leave_out=False")
    sets = [tuple(groups)] if not leave_out else [
        c for r in range(len(groups), 0, -1) for c in itertools.combinations(groups, r)]
    best, first_error = _fastest(
        lambda chosen: _best_layout(pricer, chosen, probes, limits, n, topology, local, modes,
                                    microbatch), sets)
    if best is None:
        if first_error is not None:
            raise first_error
        raise UnevenError(f"no uneven plan of {step.name} fits in memory on groups "
                          f"{[g.name for g in groups]}; use a smaller batch or more devices")
    kept = {g.group.name for g in best.groups}
    return dataclasses.replace(best, left_out=tuple(g for g in groups if g.name not in kept),
                               topology_name=topology.name)


def _best_layout(pricer: Pricer, chosen, probes, limits, n: int, topology, local,
                 modes=("rows", "spmd"), microbatch: int | None = None) -> UnevenPlan | None:
    """The fastest layout for this set of groups (or the one asked for, if it divides them)."""
    from tag_jax.uneven.layout import local_sizes

    sizes = local_sizes([g.size for g in chosen])
    if local is not None:
        if local not in sizes:
            raise UnevenError(f"sub-groups of {local} device(s) do not divide the groups "
                              f"{[(g.name, g.size) for g in chosen]}; use one of {list(sizes)}")
        sizes = (local,)
    def priced(layout):
        L, mode = layout
        if mode == "one":
            from tag_jax.uneven.one import plan_one

            return plan_one(pricer, chosen, limits, n, microbatch=microbatch)
        models = [pricer.group_model(g, probes, limits[g.name], L, mode) for g in chosen]
        return _priced(pricer, chosen, models, limits, n, topology, L, mode)

    candidates = [(L, m) for L in sizes for m in modes if m != "one"]
    if "one" in modes and (local is None or local == 1):
        candidates.append((1, "one"))  # its state is replicated
    best, error = _fastest(priced, candidates)
    if best is None and error is not None:
        raise error
    return best


def _fastest(build, candidates):
    """The fastest plan `build` makes from `candidates` (None if none), and the first error met
    (a candidate that cannot be planned is skipped)."""
    best, first_error = None, None
    for c in candidates:
        try:
            plan = build(c)
        except (SharesError, UnevenError) as e:
            first_error = first_error or e
            continue
        if plan is not None and (best is None or plan.step_time_s < best.step_time_s):
            best = plan
    return best, first_error


def _priced(pricer: Pricer, chosen, models, limits, n: int, topology, local: int = 1,
            mode: str = "rows") -> UnevenPlan | None:
    """The MILP's shares for this set of groups, priced exactly; None when over memory."""
    from tag_jax.uneven import layout

    sol = solve_shares(models, n)
    probes = [pricer.group_probe(k // g.size, g, local, mode) for g, k in zip(chosen, sol.shares)]
    if any(p.peak_memory_bytes > limits[g.name] for g, p in zip(chosen, probes)):
        return None
    slowest = max(p.time_s for p in probes)
    ids = tuple(i for g in chosen for i in g.device_ids)
    apply = [pricer.apply_probe(g.device_ids[0], local) for g in chosen]
    if any(a.peak_memory_bytes > limits[g.name] for g, a in zip(chosen, apply)):
        return None
    spmd = mode == "spmd"
    kinds = layout.combine_bytes(pricer.combined, local, spmd) if len(ids) > 1 else {}
    gather = {"all-gather": layout.gather_bytes(pricer.inputs, local)} if local > 1 else {}
    shares = []
    for g, k, p in zip(chosen, sol.shares, probes):
        if spmd:
            gs = pricer.group_strategy(k // g.size, g, local)
            kinds_g = {a: int(v) for a, v in gs.cost.comm_bytes_by_kind.items() if v}
            if g.size == local > 1:
                # one sub-group: the group's all-reduce of a gradient feeds only this device's
                # chunk of it, which XLA compiles as a reduce-scatter (priced as the all-reduce).
                # Only the results the strategy all-reduces at the end (left partial, whole): one
                # it reduced otherwise (gpt2's tied embedding, reduce-scattered and gathered back,
                # `group_spmd`) is no all-reduce to move, subtracting it went negative
                cut = sum(gs.graph.tensors[t].nbytes for t in gs.graph.outputs
                          if layout.shard_dim(gs.graph.tensors[t].shape, local) is not None
                          and _left_partial(gs, t))
                kinds_g["all-reduce"] = kinds_g.get("all-reduce", 0) - cut
                kinds_g["reduce-scatter"] = kinds_g.get("reduce-scatter", 0) + cut // local
                kinds_g = {a: v for a, v in kinds_g.items() if v}
            for a, v in gather.items():
                kinds_g[a] = kinds_g.get(a, 0) + v
            own = tuple(sorted(kinds_g.items()))
        else:
            gs, own = None, tuple(sorted(gather.items()))
        shares.append(GroupShare(g, k, p.time_s, slowest - p.time_s, p.peak_memory_bytes, own, gs))
    return UnevenPlan(
        groups=tuple(shares), group_program=mode,
        batch=n, combine_s=pricer.combine_s(ids, chosen, local, spmd) if len(ids) > 1 else 0.0,
        combine_bytes=sum(kinds.values()), apply_s=max(a.time_s for a in apply),
        relaxed=sol.relaxed, local=local, gather_pairs=() if spmd else tuple(sorted(gather.items())),
        combine_pairs=tuple(sorted(kinds.items())))


def _left_partial(gs, tid: int) -> bool:
    """Does the group strategy leave graph result `tid` an unreduced sum, whole (all-reduced at the
    end of the program)?"""
    p = gs.graph.tensors[tid].producer
    if p is None:
        return False
    op = gs.graph.ops[p]
    s = gs.ops[p][gs.strategy.choices[p]].outputs[op.outputs.index(tid)]
    return bool(s.partial) and not s.axes
