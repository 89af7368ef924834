"""Two processes x 4 CPU devices, one `jax.distributed` job on 127.0.0.1 (tests/multihost_worker.py).

Each process calls auto_shard on the toy MLP step. Checked: with no search time and with a
clock-bounded search both processes end on the identical plan (auto_shard plans on process 0 and
shares it, tag_jax/multihost.py); the plan of process 0, broadcast by hand and reloaded everywhere,
runs one training step whose results span both processes' devices and equal the unsharded
single-process step.
"""
import json
import os

import jax
import numpy as np
import pytest

from multihost_job import run_job
from tag_jax import models

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
PROCESSES = 2
BUDGET_S = "0.5"
TIMEOUT_S = 150


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Run the job once; the tests below read what each process wrote."""
    out = tmp_path_factory.mktemp("multihost")
    run_job(WORKER, PROCESSES, out, (BUDGET_S,), timeout_s=TIMEOUT_S)
    return out


def _plans(job, kind):
    return [json.loads((job / f"plan_{kind}_{i}.json").read_text()) for i in range(PROCESSES)]


def test_processes_plan_identically_without_search_time(job):
    plans = _plans(job, "seeds")
    assert all(p == plans[0] for p in plans[1:])
    assert sorted(plans[0]["mesh"]["device_ids"]) == list(range(8))  # both processes' devices


def test_processes_plan_identically_with_a_search_budget(job):
    """The search is bounded by wall-clock time; auto_shard plans on process 0 and shares it."""
    plans = _plans(job, "searched")
    assert all(p == plans[0] for p in plans[1:])


def test_every_process_runs_the_plan_of_process_0(job):
    searched = _plans(job, "searched")[0]
    assert all(p == searched for p in _plans(job, "agreed"))


def test_sharded_step_across_processes_equals_unsharded(job):
    results = [dict(np.load(job / f"result_{i}.npz")) for i in range(PROCESSES)]
    assert all(int((job / f"spanning_{i}.txt").read_text()) > 0 for i in range(PROCESSES))
    ex = models.get("mlp", "toy", optimizer="sgd")
    state, batch = ex.init(jax.random.key(0))
    reference = jax.jit(ex.step)(state, batch)  # one process, one device, no sharding
    leaves = jax.tree_util.tree_leaves_with_path(reference)
    for got in results:
        assert set(got) == {jax.tree_util.keystr(p) for p, _ in leaves}
        for path, want in leaves:
            np.testing.assert_allclose(got[jax.tree_util.keystr(path)], np.asarray(want),
                                       rtol=1e-5, err_msg=jax.tree_util.keystr(path))
    np.testing.assert_array_equal(results[0]["[1]['loss']"], results[1]["[1]['loss']"])
