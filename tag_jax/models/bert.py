"""BERT encoder with its masked-LM head (post-LayerNorm, exact GELU, decoder tied to embeddings).

The loss is taken at every position and weighted by a 0/1 mask, so shapes stay static whatever
fraction of tokens is masked. No pooler / next-sentence head: masked-LM pretraining needs neither.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from tag_jax.models._common import ModelSpec, Task, cross_entropy
from tag_jax.models._layers import MultiHeadAttention, normal


@dataclasses.dataclass(frozen=True)
class BertConfig:
    n_layer: int
    d_model: int
    n_head: int
    d_ff: int
    vocab: int = 30522
    max_pos: int = 512
    seq: int = 512
    batch: int = 32
    mask_rate: float = 0.15  # fraction of positions the sample batch marks for prediction


CONFIGS = {
    "toy": BertConfig(n_layer=2, d_model=32, n_head=4, d_ff=64, vocab=128, max_pos=16, seq=16,
                      batch=8),
    "base": BertConfig(n_layer=12, d_model=768, n_head=12, d_ff=3072),
    "large": BertConfig(n_layer=24, d_model=1024, n_head=16, d_ff=4096),
}

_LN_EPS = 1e-12


class BertLayer(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, x):
        ln = lambda name: nn.LayerNorm(epsilon=_LN_EPS, name=name)
        x = ln("attention_ln")(x + MultiHeadAttention(self.cfg.n_head, name="attention")(x))
        h = nn.gelu(nn.Dense(self.cfg.d_ff, kernel_init=normal(0.02), name="intermediate")(x),
                    approximate=False)
        h = nn.Dense(x.shape[-1], kernel_init=normal(0.02), name="output")(h)
        return ln("output_ln")(x + h)


class BertMLM(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids):
        cfg = self.cfg
        embed = lambda n, name: nn.Embed(n, cfg.d_model, embedding_init=normal(0.02), name=name)
        word = embed(cfg.vocab, "word_embeddings")
        x = (word(input_ids)
             + embed(cfg.max_pos, "position_embeddings")(jnp.arange(input_ids.shape[1]))[None]
             + embed(2, "token_type_embeddings")(token_type_ids))
        x = nn.LayerNorm(epsilon=_LN_EPS, name="embeddings_ln")(x)
        for i in range(cfg.n_layer):
            x = BertLayer(cfg, name=f"layer_{i}")(x)
        h = nn.gelu(nn.Dense(cfg.d_model, kernel_init=normal(0.02), name="mlm_dense")(x),
                    approximate=False)
        h = nn.LayerNorm(epsilon=_LN_EPS, name="mlm_ln")(h)
        bias = self.param("mlm_bias", nn.initializers.zeros, (cfg.vocab,))
        return jnp.einsum("bsd,vd->bsv", h, word.embedding) + bias


def task(cfg: BertConfig) -> Task:
    if cfg.seq > cfg.max_pos:
        raise ValueError(f"bert: seq={cfg.seq} exceeds the position table max_pos={cfg.max_pos}")
    model = BertMLM(cfg)

    def sample_batch(key):
        ki, kl, kw = jax.random.split(key, 3)
        shape = (cfg.batch, cfg.seq)
        # Two segments per example, split at the middle, as in sentence-pair pretraining.
        segments = (jnp.arange(cfg.seq) >= cfg.seq // 2).astype(jnp.int32)
        return {"input_ids": jax.random.randint(ki, shape, 0, cfg.vocab, jnp.int32),
                "token_type_ids": jnp.broadcast_to(segments, shape),
                "labels": jax.random.randint(kl, shape, 0, cfg.vocab, jnp.int32),
                "weights": jax.random.bernoulli(kw, cfg.mask_rate, shape).astype(jnp.float32)}

    def loss(variables, batch):
        logits = model.apply(variables, batch["input_ids"], batch["token_type_ids"])
        return cross_entropy(logits, batch["labels"], batch["weights"]), {}, {}

    return Task(model, sample_batch, lambda b: (b["input_ids"], b["token_type_ids"]), loss)


SPEC = ModelSpec("bert", "BERT masked-LM (post-LN, tied decoder)", CONFIGS, task)
