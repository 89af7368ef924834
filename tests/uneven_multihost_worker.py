"""One process of the two-process uneven job in test_uneven_multihost.py (no test_ prefix: pytest skips it).

    python tests/uneven_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Each process owns 4 CPU devices; the topology describes the 8 as 4 A100 on node 0 (process 0's
devices) and 4 V100 on node 1 (process 1's), so every device group of an uneven plan lives on one
process. Every process runs the same cases, each two training steps of the toy split step of
test_uneven.py from host values (the same seed everywhere):

    auto_shard   tag_jax.auto_shard(step, jax.devices(), topology=..., uneven=True)
                 (and with uneven="auto": only its choice is saved)
    rows-L4      plan_uneven(group_program="rows", local=4): per-device gradients, state sharded
    spmd-L2      plan_uneven(group_program="spmd", local=2): one SPMD program per group
    one-m2       plan_uneven(group_program="one", microbatch=2): one program, per-device
                 microbatch counts (the A100s loop more often than the V100s)

and saves per case its plan (groups, shares, mode) and the results of both steps gathered from
all processes (`process_allgather`); the test compares them with the unsplit step.
"""
from __future__ import annotations

import json
import os
import sys

from multihost_job import joined

LOCAL_DEVICES = 4
BATCH = 64
# (name, group_program, local, microbatch): microbatches of 2 give the devices unequal loop counts
CASES = (("rows-L4", "rows", 4, None), ("spmd-L2", "spmd", 2, None), ("one-m2", "one", 1, 2))


def main(argv: list[str]) -> int:
    process_id, num_processes, port, out_dir = argv
    with joined(process_id, num_processes, port, LOCAL_DEVICES):
        run(out_dir)
    return 0


def describe(plan) -> dict:
    return {"groups": [[g.group.name, list(g.group.device_ids), g.share] for g in plan.groups],
            "left_out": [g.name for g in plan.left_out], "program": plan.group_program,
            "local": plan.local, "microbatch": plan.microbatch, "batch": plan.batch,
            "counts": list(plan.counts), "step_time_s": plan.step_time_s}


def run(out_dir: str) -> None:
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    import tag_jax
    from tag_jax import uneven
    from tag_jax.uneven.plan import UnevenPlan
    from test_uneven import _hetero_cpu_topology, _problem  # tests/ is this script's directory

    pid = jax.process_index()
    devices = jax.devices()
    assert len(devices) == LOCAL_DEVICES * jax.process_count(), devices
    topo = _hetero_cpu_topology()
    # device id i of the topology is jax.devices()[i]; node k must be process k's devices
    assert [topo.device(i).node for i in range(len(devices))] == [d.process_index for d in devices], \
        ([topo.device(i).node for i in range(len(devices))], [d.process_index for d in devices])
    step, state, batch = _problem(BATCH)
    state, batch = jax.device_get((state, batch))  # host values, the same in every process

    def save(name, plan, program):
        new, metrics = program(state, batch)
        new2, metrics2 = program(new, batch)  # the next step from the program's own layout
        trees = {"step1": (new, metrics), "step2": (new2, metrics2)}
        out = {}
        for key, tree in trees.items():
            leaves = jax.tree_util.tree_leaves_with_path(tree)
            full = multihost_utils.process_allgather([a for _, a in leaves], tiled=True)
            out.update({key + jax.tree_util.keystr(p): np.asarray(x) for (p, _), x in zip(leaves, full)})
        np.savez(os.path.join(out_dir, f"{name}_{pid}.npz"), **out)
        spanning = sum(not a.is_fully_addressable for a in jax.tree_util.tree_leaves(new))
        with open(os.path.join(out_dir, f"{name}_plan_{pid}.json"), "w") as f:
            json.dump(dict(describe(plan), spanning=spanning), f)

    fn = tag_jax.auto_shard(step, devices, topology=topo, uneven=True, time_budget_s=0.5)
    plan = fn.plan(state, batch)
    assert isinstance(plan, UnevenPlan), plan
    save("auto_shard", plan, fn)
    # uneven="auto": the uneven plan weighed against the SPMD plan (process 0's, shared); the
    # choice is saved, not run
    fn = tag_jax.auto_shard(step, devices, topology=topo, time_budget_s=0.5)
    plan = fn.plan(state, batch)
    chosen = describe(plan) if isinstance(plan, UnevenPlan) else {"spmd": plan.to_dict()}
    with open(os.path.join(out_dir, f"auto_choice_plan_{pid}.json"), "w") as f:
        json.dump(dict(chosen, why=fn.why(state, batch)), f)

    groups = uneven.device_groups(topo)
    pricer = uneven.Pricer(step, state, batch, topo)
    for name, mode, local, microbatch in CASES:
        plan = uneven.plan_uneven(step, state, batch, topo, groups=groups, group_program=mode,
                                  local=local, microbatch=microbatch, pricer=pricer)
        save(name, plan, uneven.UnevenProgram(step, plan))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
