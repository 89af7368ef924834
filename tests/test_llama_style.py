"""A Llama-style decoder (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU; Hugging
Face's layer names; `tag_jax.models.llama`, outside the zoo): the baselines read its names, and
its sharded steps equal the unsharded one."""
import jax
import numpy as np
from jax.sharding import PartitionSpec as P

import tag_jax
from tag_jax import models

TOPO = tag_jax.Topology.preset("2x4-v100-25gbe")


def _example():
    # SGD: Adam divides by |g|, so reassociated sums move tiny gradients by more than 1e-5
    ex = models.get("llama", "toy", optimizer="sgd")
    return ex, *ex.init(jax.random.key(0))


def _mesh():
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _assert_close(got, want):
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_megatron_splits_hugging_face_projections_and_equals_the_unsharded_step():
    ex, state, batch = _example()
    step = tag_jax.baselines.megatron(ex.step, _mesh(), topology=TOPO)
    specs = {a.path.split("params/")[-1]: a.sharding.to_partition_spec()
             for a in step.plan(state, batch).arguments if a.path.startswith("state/params/")}
    for proj in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):  # column-parallel
        assert specs[f"layers_0/{proj}/kernel"] == P(None, "model")
    for proj in ("o_proj", "down_proj"):  # row-parallel
        assert specs[f"layers_1/{proj}/kernel"] == P("model")
    assert specs["layers_0/input_layernorm/weight"] == P()
    _assert_close(step(state, batch), jax.jit(ex.step)(state, batch))


def test_auto_shard_of_a_llama_step_equals_the_unsharded_step():
    ex, state, batch = _example()
    step = tag_jax.auto_shard(ex.step, _mesh(), topology=TOPO, time_budget_s=1.0)
    _assert_close(step(state, batch), jax.jit(ex.step)(state, batch))


def test_llama_stays_outside_the_zoo():
    assert "llama" not in models.names() and "llama" in models.EXTRA
