"""Attention written out by hand, shared by the transformer families.

Plain einsums (no fused attention kernels) so the planner's tracer sees ordinary dot_generals,
and weights stay 2-D [d_in, d_out] like the Hugging Face checkpoints people know.
"""
import math

import jax
import jax.numpy as jnp
from jax import lax
from flax import linen as nn

normal = nn.initializers.normal


def causal_mask(tq: int, tk: int):
    """[tq, tk] bool, True where query i may see key j (j <= i); built from iota, not a constant."""
    i = lax.broadcasted_iota(jnp.int32, (tq, tk), 0)
    j = lax.broadcasted_iota(jnp.int32, (tq, tk), 1)
    return j <= i


def attend(q, k, v, *, causal=False, bias=None, scale=True):
    """Softmax attention. q: [B, Tq, H, Dh], k/v: [B, Tk, H, Dh]; bias broadcasts to [B, H, Tq, Tk].
    """
    if scale:
        q = q / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)  # softmax in float32
    if bias is not None:
        scores = scores + bias
    if causal:
        scores = jnp.where(causal_mask(*scores.shape[-2:]), scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def split_heads(x, num_heads):
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x):
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


class MultiHeadAttention(nn.Module):
    """Separate query/key/value/out projections (BERT, ViT, T5); `context` gives cross-attention."""

    num_heads: int
    use_bias: bool = True
    scale: bool = True  # T5 folds the 1/sqrt(d) into its initialisation instead
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x, context=None, *, causal=False, bias=None):
        context = x if context is None else context
        d = x.shape[-1]
        dense = lambda name: nn.Dense(d, use_bias=self.use_bias, kernel_init=normal(self.init_std),
                                      name=name)
        q = split_heads(dense("query")(x), self.num_heads)
        k = split_heads(dense("key")(context), self.num_heads)
        v = split_heads(dense("value")(context), self.num_heads)
        y = attend(q, k, v, causal=causal, bias=bias, scale=self.scale)
        return dense("out")(merge_heads(y))
