"""`tag-jax compare`: the planner against the hand-written plans, priced by the same simulator."""
from __future__ import annotations

import argparse
import sys
import time

from tag_jax.cli import inputs

NAME = "compare"
HELP = "compare tag_jax's plan with data parallel, FSDP, Megatron (and ILP) plans"
DESCRIPTION = """\
Plan one workload with tag_jax and with each baseline of tag_jax.baselines (data_parallel, fsdp,
megatron, and ilp when it is installed) on the same topology, and print one row per plan:
predicted step time, its ratio to tag_jax's (above 1: tag_jax is faster), peak memory per device
and the time it took to make the plan. Nothing is compiled or run; all figures are the simulator's.
Baselines use --mesh-shape when given, else a 1-D mesh of all devices (megatron views it as
data x model with model = devices per node); ilp gets --budget as its time limit."""

BASELINES = ("data_parallel", "fsdp", "megatron", "ilp")  # those present at run time are compared


def epilog() -> str:
    return f"""examples:
  tag-jax compare --model gpt2 --size small --topology 2x4-v100-25gbe --budget 10
  tag-jax compare --model mlp --size toy --mesh-shape 4,2 --budget 1

{inputs.models_epilog()}"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    inputs.add_workload_arguments(p)
    inputs.add_target_arguments(p)


def available() -> list[tuple[str, object]]:
    from tag_jax import baselines

    return [(n, getattr(baselines, n)) for n in BASELINES if callable(getattr(baselines, n, None))]


def run(args: argparse.Namespace) -> int:
    import tag_jax

    work = inputs.workload(args)
    where = inputs.target(args)
    mesh = where.for_baselines()
    rows = []  # (name, plan or None, seconds, reason)
    if not args.quiet:
        print(f"planning {work.description}\n  with tag_jax, {args.budget:g} s budget ...",
              file=sys.stderr)
    ours = tag_jax.auto_shard(work.fn, where.for_planner(),
                              topology=where.topology, time_budget_s=args.budget, seed=args.seed,
                              progress=not args.quiet)
    rows.append(_timed("tag_jax", lambda: ours.plan(*work.args)))
    for name, make in available():
        if not args.quiet:
            print(f"planning {work.name} with {name} ...", file=sys.stderr)
        # A baseline that cannot plan this case gets a row saying why; the others still compare.
        options = {"time_limit_s": args.budget} if _takes(make, "time_limit_s") else {}
        rows.append(_timed(name, lambda: make(work.fn, mesh, topology=where.topology, **options)
                           .plan(*work.args), catch=True))
    print(table(rows, work, where.topology))
    return 0


def _takes(fn, name: str) -> bool:
    """Whether a baseline has a time limit: the ILP gets the planner's budget, as a fair race."""
    import inspect

    return name in inspect.signature(fn).parameters


def _timed(name, make, catch=False):
    t0 = time.perf_counter()
    try:
        plan = make()
    except Exception as exc:
        if not catch:
            raise
        return name, None, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"
    return name, plan, time.perf_counter() - t0, ""


def table(rows, work, topology) -> str:
    from tag_jax.cost.simulate import USABLE_MEMORY

    limit = USABLE_MEMORY * min(topology.device_memory(i) for i in topology.ids)
    ours = rows[0][1].cost.step_time_s
    head = ("plan", "mesh", "predicted step", "vs tag_jax", "peak memory/device", "planning time")
    body, notes = [], []
    for name, plan, seconds, reason in rows:
        if plan is None:
            notes.append(f"  {name}: no plan ({inputs.one_line(reason)})")
            body.append((name, "-", "n/a", "-", "-", f"{seconds:.2f} s"))
            continue
        cost = plan.cost
        over = " *" if cost.peak_memory_bytes > limit else ""
        body.append((name, ",".join(f"{a}={s}" for a, s in plan.strategy.mesh.axes.items()),
                     _time(cost.step_time_s), f"{cost.step_time_s / ours:.2f}x",
                     _size(cost.peak_memory_bytes) + over, f"{seconds:.2f} s"))
        if over:
            notes.append(f"  * {name}: more than the usable {_size(limit)} per device")
    widths = [max(len(r[i]) for r in (head, *body)) for i in range(len(head))]
    align = ("<", "<", ">", ">", ">", ">")

    def line(r):
        return "  " + "  ".join(f"{c:{a}{w}}" for c, a, w in zip(r, align, widths))

    title = (f"{work.name} on '{topology.name}' ({topology.num_devices} devices): predicted by the "
             "simulator, vs tag_jax = step time / tag_jax's")
    return "\n".join([title, line(head), *map(line, body), *notes])


def _time(s: float) -> str:
    return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.3f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
