"""VGG: 3x3 conv stacks with max-pooling, then three large fully connected layers.

Almost all of VGG-19's 143.7M parameters sit in fc6 (25088 x 4096), which is why it is the
classic case for sufficient-factor broadcasting at small per-device batch ("19-b12").
Names follow the original Caffe release: conv1_1 ... conv5_4, fc6, fc7, fc8. No dropout.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from tag_jax.models._common import ModelSpec, Task, accuracy, cross_entropy


@dataclasses.dataclass(frozen=True)
class VGGConfig:
    stages: tuple[tuple[int, int], ...]  # (channels, convs) per stage, each ending in a 2x2 pool
    fc: int = 4096
    image: int = 224
    classes: int = 1000
    batch: int = 64


_VGG19 = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))

CONFIGS = {
    "toy": VGGConfig(stages=((8, 1), (16, 1), (32, 1), (32, 1), (32, 1)), fc=64, image=32,
                     classes=8, batch=8),
    "19": VGGConfig(stages=_VGG19),
    "19-b12": VGGConfig(stages=_VGG19, batch=12),  # TAG's setting: 6 per device on 2 devices
}


class VGG(nn.Module):
    cfg: VGGConfig

    @nn.compact
    def __call__(self, images):
        x = images
        for s, (channels, convs) in enumerate(self.cfg.stages):
            for j in range(convs):
                x = nn.relu(nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)),
                                    name=f"conv{s + 1}_{j + 1}")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.cfg.fc, name="fc6")(x))
        x = nn.relu(nn.Dense(self.cfg.fc, name="fc7")(x))
        return nn.Dense(self.cfg.classes, name="fc8")(x)


def task(cfg: VGGConfig) -> Task:
    if cfg.image % 2 ** len(cfg.stages):
        raise ValueError(f"vgg: image size {cfg.image} must be divisible by 2**{len(cfg.stages)}")
    model = VGG(cfg)

    def sample_batch(key):
        ki, kl = jax.random.split(key)
        return {"images": jax.random.normal(ki, (cfg.batch, cfg.image, cfg.image, 3), jnp.float32),
                "labels": jax.random.randint(kl, (cfg.batch,), 0, cfg.classes, jnp.int32)}

    def loss(variables, batch):
        logits = model.apply(variables, batch["images"])
        return (cross_entropy(logits, batch["labels"]),
                {"accuracy": accuracy(logits, batch["labels"])}, {})

    return Task(model, sample_batch, lambda b: (b["images"],), loss)


SPEC = ModelSpec("vgg", "VGG classifier (conv stacks + fc6/fc7/fc8)", CONFIGS, task)
