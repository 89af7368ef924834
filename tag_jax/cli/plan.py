"""`tag-jax plan`: run the planner on one workload and topology, print and save the plan."""
from __future__ import annotations

import argparse
import os
import sys
import time

from tag_jax.cli import inputs

NAME = "plan"
HELP = "plan a training step for a cluster and save the plan (JSON)"
DESCRIPTION = """\
Plan a training step (a zoo model, or your own function with its example arguments) for the
devices of a topology, print the plan's summary (a PartitionSpec per argument, predicted step time,
communication and peak memory per device) and save it. Search progress goes to stderr.
Reload a saved plan with tag_jax.Plan.load(path, fn, *example_args)."""


def epilog() -> str:
    return f"""examples:
  tag-jax plan --model gpt2 --size small --topology 2x4-v100-25gbe --budget 10 --out plan.json
  tag-jax plan --model mlp --mesh-shape 4,2 --axis-names data,model --topology my_cluster.json
  tag-jax plan --function mypkg.train:train_step --args mypkg.train:example_args

{inputs.models_epilog()}"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    inputs.add_workload_arguments(p)
    inputs.add_target_arguments(p)
    p.add_argument("--out", default="plan.json", metavar="FILE",
                   help="where to save the plan (default: plan.json)")


def run(args: argparse.Namespace) -> int:
    import tag_jax

    work = inputs.workload(args)
    where = inputs.target(args)
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):  # say so now, not after the search
        raise inputs.CLIError(f"--out {args.out}: folder {folder} does not exist")
    step = tag_jax.auto_shard(work.fn, where.for_planner(),
                              topology=where.topology, time_budget_s=args.budget, seed=args.seed,
                              progress=not args.quiet)
    if not args.quiet:
        print(f"planning {work.description}\n  for topology '{where.topology.name}', "
              f"{args.budget:g} s budget ...", file=sys.stderr)
    t0 = time.perf_counter()
    plan = step.plan(*work.args)
    seconds = time.perf_counter() - t0
    print(plan.summary())
    plan.save(args.out)
    search = getattr(plan, "search", None)
    tried = f", {search.evaluations:,} evaluations" if search is not None else ""
    print(f"\nplanned in {seconds:.1f} s{tried}; saved the plan to {args.out}")
    return 0
