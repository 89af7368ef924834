"""Mode "one" (the plan's `group_program = "one"`): ONE program over all the plan's devices, in which
each device runs its own number of equal microbatches; pricing and the choice of counts.

The program (`tag_jax.uneven.one_program`) is a shard_map over a 1-D mesh ("devices",) of every
device taking part. Device d accumulates the mean-loss gradient of c_d - 1 microbatches of m
examples in a `lax.while_loop` whose trip count it reads from its own row of an int array (no
collective inside the loop); the LAST microbatch is peeled out of the loop and done by every
device, so each gradient leaf is acc + g_last and its psum (weighted m / N: the gradient of the
mean loss over the global batch of N = m * sum_d c_d examples) can start as soon as the last
backward pass produces that leaf. The optimizer update follows in the same jitted program, on the
replicated state (no collective).

Pricing, per device of kind g (every device of a group has the same count c_g):

    time_g = (c_g - 1) * t_g(m) + last_g(m)

    t_g(m)     the loop body (`grad_fn` at m examples plus the accumulation), the simulator's cost
               on one device of kind g, traced at m (no scaling of op times)
    last_g(m)  `grad_fn` at m examples on one device of kind g (the simulator's cost), with the
               program's only collectives, one all-reduce of each gradient and metric leaf over
               ALL the plan's devices (real links), each started when its leaf is produced and
               so overlapped with the rest of the backward pass (`last_cost`), plus the
               accumulation's add

The step is the slowest device's time plus the update (`Pricer.apply_probe`, replicated). Pricing
the last microbatch "as if every device were of kind g" is the documented approximation: the
all-reduce of a leaf can start only when every device has produced it, and the counts balance the
devices so that they finish their backward passes together; then the devices whose last backward
is shortest (the fastest kind) produce each leaf last, and their estimate is the binding one
(the maximum over kinds that the step takes). Where the counts do not balance exactly, a slower
kind's leaves arrive later than its own estimate assumes only by less than its idle time.

Counts: for each microbatch size m (divisors of N that leave every device at least one
microbatch, a few of them, `microbatch_sizes`) the shares MILP (`shares.solve_shares`) splits N
with group g's share a multiple of |g| * m (c_g >= 1 microbatches per device), time model
fixed_g = last_g - t_g and t_g per microbatch; the fastest m wins.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from tag_jax.uneven.groups import Group
from tag_jax.uneven.plan import GroupShare, UnevenPlan
from tag_jax.uneven.price import Pricer, Probe, UnevenError, _replicated_cost, batch_at
from tag_jax.uneven.shares import GroupModel, SharesError, solve_shares

MAX_MICROBATCH_SIZES = 4


def microbatch_sizes(n: int, devices: int, most: int = MAX_MICROBATCH_SIZES) -> tuple[int, ...]:
    """Candidate microbatch sizes: divisors m of the batch n with n / m >= devices (every device
    does at least one microbatch), the largest first, then roughly halving (at most `most`)."""
    top = n // max(1, devices)
    divisors = [m for m in range(1, top + 1) if n % m == 0]
    out: list[int] = []
    target = float(top)
    while divisors and len(out) < most and target >= 1:
        m = max(d for d in divisors if d <= target)
        if m not in out:
            out.append(m)
        target /= 2
    return tuple(out)


def _memo(pricer: Pricer) -> dict:
    if not hasattr(pricer, "_one"):
        pricer._one = {}
    return pricer._one


def body_graph(pricer: Pricer, m: int):
    """The loop body's graph at m examples: acc + grad_fn(params, microbatch), leaf by leaf."""
    memo = _memo(pricer)
    key = ("body", m)
    if key not in memo:
        from tag_jax.hlo.trace import trace

        grad_fn = pricer.step.grad_fn

        def accumulate(params, acc, batch):
            return jax.tree_util.tree_map(lambda a, g: a + g, acc, grad_fn(params, batch))

        accumulate.__name__ = f"{pricer.step.name}_microbatch_m{m}"
        memo[key] = trace(accumulate, pricer.inputs, pricer.combined, batch_at(pricer.batch, m),
                          roles={"params": "parameter", "acc": "gradient", "batch": "batch"})
    return memo[key]


def body_probe(pricer: Pricer, m: int, device_id: int) -> Probe:
    """One loop iteration on a device of this kind."""
    memo = _memo(pricer)
    d = pricer.topology.device(device_id)
    key = ("body cost", m, d.kind, d.flops_fp32, d.matmul_flops_fp32, d.memory_bandwidth)
    if key not in memo:
        cost = _replicated_cost(body_graph(pricer, m), pricer.topology, device_id)
        memo[key] = Probe(m, cost.step_time_s, cost.peak_memory_bytes)
    return memo[key]


def last_cost(pricer: Pricer, m: int, device_ids: Sequence[int], kind_of: int):
    """The `Cost` of the last microbatch on a device of `kind_of`'s kind: `grad_fn` at m examples
    on the device alone (the simulator's replicated cost), then one all-reduce of every gradient
    and metric leaf over `device_ids`, each starting when the backward pass has produced its leaf,
    one at a time in that order (the simulator's communication stream), so overlapped with the
    rest of the backward pass. The compiled shard_map program has only these psums: the
    data-parallel GSPMD strategy priced before added collectives it never does (a reduce-scatter
    and gather of an embedding's gradient, all-to-alls: benchmarks/UNEVEN_FIDELITY.md)."""
    memo = _memo(pricer)
    ids = tuple(device_ids)
    d = pricer.topology.device(kind_of)
    key = ("last", m, ids, d.kind, d.flops, d.flops_fp32, d.matmul_flops_fp32, d.memory_bandwidth)
    if key in memo:
        return memo[key]
    graph = pricer.local_graph(m)
    cost = _replicated_cost(graph, pricer.topology, kind_of, per_op=True)
    done = np.cumsum([c for _, c, _ in cost.per_op])  # ops run in program order
    ready = sorted((float(done[graph.tensors[t].producer]) if graph.tensors[t].producer is not None else 0.0,
                    graph.tensors[t].nbytes) for t in graph.outputs)
    free, comm_s, nbytes = 0.0, 0.0, 0
    for at, b in ready if len(ids) > 1 else ():
        dt = pricer.topology.collective_time("all-reduce", b, ids)
        free, comm_s, nbytes = max(free, at) + dt, comm_s + dt, nbytes + b
    memo[key] = dataclasses.replace(cost, step_time_s=max(cost.compute_s, free), comm_s=comm_s,
                                    comm_bytes=nbytes, comm_bytes_by_kind={"all-reduce": nbytes},
                                    per_op=None, reshards=None)
    return memo[key]


def plan_one(pricer: Pricer, chosen: Sequence[Group], limits: dict, n: int, *,
             microbatch: int | None = None) -> UnevenPlan | None:
    """The fastest mode-"one" plan on these groups (None when none fits in memory); raises
    `UnevenError` when no microbatch size and counts can serve the batch."""
    chosen = tuple(chosen)
    D = sum(g.size for g in chosen)
    sizes = microbatch_sizes(n, D) if microbatch is None else (microbatch,)
    if microbatch is not None and (microbatch < 1 or n % microbatch or n // microbatch < D):
        raise UnevenError(
            f"one program: microbatches of {microbatch} example(s) cannot serve a global batch of {n} "
            f"on {D} devices (the batch must be a multiple of the microbatch, with at least one "
            f"microbatch per device, {D} x {microbatch} = {D * microbatch} examples); pass one of "
            f"{list(microbatch_sizes(n, D, most=10 ** 6))} or another batch size")
    if not sizes:
        raise UnevenError(
            f"one program: a global batch of {n} example(s) is too small for {D} devices "
            f"{[g.name for g in chosen]}: every device does at least one microbatch; use a batch "
            f"of at least {D} examples, or fewer devices")
    best, errors = None, []
    for m in sizes:
        try:
            plan = _priced(pricer, chosen, limits, n, m)
        except SharesError as e:
            errors.append(f"m={m}: {e}")
            continue
        if plan is not None and (best is None or plan.step_time_s < best.step_time_s):
            best = plan
    if best is None and len(errors) == len(sizes):
        g = math.gcd(*(g.size for g in chosen))
        raise UnevenError(
            f"one program: no split of the global batch {n} into equal microbatches with one count "
            f"per device group: groups {[(g.name, g.size) for g in chosen]} need N = m x sum_g "
            f"|g| x c_g (c_g >= 1), tried microbatch sizes m in {list(sizes)}; use a batch that is "
            f"a multiple of {g} (the groups' common divisor) with at least {D} examples, or other "
            f"groups. First failure: {errors[0]}")
    return best


def _priced(pricer: Pricer, chosen: tuple[Group, ...], limits: dict, n: int, m: int) -> UnevenPlan | None:
    from tag_jax.uneven import layout

    ids = tuple(i for g in chosen for i in g.device_ids)
    first = [g.device_ids[0] for g in chosen]
    body = [body_probe(pricer, m, i) for i in first]
    grad = [pricer.probe(m, i) for i in first]
    last = [last_cost(pricer, m, ids, i) for i in first]
    # the last microbatch adds the accumulator too (acc + g_last) before its all-reduce
    last_s = [c.step_time_s + max(0.0, b.time_s - p.time_s) for c, b, p in zip(last, body, grad)]
    models = [GroupModel(g.name, max(0.0, ls - b.time_s), b.time_s / (g.size * m), g.size * m)
              for g, b, ls in zip(chosen, body, last_s)]
    sol = solve_shares(models, n)
    counts = [k // (g.size * m) for g, k in zip(chosen, sol.shares)]
    times = [(c - 1) * b.time_s + ls for c, b, ls in zip(counts, body, last_s)]
    slowest = max(times)
    per_example = sum(layout.nbytes(x.shape[1:], x.dtype) for x in jax.tree_util.tree_leaves(pricer.batch))
    acc_bytes = sum(pricer.combined_bytes)
    padded = per_example * max(counts) * m
    peaks = [int(c.peak_memory_bytes + acc_bytes + pricer.resident_bytes + padded) for c in last]
    if any(p > limits[g.name] for g, p in zip(chosen, peaks)):
        return None
    apply = [pricer.apply_probe(i, 1) for i in first]
    if any(a.peak_memory_bytes > limits[g.name] for g, a in zip(chosen, apply)):
        return None
    # the program's only collective: the psum of every gradient and metric leaf
    kinds = {"all-reduce": sum(pricer.combined_bytes)} if len(ids) > 1 else {}
    shares = tuple(GroupShare(g, k, t, slowest - t, p, (), None,
                              exposed_s=max(0.0, c.step_time_s - c.compute_s))
                   for g, k, t, p, c in zip(chosen, sol.shares, times, peaks, last))
    return UnevenPlan(groups=shares, batch=n, combine_s=0.0, combine_bytes=sum(kinds.values()),
                      apply_s=max(a.time_s for a in apply), relaxed=sol.relaxed, local=1,
                      combine_pairs=tuple(sorted(kinds.items())), group_program="one",
                      microbatch=m, overlapped_comm_s=max(c.comm_s for c in last))


def per_device_counts(plan: UnevenPlan) -> tuple[int, ...]:
    """Microbatches per device, in the order of `plan.device_ids`."""
    return tuple(g.share // (g.group.size * plan.microbatch) for g in plan.groups
                 for _ in g.group.device_ids)


def check_plan(plan: UnevenPlan, n: int | None = None) -> None:
    """Raise `UnevenError` unless `plan` is a consistent mode-"one" plan (for batch `n`)."""
    m = plan.microbatch
    if plan.group_program != "one" or m < 1:
        raise UnevenError(f"not a one-program plan (group_program={plan.group_program!r}, "
                          f"microbatch={m}); make it with plan_uneven(..., group_program='one')")
    for g in plan.groups:
        if g.share < g.group.size * m or g.share % (g.group.size * m):
            raise UnevenError(f"group {g.group.name!r}: share {g.share} is not a positive multiple of "
                              f"{g.group.size} device(s) x microbatch {m}; every device of a group "
                              "runs the same number (>= 1) of microbatches")
    if sum(plan.shares) != plan.batch:
        raise UnevenError(f"the shares {plan.shares} sum to {sum(plan.shares)}, not the plan's batch "
                          f"{plan.batch}")
    if n is not None and n != plan.batch:
        raise UnevenError(f"the plan splits a batch of {plan.batch} examples into microbatches of {m} "
                          f"({per_device_counts(plan)} per device); this batch has {n}: plan again for it")
