"""Uneven plans under `jax.distributed`: 2 processes x 4 CPU devices on 127.0.0.1
(tests/uneven_multihost_worker.py).

The 8 devices are described as 4 A100 on node 0 (process 0's devices) and 4 V100 on node 1
(process 1's), so each group program of an uneven plan runs on one process's devices only and the
combining program spans both. Every process plans and runs the same cases (auto_shard with
uneven=True, and plan_uneven in modes "rows" with the state sharded over sub-groups of 4, "spmd"
with sub-groups of 2, and "one" with unequal microbatch counts); checked: both processes end on the
identical plan with both groups taking part, and two steps' results, gathered from both processes,
equal two unsplit single-process steps (float32, rtol 1e-5).
"""
import json
import os

import jax
import numpy as np
import pytest

from multihost_job import run_job
from test_uneven import _problem
from uneven_multihost_worker import BATCH, CASES

WORKER = os.path.join(os.path.dirname(__file__), "uneven_multihost_worker.py")
PROCESSES = 2
TIMEOUT_S = 120
NAMES = ("auto_shard",) + tuple(case[0] for case in CASES)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Run the job once; the tests below read what each process wrote."""
    out = tmp_path_factory.mktemp("uneven_multihost")
    run_job(WORKER, PROCESSES, out, timeout_s=TIMEOUT_S, what="uneven job")
    return out


@pytest.fixture(scope="module")
def reference():
    """Two unsplit steps on one device of this process, from the worker's seed."""
    step, state, batch = _problem(BATCH)
    ref = jax.jit(step.reference)
    new, metrics = ref(state, batch)
    new2, metrics2 = ref(new, batch)
    out = {}
    for key, tree in (("step1", (new, metrics)), ("step2", (new2, metrics2))):
        out.update({key + jax.tree_util.keystr(p): np.asarray(x)
                    for p, x in jax.tree_util.tree_leaves_with_path(tree)})
    return state, out


def _plans(job, name):
    return [json.loads((job / f"{name}_plan_{i}.json").read_text()) for i in range(PROCESSES)]


@pytest.mark.parametrize("name", NAMES)
def test_processes_end_on_the_same_uneven_plan(job, name):
    plans = _plans(job, name)
    assert all(p == plans[0] for p in plans[1:]), plans
    plan = plans[0]
    # both groups take part, each one process's devices; the shares cover the batch
    assert [(g, ids) for g, ids, _ in plan["groups"]] == [("a100@node0", [0, 1, 2, 3]),
                                                         ("v100@node1", [4, 5, 6, 7])]
    assert sum(k for _, _, k in plan["groups"]) == BATCH and all(k > 0 for _, _, k in plan["groups"])
    assert plan["spanning"] > 0  # the new state lives on both processes' devices
    wanted = {case[0]: case[1:] for case in CASES}
    if name in wanted:
        mode, local, microbatch = wanted[name]
        assert (plan["program"], plan["local"]) == (mode, local)
        if mode == "one":
            assert plan["microbatch"] == microbatch
            a100, v100 = plan["counts"]
            assert a100 > v100 >= 1, plan  # the devices of the two processes loop unequally


def test_processes_make_the_same_auto_choice(job):
    """uneven="auto" weighs the uneven plan against the SPMD plan (searched on the clock, so
    process 0's is shared): every process chooses the same."""
    plans = _plans(job, "auto_choice")
    assert all(p == plans[0] for p in plans[1:]), plans
    assert plans[0]["why"].startswith(("uneven plan", "one SPMD program"))


@pytest.mark.parametrize("name", NAMES)
def test_two_steps_across_processes_equal_unsplit_steps(job, reference, name):
    state, want = reference
    for i in range(PROCESSES):
        got = dict(np.load(job / f"{name}_{i}.npz"))
        assert set(got) == set(want), (sorted(got), sorted(want))
        for key, value in want.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-7, err_msg=f"process {i}: {key}")
        assert int(got["step1[0]['step']"]) == 1 and int(got["step2[0]['step']"]) == 2
    # the parameters moved: the comparison is of an update, not of two copies of the input
    assert not np.allclose(want["step1[0]['params']['w1']"], np.asarray(state["params"]["w1"]))
