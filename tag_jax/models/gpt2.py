"""GPT-2 family (causal LM, tied embeddings), named like the Hugging Face checkpoints.

Unrolled by default, so every layer has its own parameters `h_0 ... h_{n-1}`; `scan_layers=True`
stacks them under `h` with a leading layer axis via `nn.scan` (optionally with `nn.remat`), which
is what large-model code does and what the tracer must see through.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from tag_jax.models._common import ModelSpec, Task, causal_lm_task
from tag_jax.models._layers import attend, merge_heads, normal, split_heads


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    n_layer: int
    d_model: int
    n_head: int
    vocab: int = 50257
    ctx: int = 1024      # rows of the position table
    seq: int = 1024      # tokens per example in the batch (<= ctx)
    batch: int = 16
    scan_layers: bool = False
    remat: bool = False


CONFIGS = {
    "toy": GPT2Config(n_layer=2, d_model=32, n_head=4, vocab=128, ctx=16, seq=16, batch=8),
    "small": GPT2Config(n_layer=12, d_model=768, n_head=12),
    "medium": GPT2Config(n_layer=24, d_model=1024, n_head=16),
    "large": GPT2Config(n_layer=36, d_model=1280, n_head=20),
    "xl": GPT2Config(n_layer=48, d_model=1600, n_head=25),
}


class CausalSelfAttention(nn.Module):
    n_head: int
    proj_std: float  # GPT-2 scales residual projections by 1/sqrt(2 * n_layer)

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        qkv = nn.Dense(3 * d, kernel_init=normal(0.02), name="c_attn")(x)
        q, k, v = (split_heads(t, self.n_head) for t in jnp.split(qkv, 3, axis=-1))
        y = merge_heads(attend(q, k, v, causal=True))
        return nn.Dense(d, kernel_init=normal(self.proj_std), name="c_proj")(y)


class FeedForward(nn.Module):
    hidden: int
    proj_std: float

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden, kernel_init=normal(0.02), name="c_fc")(x)
        h = nn.gelu(h, approximate=True)
        return nn.Dense(x.shape[-1], kernel_init=normal(self.proj_std), name="c_proj")(h)


class Block(nn.Module):
    """Pre-LayerNorm transformer block. Uses setup() so the scan variant can subclass it."""

    cfg: GPT2Config

    def setup(self):
        std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        self.ln_1 = nn.LayerNorm(epsilon=1e-5)
        self.attn = CausalSelfAttention(self.cfg.n_head, std)
        self.ln_2 = nn.LayerNorm(epsilon=1e-5)
        self.mlp = FeedForward(4 * self.cfg.d_model, std)

    def __call__(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ScanBlock(Block):
    """Block with the (carry, x) -> (carry, y) signature nn.scan wants."""

    def __call__(self, x, _):
        return Block.__call__(self, x), None


class GPT2(nn.Module):
    cfg: GPT2Config

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.cfg
        wte = nn.Embed(cfg.vocab, cfg.d_model, embedding_init=normal(0.02), name="wte")
        wpe = nn.Embed(cfg.ctx, cfg.d_model, embedding_init=normal(0.01), name="wpe")
        x = wte(input_ids) + wpe(jnp.arange(input_ids.shape[1]))[None]
        if cfg.scan_layers:
            # prevent_cse=False is safe (and faster) inside scan, which already blocks CSE.
            block = nn.remat(ScanBlock, prevent_cse=False) if cfg.remat else ScanBlock
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            length=cfg.n_layer)
            x, _ = stack(cfg, name="h")(x, None)
        else:
            block = nn.remat(Block) if cfg.remat else Block
            for i in range(cfg.n_layer):
                x = block(cfg, name=f"h_{i}")(x)
        x = nn.LayerNorm(epsilon=1e-5, name="ln_f")(x)
        return jnp.einsum("btd,vd->btv", x, wte.embedding)  # tied: logits = h @ wte.T


def task(cfg: GPT2Config) -> Task:
    if cfg.seq > cfg.ctx:
        raise ValueError(f"gpt2: seq={cfg.seq} exceeds the position table ctx={cfg.ctx}")
    return causal_lm_task(GPT2(cfg), cfg.batch, cfg.seq, cfg.vocab)


SPEC = ModelSpec("gpt2", "GPT-2 causal LM (pre-LN, GELU, tied embeddings)", CONFIGS, task)
