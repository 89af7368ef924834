"""ResNet with bottleneck blocks (ResNet-50 = [3, 4, 6, 3]), BatchNorm in training mode.

BatchNorm's running statistics are a second collection, carried in state["batch_stats"] and
returned updated by the step (apply with mutable=["batch_stats"]), so the step stays pure.
Stride sits on the 3x3 conv (the "v1.5" variant torchvision ships); names follow torchvision.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from tag_jax.models._common import ModelSpec, Task, accuracy, cross_entropy


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    blocks: tuple[int, ...]   # bottleneck blocks per stage
    width: int = 64           # bottleneck width of the first stage; doubles per stage, output x4
    image: int = 224
    classes: int = 1000
    batch: int = 64


CONFIGS = {
    "toy": ResNetConfig(blocks=(1, 1, 1, 1), width=8, image=32, classes=8, batch=8),
    "50": ResNetConfig(blocks=(3, 4, 6, 3)),
}

# Training-mode BatchNorm (statistics of the current batch), PyTorch's momentum/epsilon.
_bn = functools.partial(nn.BatchNorm, use_running_average=False, momentum=0.9, epsilon=1e-5)
_pad1 = ((1, 1), (1, 1))  # explicit, so stride-2 convs pad like PyTorch rather than "SAME"


class Bottleneck(nn.Module):
    width: int
    stride: int
    project: bool  # the shortcut needs a 1x1 conv when shape changes

    @nn.compact
    def __call__(self, x):
        s = (self.stride, self.stride)
        y = nn.relu(_bn(name="bn1")(nn.Conv(self.width, (1, 1), use_bias=False, name="conv1")(x)))
        y = nn.Conv(self.width, (3, 3), strides=s, padding=_pad1, use_bias=False, name="conv2")(y)
        y = nn.relu(_bn(name="bn2")(y))
        y = _bn(name="bn3")(nn.Conv(4 * self.width, (1, 1), use_bias=False, name="conv3")(y))
        if self.project:
            x = nn.Conv(4 * self.width, (1, 1), strides=s, use_bias=False,
                        name="downsample_conv")(x)
            x = _bn(name="downsample_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    cfg: ResNetConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.cfg
        x = nn.Conv(cfg.width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                    name="conv1")(images)
        x = nn.relu(_bn(name="bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad1)
        for stage, n in enumerate(cfg.blocks):
            width = cfg.width * 2 ** stage
            for j in range(n):
                stride = 2 if (j == 0 and stage > 0) else 1
                x = Bottleneck(width, stride, project=(j == 0), name=f"layer{stage + 1}_{j}")(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(cfg.classes, name="fc")(x)


def task(cfg: ResNetConfig) -> Task:
    model = ResNet(cfg)

    def sample_batch(key):
        ki, kl = jax.random.split(key)
        return {"images": jax.random.normal(ki, (cfg.batch, cfg.image, cfg.image, 3), jnp.float32),
                "labels": jax.random.randint(kl, (cfg.batch,), 0, cfg.classes, jnp.int32)}

    def loss(variables, batch):
        logits, updated = model.apply(variables, batch["images"], mutable=["batch_stats"])
        return (cross_entropy(logits, batch["labels"]),
                {"accuracy": accuracy(logits, batch["labels"])}, dict(updated))

    return Task(model, sample_batch, lambda b: (b["images"],), loss)


SPEC = ModelSpec("resnet", "ResNet (bottleneck, BatchNorm in training mode)", CONFIGS, task)
