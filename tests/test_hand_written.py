"""baselines.hand_written: the user's own PartitionSpecs priced and run like the other plans."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import tag_jax
from tag_jax import models
from tag_jax.hand_written import SpecError

TOPO = tag_jax.Topology.preset("2x4-v100-25gbe")


def _mesh():
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def test_hand_written_data_parallel_is_priced_as_the_baseline_and_runs():
    ex = models.get("mlp", "toy", optimizer="sgd")
    state, batch = ex.init(jax.random.key(0))
    mine = tag_jax.baselines.hand_written(ex.step, _mesh(), (None, P(("data", "model"))), topology=TOPO)
    plan = mine.plan(state, batch)
    dp = tag_jax.baselines.data_parallel(ex.step, _mesh(), topology=TOPO).plan(state, batch)
    assert {a.path: a.sharding for a in plan.arguments} == {a.path: a.sharding for a in dp.arguments}
    assert plan.cost.step_time_s == pytest.approx(dp.cost.step_time_s, rel=1e-9)
    got, want = mine(state, batch), jax.jit(ex.step)(state, batch)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_per_leaf_specs_and_the_errors_name_the_argument():
    ex = models.get("mlp", "toy", optimizer="sgd")
    specs = ({"params": {"dense_0": {"kernel": P(None, "model"), "bias": P("model")}}, "opt_state": None,
              "step": None}, P("data"))
    with pytest.raises(SpecError, match=r"in_specs\[0\] does not match argument 0"):
        tag_jax.baselines.hand_written(ex.step, _mesh(), specs, topology=TOPO).plan(ex.state, ex.batch)
    params = {k: ({"kernel": P(None, "model"), "bias": P("model")} if k == "dense_0" else None)
              for k in ex.state["params"]}
    plan = tag_jax.baselines.hand_written(
        ex.step, _mesh(), ({"params": params, "opt_state": None, "step": None}, P("data")),
        topology=TOPO).plan(ex.state, ex.batch)
    specs = {a.path: a.sharding.to_partition_spec() for a in plan.arguments}
    assert specs["state/params/dense_0/kernel"] == P(None, "model")
    assert specs["state/params/dense_0/bias"] == P("model")
    # a spec for a subtree covers its leaves: None replicates a whole layer, P("data") the batch
    assert specs["batch/x"] == P("data") and specs["state/params/head/kernel"] == P()
    for bad, message in (((None, P("devices")), r"argument batch/\w+:\w+\[8.*names axes \['devices'\]"),
                         ((None,), r"1 in_specs for the 2 positional argument"),
                         ((P("data"), P("data")), r"argument state/step:int32\[\]: spec .* 1 entries for 0 dims"),
                         ((None, P(("data", "model", "data"))), r"uses a mesh axis twice|not divide|splits")):
        with pytest.raises(SpecError, match=message):
            tag_jax.baselines.hand_written(ex.step, _mesh(), bad, topology=TOPO).plan(ex.state, ex.batch)


def test_auto_shard_is_never_slower_than_the_hand_written_plan_it_is_given():
    ex = models.get("mlp", "toy", optimizer="sgd")
    state, batch = ex.init(jax.random.key(0))
    mine = ({"params": {k: ({"kernel": P("data", "model"), "bias": None} if "kernel" in v else None)
                        for k, v in ex.state["params"].items()}, "opt_state": None, "step": None},
            P("data"))
    step = tag_jax.auto_shard(ex.step, _mesh(), topology=TOPO, time_budget_s=1.0, hand_written=mine)
    plan = step.plan(state, batch)
    [name] = [k for k in plan.search.seeds if k.startswith("hand-written")]
    alone = tag_jax.baselines.hand_written(ex.step, _mesh(), mine, topology=TOPO).plan(state, batch)
    assert plan.search.seeds[name] == pytest.approx(alone.cost.step_time_s, rel=1e-9)
    assert plan.cost.step_time_s <= alone.cost.step_time_s * (1 + 1e-9)
    got, want = step(state, batch), jax.jit(ex.step)(state, batch)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pass the jax.sharding.Mesh they are written for"):
        tag_jax.auto_shard(ex.step, jax.devices(), topology=TOPO, hand_written=mine)
