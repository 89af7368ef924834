"""`tag-jax train-policy`: retrain the learned policy from scratch (the same as
`python -m tag_jax.policy.train`)."""
from __future__ import annotations

import argparse

from tag_jax.cli import inputs

NAME = "train-policy"
HELP = "retrain the planner's learned policy (GNN) by imitating the search"
DESCRIPTION = """\
Generates random models and random clusters, runs the search on each (the teacher; results are
cached, so a rerun resumes), turns every problem into a joint op-group/device graph and fits the
graph network to the search's choices. Progress goes to stderr. By default the new weights replace
the ones shipped in the package (tag_jax/policy/weights/policy.npz), which auto_shard uses; give
--out to write them elsewhere and load them with auto_shard(..., policy=PATH). The full default run
takes about 13 minutes on 2 cores."""


def epilog() -> str:
    return """examples:
  tag-jax train-policy                                       # the shipped weights, from scratch
  tag-jax train-policy --problems 20 --budget 1 --out mine.npz --cache /tmp/policy-cache
  python -c "from tag_jax.policy import default_policy; print(default_policy())"  # what auto_shard loads"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tag_jax.policy import train

    train.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    from tag_jax.policy import train

    problem = train.check_arguments(args)
    if problem:
        raise inputs.CLIError(problem)
    train.run(args)
    return 0
