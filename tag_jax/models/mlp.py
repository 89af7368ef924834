"""Plain MLP classifier: the simplest model whose weight gradients are all [d_in, d_out] matrices.

"wide" is the case where sufficient-factor broadcasting pays off: with 6 samples per device the
two gradient factors (6 x d_in, 6 x d_out) are far smaller than the d_in x d_out gradient itself.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from tag_jax.models._common import ModelSpec, Task, accuracy, cross_entropy


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    layers: int       # hidden Dense layers, each width x width (the first in_features x width)
    width: int
    in_features: int
    classes: int
    batch: int


CONFIGS = {
    "toy": MLPConfig(layers=2, width=32, in_features=32, classes=8, batch=8),
    "real": MLPConfig(layers=4, width=8192, in_features=8192, classes=1024, batch=1024),
    # 6 per device x 2 devices, as in TAG's SFB experiments.
    "wide": MLPConfig(layers=3, width=16384, in_features=16384, classes=1024, batch=12),
}


class MLP(nn.Module):
    cfg: MLPConfig

    @nn.compact
    def __call__(self, x):
        for i in range(self.cfg.layers):
            x = nn.relu(nn.Dense(self.cfg.width, name=f"dense_{i}")(x))
        return nn.Dense(self.cfg.classes, name="head")(x)


def task(cfg: MLPConfig) -> Task:
    model = MLP(cfg)

    def sample_batch(key):
        kx, ky = jax.random.split(key)
        return {"x": jax.random.normal(kx, (cfg.batch, cfg.in_features), jnp.float32),
                "labels": jax.random.randint(ky, (cfg.batch,), 0, cfg.classes, jnp.int32)}

    def loss(variables, batch):
        logits = model.apply(variables, batch["x"])
        return (cross_entropy(logits, batch["labels"]),
                {"accuracy": accuracy(logits, batch["labels"])}, {})

    return Task(model, sample_batch, lambda b: (b["x"],), loss)


SPEC = ModelSpec("mlp", "MLP classifier (ReLU, softmax cross-entropy)", CONFIGS, task)
