"""Mixture-of-experts causal LM: GPT-2 blocks whose every `moe_every`-th feed-forward is replaced
by `n_experts` experts with top-k routing (GShard/Switch style).

Experts are stacked weights wi [E, d, d_ff], wo [E, d_ff, d], so expert parallelism is a sharding
of the leading axis. Routing is dense and static-shaped: each sequence is a group, each expert has
`capacity` slots per group, tokens over capacity are dropped (they pass through on the residual),
and dispatch/combine are one-hot tensors contracted with einsum -- the all-to-all pattern the
planner must recognise. A Switch load-balancing loss keeps the router from collapsing.
(Tokens of one sequence compete for capacity, so a later token can displace an earlier one: fine
for a systems benchmark, as in GShard-style training, though not strictly causal.)
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from flax import linen as nn

from tag_jax.models._common import ModelSpec, Task, cross_entropy
from tag_jax.models._layers import normal
from tag_jax.models.gpt2 import CausalSelfAttention, FeedForward


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    n_layer: int
    d_model: int
    n_head: int
    d_ff: int
    n_experts: int
    top_k: int = 2
    capacity_factor: float = 1.25
    moe_every: int = 2        # layers i with i % moe_every == moe_every - 1 are MoE layers
    aux_weight: float = 0.01
    vocab: int = 32000
    seq: int = 512
    batch: int = 32

    @property
    def capacity(self) -> int:
        """Slots per expert per group (sequence): capacity_factor x its share of top_k picks."""
        return max(1, math.ceil(self.capacity_factor * self.seq * self.top_k / self.n_experts))


CONFIGS = {
    "toy": MoEConfig(n_layer=2, d_model=32, n_head=4, d_ff=64, n_experts=4, vocab=128, seq=16,
                     batch=8),
    "base": MoEConfig(n_layer=12, d_model=768, n_head=12, d_ff=3072, n_experts=8),
}


def route(probs, top_k: int, capacity: int):
    """Top-k routing with per-expert capacity.

    probs: [G, S, E] router probabilities. Returns (combine [G, S, E, C] gate weights,
    dispatch [G, S, E, C] 0/1). Queue order: all first choices before any second choice
    (so capacity drops hit lower-priority picks first), then token order.
    """
    g, s, e = probs.shape
    gates, idx = lax.top_k(probs, top_k)                              # [G, S, k]
    gates = gates / gates.sum(-1, keepdims=True)
    choice = jax.nn.one_hot(idx, e, dtype=probs.dtype)                # [G, S, k, E]
    queue = choice.transpose(0, 2, 1, 3).reshape(g, top_k * s, e)     # k-major order
    pos = (jnp.cumsum(queue, axis=1) - 1).reshape(g, top_k, s, e).transpose(0, 2, 1, 3)
    slot = jnp.sum(pos * choice, axis=-1).astype(jnp.int32)           # [G, S, k]
    kept = jax.nn.one_hot(slot, capacity, dtype=probs.dtype)          # all-zero when slot >= C
    dispatch = jnp.einsum("gske,gskc->gsec", choice, kept)
    combine = jnp.einsum("gsk,gske,gskc->gsec", gates, choice, kept)
    return combine, dispatch


def load_balance_loss(probs, top_k_choice):
    """Switch loss: E * sum_e (fraction of tokens whose first choice is e) * (mean prob of e)."""
    e = probs.shape[-1]
    density = jax.nn.one_hot(top_k_choice, e, dtype=probs.dtype).mean(axis=(0, 1))
    return e * jnp.sum(density * probs.mean(axis=(0, 1)))


class MoEFeedForward(nn.Module):
    cfg: MoEConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        d, e = x.shape[-1], cfg.n_experts
        std = 0.02 / math.sqrt(2 * cfg.n_layer)
        logits = nn.Dense(e, use_bias=False, kernel_init=normal(0.02), name="router")(x)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)   # route in float32
        combine, dispatch = route(probs, cfg.top_k, cfg.capacity)
        wi = self.param("wi", normal(0.02), (e, d, cfg.d_ff))
        wo = self.param("wo", normal(std), (e, cfg.d_ff, d))
        xe = jnp.einsum("gsec,gsd->egcd", dispatch.astype(x.dtype), x)  # gather tokens per expert
        h = nn.gelu(jnp.einsum("egcd,edf->egcf", xe, wi), approximate=True)
        ye = jnp.einsum("egcf,efd->egcd", h, wo)
        y = jnp.einsum("gsec,egcd->gsd", combine.astype(x.dtype), ye)   # weighted scatter back
        return y, load_balance_loss(probs, jnp.argmax(probs, -1))


class MoEBlock(nn.Module):
    cfg: MoEConfig
    use_moe: bool

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        std = 0.02 / math.sqrt(2 * cfg.n_layer)
        h = nn.LayerNorm(1e-5, name="ln_1")(x)
        x = x + CausalSelfAttention(cfg.n_head, std, name="attn")(h)
        h = nn.LayerNorm(1e-5, name="ln_2")(x)
        if self.use_moe:
            y, aux = MoEFeedForward(cfg, name="moe")(h)
        else:
            y, aux = FeedForward(cfg.d_ff, std, name="mlp")(h), jnp.zeros((), jnp.float32)
        return x + y, aux


class MoELM(nn.Module):
    cfg: MoEConfig

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.cfg
        wte = nn.Embed(cfg.vocab, cfg.d_model, embedding_init=normal(0.02), name="wte")
        wpe = nn.Embed(cfg.seq, cfg.d_model, embedding_init=normal(0.01), name="wpe")
        x = wte(input_ids) + wpe(jnp.arange(input_ids.shape[1]))[None]
        aux = []
        for i in range(cfg.n_layer):
            use_moe = i % cfg.moe_every == cfg.moe_every - 1
            x, a = MoEBlock(cfg, use_moe, name=f"h_{i}")(x)
            if use_moe:
                aux.append(a)
        x = nn.LayerNorm(1e-5, name="ln_f")(x)
        logits = jnp.einsum("btd,vd->btv", x, wte.embedding)
        return logits, jnp.mean(jnp.stack(aux)) if aux else jnp.zeros((), jnp.float32)


def task(cfg: MoEConfig) -> Task:
    model = MoELM(cfg)

    def sample_batch(key):
        tokens = jax.random.randint(key, (cfg.batch, cfg.seq + 1), 0, cfg.vocab, jnp.int32)
        return {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:]}

    def loss(variables, batch):
        logits, aux = model.apply(variables, batch["input_ids"])
        ce = cross_entropy(logits, batch["targets"])
        return ce + cfg.aux_weight * aux, {"ce": ce, "aux": aux}, {}

    return Task(model, sample_batch, lambda b: (b["input_ids"],), loss)


SPEC = ModelSpec("moe", "Mixture-of-experts causal LM (top-k routing with capacity)", CONFIGS, task)
