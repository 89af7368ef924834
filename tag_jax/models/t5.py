"""T5 encoder-decoder (v1.0 layout): RMSNorm, no biases, ReLU feed-forward, shared embedding,
relative position bias (one small table per stack, shared by its layers), cross-attention.
"""
import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from flax import linen as nn

from tag_jax.models._common import ModelSpec, Task, cross_entropy
from tag_jax.models._layers import MultiHeadAttention, normal


@dataclasses.dataclass(frozen=True)
class T5Config:
    n_layer: int          # per stack (encoder and decoder each)
    d_model: int
    n_head: int
    d_ff: int
    vocab: int = 32128
    enc_seq: int = 512
    dec_seq: int = 128
    batch: int = 32
    num_buckets: int = 32
    max_distance: int = 128


CONFIGS = {
    "toy": T5Config(n_layer=2, d_model=32, n_head=4, d_ff=64, vocab=128, enc_seq=16, dec_seq=8,
                    batch=8, num_buckets=8, max_distance=16),
    "base": T5Config(n_layer=12, d_model=768, n_head=12, d_ff=3072),
}


def relative_buckets(tq: int, tk: int, *, bidirectional: bool, num_buckets: int,
                     max_distance: int):
    """[tq, tk] int32 bucket of each (query, key) offset: one bucket per offset up to a few
    positions, then log-spaced up to max_distance, beyond which all offsets share the last bucket.
    Bidirectional stacks spend half the buckets on keys after the query."""
    q = lax.broadcasted_iota(jnp.int32, (tq, tk), 0)
    k = lax.broadcasted_iota(jnp.int32, (tq, tk), 1)
    back = q - k  # > 0 when the key precedes the query
    if bidirectional:
        num_buckets //= 2
        offset = jnp.where(back < 0, num_buckets, 0)
        dist = jnp.abs(back)
    else:
        offset = 0
        dist = jnp.maximum(back, 0)
    exact = num_buckets // 2
    log_ratio = jnp.log(jnp.maximum(dist, 1) / exact) / jnp.log(max_distance / exact)
    far = exact + (log_ratio * (num_buckets - exact)).astype(jnp.int32)
    far = jnp.minimum(far, num_buckets - 1)
    return offset + jnp.where(dist < exact, dist, far)


class T5Block(nn.Module):
    cfg: T5Config
    decoder: bool

    @nn.compact
    def __call__(self, x, bias, encoded=None):
        cfg = self.cfg
        # T5 does not scale q.k by 1/sqrt(d); the query init is scaled instead.
        attn = lambda name: MultiHeadAttention(cfg.n_head, use_bias=False, scale=False,
                                               init_std=cfg.d_model ** -0.5, name=name)
        norm = lambda name: nn.RMSNorm(epsilon=1e-6, name=name)
        x = x + attn("self_attn")(norm("ln_self")(x), causal=self.decoder, bias=bias)
        if self.decoder:
            x = x + attn("cross_attn")(norm("ln_cross")(x), encoded)
        h = norm("ln_ff")(x)
        h = nn.relu(nn.Dense(cfg.d_ff, use_bias=False, kernel_init=normal(cfg.d_model ** -0.5),
                             name="wi")(h))
        return x + nn.Dense(cfg.d_model, use_bias=False, kernel_init=normal(cfg.d_ff ** -0.5),
                            name="wo")(h)


class T5Stack(nn.Module):
    cfg: T5Config
    decoder: bool

    @nn.compact
    def __call__(self, x, encoded=None):
        cfg = self.cfg
        t = x.shape[1]
        buckets = relative_buckets(t, t, bidirectional=not self.decoder,
                                   num_buckets=cfg.num_buckets, max_distance=cfg.max_distance)
        table = nn.Embed(cfg.num_buckets, cfg.n_head, embedding_init=normal(0.02), name="rel_bias")
        bias = table(buckets).transpose(2, 0, 1)[None]  # [1, H, Tq, Tk]
        for i in range(cfg.n_layer):
            x = T5Block(cfg, self.decoder, name=f"block_{i}")(x, bias, encoded)
        return nn.RMSNorm(epsilon=1e-6, name="final_ln")(x)


class T5(nn.Module):
    cfg: T5Config

    @nn.compact
    def __call__(self, inputs, decoder_inputs):
        cfg = self.cfg
        shared = nn.Embed(cfg.vocab, cfg.d_model, embedding_init=normal(1.0), name="shared")
        encoded = T5Stack(cfg, decoder=False, name="encoder")(shared(inputs))
        h = T5Stack(cfg, decoder=True, name="decoder")(shared(decoder_inputs), encoded)
        # Tied output layer; the d^-0.5 keeps logits O(1) with a unit-variance embedding.
        return jnp.einsum("btd,vd->btv", h * cfg.d_model ** -0.5, shared.embedding)


def shift_right(targets):
    """Teacher forcing: the decoder sees [0, y_0, ..., y_{T-2}] (0 is T5's start/pad id)."""
    return jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))


def task(cfg: T5Config) -> Task:
    model = T5(cfg)

    def sample_batch(key):
        ki, kt = jax.random.split(key)
        tokens = lambda k, n: jax.random.randint(k, (cfg.batch, n), 0, cfg.vocab, jnp.int32)
        return {"inputs": tokens(ki, cfg.enc_seq), "targets": tokens(kt, cfg.dec_seq)}

    def loss(variables, batch):
        logits = model.apply(variables, batch["inputs"], shift_right(batch["targets"]))
        return cross_entropy(logits, batch["targets"]), {}, {}

    return Task(model, sample_batch, lambda b: (b["inputs"], shift_right(b["targets"])), loss)


SPEC = ModelSpec("t5", "T5 encoder-decoder (relative position bias, tied embedding)", CONFIGS, task)
