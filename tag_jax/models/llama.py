"""Llama-style decoder (RMSNorm, rotary positions, grouped-query attention, SwiGLU; Hugging Face's
layer names). Outside the benchmark zoo on purpose (`models.EXTRA`): no rule, baseline or
simulator figure was tuned on it, so it checks that they carry over to a model they never saw
(benchmarks/FIDELITY_UNSEEN.md, tests/test_llama_style.py).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from tag_jax.models._common import ModelSpec, Task, causal_lm_task


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int   # grouped-query attention: each key/value head serves n_head / n_kv_head
    d_ff: int
    vocab: int
    seq: int
    batch: int
    remat: bool = False


CONFIGS = {
    "toy": LlamaConfig(n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=64, vocab=128, seq=16,
                       batch=8),
    "medium": LlamaConfig(n_layer=8, d_model=1024, n_head=16, n_kv_head=4, d_ff=2816,
                          vocab=32000, seq=1024, batch=16),
    "1b": LlamaConfig(n_layer=16, d_model=2048, n_head=16, n_kv_head=8, d_ff=5632, vocab=32000,
                      seq=2048, batch=8, remat=True),
}


class RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w


def rotary(x):
    """Rotary position embedding over the last dim of [batch, seq, heads, head_dim]."""
    half = x.shape[-1] // 2
    angle = jnp.arange(x.shape[1])[:, None] / (10000 ** (jnp.arange(half) / half))[None, :]
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class Block(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        b, s, _ = x.shape
        hd = cfg.d_model // cfg.n_head
        dense = lambda n, name: nn.Dense(n, use_bias=False, name=name)
        h = RMSNorm(name="input_layernorm")(x)
        q = rotary(dense(cfg.d_model, "q_proj")(h).reshape(b, s, cfg.n_head, hd))
        k = rotary(dense(cfg.n_kv_head * hd, "k_proj")(h).reshape(b, s, cfg.n_kv_head, hd))
        v = dense(cfg.n_kv_head * hd, "v_proj")(h).reshape(b, s, cfg.n_kv_head, hd)
        k, v = (jnp.repeat(t, cfg.n_head // cfg.n_kv_head, axis=2) for t in (k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -1e9)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v).reshape(b, s, cfg.d_model)
        x = x + dense(cfg.d_model, "o_proj")(o)
        h = RMSNorm(name="post_attention_layernorm")(x)
        gate, up = dense(cfg.d_ff, "gate_proj")(h), dense(cfg.d_ff, "up_proj")(h)
        return x + dense(cfg.d_model, "down_proj")(nn.silu(gate) * up)


class Llama(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.cfg
        x = nn.Embed(cfg.vocab, cfg.d_model, name="embed_tokens")(input_ids)
        block = nn.remat(Block) if cfg.remat else Block
        for i in range(cfg.n_layer):
            x = block(cfg, name=f"layers_{i}")(x)
        x = RMSNorm(name="norm")(x)
        return nn.Dense(cfg.vocab, use_bias=False, name="lm_head")(x)


def task(cfg: LlamaConfig) -> Task:
    if cfg.n_head % cfg.n_kv_head:
        raise ValueError(f"llama: n_head={cfg.n_head} is not a multiple of n_kv_head={cfg.n_kv_head}")
    return causal_lm_task(Llama(cfg), cfg.batch, cfg.seq, cfg.vocab)


SPEC = ModelSpec("llama", "Llama-style decoder (RMSNorm, rotary, GQA, SwiGLU)", CONFIGS, task)
