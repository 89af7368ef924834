"""auto_shard: plans that run, equal the unsharded step, and are never worse than a baseline."""
import jax
import numpy as np
import pytest

import tag_jax
from tag_jax import models
from tag_jax.search.planner import PlanningError

TOPO = tag_jax.Topology.preset("2x4-v100-25gbe")


def _mesh():
    return jax.make_mesh((8,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_auto_sharded_step_equals_unsharded_step(name):
    ex = models.get(name, "toy", optimizer="sgd")
    state, batch = ex.init(jax.random.key(0))
    step = tag_jax.auto_shard(ex.step, _mesh(), topology=TOPO, time_budget_s=2.0)
    got = step(state, batch)
    want = jax.jit(ex.step)(state, batch)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    plan = step.plan(state, batch)
    assert plan.cost.step_time_s <= min(plan.search.seeds.values()) * (1 + 1e-9)


def test_plan_is_deterministic_for_a_seed():
    ex = models.get("mlp", "toy")
    plans = [tag_jax.auto_shard(ex.step, _mesh(), topology=TOPO, time_budget_s=1.0, seed=3)
             .plan(ex.state, ex.batch) for _ in range(2)]
    # Same seed, same evaluations in the same order; the time budget may cut one run shorter, so
    # compare the seeded part: identical starting plans and an identical mesh choice when equal.
    assert plans[0].search.seeds == plans[1].search.seeds


def test_memory_limit_that_nothing_fits_names_the_largest_tensor():
    ex = models.get("gpt2", "toy")
    step = tag_jax.auto_shard(ex.step, _mesh(), topology=TOPO, time_budget_s=0.5, memory_limit=1000)
    graph = step.trace(ex.state, ex.batch)
    largest = max((graph.tensors[t] for t in graph.inputs), key=lambda t: t.nbytes)
    with pytest.raises(PlanningError, match=r"no plan fits the memory limit of 1000 B per device: "
                                            r"the best reached .*KiB \(largest tensor ") as err:
        step.plan(ex.state, ex.batch)
    assert largest.path in str(err.value)


def test_empty_device_list_is_refused():
    with pytest.raises(ValueError, match="no devices to plan for"):
        tag_jax.auto_shard(lambda x: x, [], topology=TOPO)
