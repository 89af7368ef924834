"""Vision Transformer (ViT-B/16 layout): conv patch embedding, class token, pre-LN encoder."""
import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from tag_jax.models._common import ModelSpec, Task, accuracy, cross_entropy
from tag_jax.models._layers import MultiHeadAttention, normal


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    n_layer: int
    d_model: int
    n_head: int
    d_ff: int
    patch: int = 16
    image: int = 224
    classes: int = 1000
    batch: int = 64


CONFIGS = {
    "toy": ViTConfig(n_layer=2, d_model=32, n_head=4, d_ff=64, patch=8, image=32, classes=8,
                     batch=8),
    "b16": ViTConfig(n_layer=12, d_model=768, n_head=12, d_ff=3072),
}


class EncoderBlock(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x):
        x = x + MultiHeadAttention(self.cfg.n_head, name="attn")(nn.LayerNorm(name="ln_1")(x))
        h = nn.LayerNorm(name="ln_2")(x)
        h = nn.gelu(nn.Dense(self.cfg.d_ff, name="fc1")(h), approximate=False)
        return x + nn.Dense(x.shape[-1], name="fc2")(h)


class ViT(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.cfg
        p = cfg.patch
        # A stride-p conv with a p x p kernel is exactly "cut into patches, then one Dense".
        x = nn.Conv(cfg.d_model, (p, p), strides=(p, p), padding="VALID", name="embedding")(images)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
        x = x + self.param("pos_embedding", normal(0.02), (1, h * w + 1, d))
        for i in range(cfg.n_layer):
            x = EncoderBlock(cfg, name=f"encoderblock_{i}")(x)
        x = nn.LayerNorm(name="encoder_norm")(x)
        return nn.Dense(cfg.classes, name="head")(x[:, 0])


def task(cfg: ViTConfig) -> Task:
    if cfg.image % cfg.patch:
        raise ValueError(f"vit: image size {cfg.image} is not a multiple of patch {cfg.patch}")
    model = ViT(cfg)

    def sample_batch(key):
        ki, kl = jax.random.split(key)
        return {"images": jax.random.normal(ki, (cfg.batch, cfg.image, cfg.image, 3), jnp.float32),
                "labels": jax.random.randint(kl, (cfg.batch,), 0, cfg.classes, jnp.int32)}

    def loss(variables, batch):
        logits = model.apply(variables, batch["images"])
        return (cross_entropy(logits, batch["labels"]),
                {"accuracy": accuracy(logits, batch["labels"])}, {})

    return Task(model, sample_batch, lambda b: (b["images"],), loss)


SPEC = ModelSpec("vit", "Vision Transformer classifier (NHWC images)", CONFIGS, task)
