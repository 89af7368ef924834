"""Embedding-heavy click model (DLRM-like): big tables, multi-hot lookups, small MLPs, BCE loss.

Nearly all parameters are embedding rows, and one batch touches only batch x hots rows per table,
so the tables' gradient is a scatter-add that is zero almost everywhere (row sparse): the case for
exchanging (row index, row) pairs instead of all-reducing the dense table gradient.
"""
import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from tag_jax.models._common import ModelSpec, Task, accuracy


@dataclasses.dataclass(frozen=True)
class RecConfig:
    rows: tuple[int, ...]        # rows per embedding table
    dim: int = 64
    hots: int = 4                # indices per example per table, sum-pooled
    dense: int = 16              # dense (continuous) features
    bottom: tuple[int, ...] = (512, 256, 64)
    top: tuple[int, ...] = (1024, 512, 256)
    batch: int = 4096


CONFIGS = {
    "toy": RecConfig(rows=(64, 64, 128, 128, 256, 256, 512, 512), dim=16, hots=4, dense=8,
                     bottom=(32, 16), top=(64, 32), batch=8),
    # 8 tables from 1M to 10M rows: about 2.2B parameters, all but ~2M of them embedding rows.
    "real": RecConfig(rows=(1_000_000, 1_400_000, 2_000_000, 2_800_000, 4_000_000, 5_600_000,
                            8_000_000, 10_000_000)),
}


class Recommender(nn.Module):
    cfg: RecConfig

    @nn.compact
    def __call__(self, dense, ids):
        cfg = self.cfg
        x = dense
        for i, width in enumerate(cfg.bottom):
            x = nn.relu(nn.Dense(width, name=f"bottom_{i}")(x))
        pooled = []
        for t, rows in enumerate(cfg.rows):
            table = self.param(f"table_{t}", nn.initializers.normal(rows ** -0.5), (rows, cfg.dim))
            pooled.append(jnp.take(table, ids[:, t, :], axis=0).sum(axis=1))  # gather, then pool
        x = jnp.concatenate([x, *pooled], axis=-1)
        for i, width in enumerate(cfg.top):
            x = nn.relu(nn.Dense(width, name=f"top_{i}")(x))
        return nn.Dense(1, name="head")(x)[:, 0]


def task(cfg: RecConfig) -> Task:
    model = Recommender(cfg)

    def sample_batch(key):
        kd, ki, kl = jax.random.split(key, 3)
        rows = jnp.asarray(cfg.rows, jnp.int32)[None, :, None]  # each table's own index range
        shape = (cfg.batch, len(cfg.rows), cfg.hots)
        return {"dense": jax.random.normal(kd, (cfg.batch, cfg.dense), jnp.float32),
                "ids": jax.random.randint(ki, shape, 0, rows, jnp.int32),
                "labels": jax.random.bernoulli(kl, 0.5, (cfg.batch,)).astype(jnp.float32)}

    def loss(variables, batch):
        logits = model.apply(variables, batch["dense"], batch["ids"])
        bce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), batch["labels"]).mean()
        return bce, {"accuracy": accuracy(jnp.stack([-logits, logits], -1),
                                          batch["labels"].astype(jnp.int32))}, {}

    return Task(model, sample_batch, lambda b: (b["dense"], b["ids"]), loss)


SPEC = ModelSpec("recommender", "Embedding-heavy recommender (multi-hot tables, MLPs, BCE)",
                 CONFIGS, task)
