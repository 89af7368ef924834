"""A Llama-style decoder (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU; Hugging
Face's layer names), which the zoo does not have: the baselines read its names, and its sharded
steps equal the unsharded one."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import tag_jax

TOPO = tag_jax.Topology.preset("2x4-v100-25gbe")
D, HEADS, KV_HEADS, FF, VOCAB = 32, 4, 2, 64, 128


class RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w


def rotary(x):
    half = x.shape[-1] // 2
    angle = jnp.arange(x.shape[1])[:, None] / (10000 ** (jnp.arange(half) / half))[None, :]
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        b, s, _ = x.shape
        hd = D // HEADS
        h = RMSNorm(name="input_layernorm")(x)
        q = rotary(nn.Dense(D, use_bias=False, name="q_proj")(h).reshape(b, s, HEADS, hd))
        k = rotary(nn.Dense(KV_HEADS * hd, use_bias=False, name="k_proj")(h).reshape(b, s, KV_HEADS, hd))
        v = nn.Dense(KV_HEADS * hd, use_bias=False, name="v_proj")(h).reshape(b, s, KV_HEADS, hd)
        k, v = (jnp.repeat(t, HEADS // KV_HEADS, axis=2) for t in (k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -1e9)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v).reshape(b, s, D)
        x = x + nn.Dense(D, use_bias=False, name="o_proj")(o)
        h = RMSNorm(name="post_attention_layernorm")(x)
        gate = nn.Dense(FF, use_bias=False, name="gate_proj")(h)
        up = nn.Dense(FF, use_bias=False, name="up_proj")(h)
        return x + nn.Dense(D, use_bias=False, name="down_proj")(nn.silu(gate) * up)


class Llama(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, D, name="embed_tokens")(ids)
        for i in range(2):
            x = Block(name=f"layers_{i}")(x)
        return nn.Dense(VOCAB, use_bias=False, name="lm_head")(RMSNorm(name="norm")(x))


TX = optax.sgd(0.1)  # Adam divides by |g|: reassociated sums move tiny gradients by more than 1e-5 (DESIGN.md)


def llama_step(state, batch):
    def loss_fn(params):
        logits = Llama().apply({"params": params}, batch["ids"][:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["ids"][:, 1:]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = TX.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss


def _inputs():
    ids = jax.random.randint(jax.random.key(1), (8, 17), 0, VOCAB)
    params = Llama().init(jax.random.key(0), ids[:, :-1])["params"]
    return {"params": params, "opt_state": TX.init(params)}, {"ids": ids}


def _mesh():
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _assert_close(got, want):
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_megatron_splits_hugging_face_projections_and_equals_the_unsharded_step():
    state, batch = _inputs()
    step = tag_jax.baselines.megatron(llama_step, _mesh(), topology=TOPO)
    specs = {a.path.split("params/")[-1]: a.sharding.to_partition_spec()
             for a in step.plan(state, batch).arguments if a.path.startswith("state/params/")}
    for proj in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):  # column-parallel
        assert specs[f"layers_0/{proj}/kernel"] == jax.sharding.PartitionSpec(None, "model")
    for proj in ("o_proj", "down_proj"):  # row-parallel
        assert specs[f"layers_1/{proj}/kernel"] == jax.sharding.PartitionSpec("model")
    assert specs["layers_0/input_layernorm/weight"] == jax.sharding.PartitionSpec()
    _assert_close(step(state, batch), jax.jit(llama_step)(state, batch))


def test_auto_shard_of_a_llama_step_equals_the_unsharded_step():
    state, batch = _inputs()
    step = tag_jax.auto_shard(llama_step, _mesh(), topology=TOPO, time_budget_s=1.0)
    _assert_close(step(state, batch), jax.jit(llama_step)(state, batch))
