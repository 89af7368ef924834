"""Uneven work across device groups: each group of like devices runs its own SPMD program on its
share of the batch (shares from a MILP over simulated group times), one program over all devices
combines the gradients exactly, and the optimizer update follows. Or (mode "one",
`tag_jax.uneven.one`) one program over all devices in which each device runs its own number of
microbatches and the gradient all-reduce overlaps the last microbatch's backward pass.

    step = tag_jax.uneven.split_step(loss_fn, optax.sgd(1e-2))      # or UnevenStep(grad_fn, apply_fn)
    plan = tag_jax.uneven.plan_uneven(step, state, batch, topology)  # abstract inputs are fine
    program = tag_jax.uneven.UnevenProgram(step, plan)
    state, metrics = program(program.shard_state(state), batch)
    print(plan.summary())

Through the main API (`tag_jax.uneven.auto`): `tag_jax.auto_shard(step, devices, topology=...)`
with an `UnevenStep` plans uneven work on heterogeneous devices where it is predicted faster
(`uneven="auto"`, or True / False), and runs whichever plan it chose.
"""
from tag_jax.uneven.auto import UnevenFunction  # noqa: F401
from tag_jax.uneven.choose import Choice, choose  # noqa: F401
from tag_jax.uneven.groups import Group, check_groups, device_groups  # noqa: F401
from tag_jax.uneven.one import microbatch_sizes, plan_one  # noqa: F401
from tag_jax.uneven.one_program import OneProgram, loop_collectives  # noqa: F401
from tag_jax.uneven.plan import GroupShare, UnevenPlan  # noqa: F401
from tag_jax.uneven.price import Pricer, UnevenError  # noqa: F401
from tag_jax.uneven.program import UnevenProgram  # noqa: F401
from tag_jax.uneven.search import plan_uneven  # noqa: F401
from tag_jax.uneven.shares import GroupModel, Shares, SharesError, solve_shares  # noqa: F401
from tag_jax.uneven.steps import UnevenStep, init_state, split_step, split_train_state  # noqa: F401

__all__ = ["UnevenStep", "split_step", "split_train_state", "init_state", "Group", "device_groups", "check_groups",
           "GroupModel", "Shares", "SharesError", "solve_shares", "Pricer", "UnevenError",
           "UnevenPlan", "GroupShare", "plan_uneven", "UnevenProgram", "Choice", "choose",
           "UnevenFunction", "OneProgram", "plan_one", "microbatch_sizes", "loop_collectives"]
