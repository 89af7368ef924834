"""Random small training problems for the policy: model configurations and topologies.

Everything is drawn from a numpy Generator, so a seed names a whole data set. Sizes are small so
that tracing and searching one problem takes a second or two; batches are multiples of 16 so the
batch can be split over every mesh the topologies allow. The held-out set (never drawn for
training) is named here so the benchmark and the report agree on it; `HELD_OUT_MEDIUM` is a
larger-sized held-out set of the same families.
"""
from __future__ import annotations

import numpy as np

# Families drawn for training; t5 (encoder-decoder) and resnet (residual conv + batch norm) are
# held out entirely, as are the presets below.
TRAIN_FAMILIES = ("mlp", "gpt2", "bert", "vit", "moe", "recommender", "vgg")
KINDS = ("v100", "p100", "1080ti", "a100", "t4", "l4", "h100")
INTRA = (8e9, 20e9, 150e9, 300e9)       # PCIe-slow, PCIe-fast, NVLink 2, NVLink 3 (bytes/s)
INTER = (1.25e9, 2.81e9, 5e9, 12.5e9)   # 10 GbE, TAG's 2.81 GB/s, 5 GB/s, IB EDR

HELD_OUT_MODELS = (
    ("t5", "toy", {"batch": 16}),
    ("resnet", "toy", {"batch": 32}),
    ("gpt2", "toy", {"n_layer": 3, "d_model": 96, "n_head": 4, "vocab": 768, "seq": 48, "ctx": 48,
                     "batch": 48}),
    ("mlp", "toy", {"layers": 6, "width": 384, "in_features": 96, "classes": 24, "batch": 48}),
)
HELD_OUT_TOPOLOGIES = ("tag-hetero", "4xa100-4xv100", "tpu-v4-2x2x2", "2x8-v100-p3")
# A harder held-out set (`benchmarks/policy.py --held-out medium`): the same families, with batch
# and width large enough that compute per device matters, so the communication-free replicated plan
# is not near-best on these topologies. Every gpt2/mlp config lies outside `random_model`'s grid
# (mlp: 8 layers, width 1024 and batch 2048, training at most 4, 512 and 64; gpt2: 4 layers, vocab
# 16384 and batch 192, training at most 2, 8192 and 64). 300-3000 ops per graph (518 to 2676), so
# one simulator evaluation stays cheap; batches divide by 6 and 16 (every mesh the topologies allow).
HELD_OUT_MEDIUM = (
    ("t5", "toy", {"n_layer": 3, "d_model": 256, "n_head": 8, "d_ff": 1024, "vocab": 8192,
                   "enc_seq": 64, "dec_seq": 32, "batch": 192}),
    ("resnet", "toy", {"width": 16, "image": 64, "classes": 256, "batch": 768}),
    ("gpt2", "toy", {"n_layer": 4, "d_model": 256, "n_head": 8, "vocab": 16384, "seq": 64, "ctx": 64,
                     "batch": 192}),
    ("mlp", "toy", {"layers": 8, "width": 1024, "in_features": 512, "classes": 64, "batch": 2048}),
)


def _pick(rng: np.random.Generator, xs):
    return xs[int(rng.integers(len(xs)))]


def random_model(rng: np.random.Generator) -> tuple[str, dict]:
    """(family, config overrides of its "toy" size)."""
    fam = _pick(rng, TRAIN_FAMILIES)
    batch = int(_pick(rng, (16, 32, 64)))
    if fam == "mlp":
        return fam, dict(layers=int(rng.integers(1, 5)), width=int(_pick(rng, (64, 128, 256, 512))),
                         in_features=int(_pick(rng, (32, 64, 256))), classes=int(_pick(rng, (8, 32, 128))),
                         batch=batch)
    if fam in ("gpt2", "bert"):
        d = int(_pick(rng, (32, 64, 128, 256)))
        seq = int(_pick(rng, (16, 32, 64)))
        cfg = dict(n_layer=int(rng.integers(1, 3)), d_model=d, n_head=4,
                   vocab=int(_pick(rng, (128, 512, 2048, 8192))), seq=seq, batch=batch)
        if fam == "gpt2":
            cfg["ctx"] = seq
        else:
            cfg.update(max_pos=seq, d_ff=4 * d)
        return fam, cfg
    if fam == "vit":
        d = int(_pick(rng, (32, 64, 128)))
        return fam, dict(n_layer=int(rng.integers(1, 3)), d_model=d, n_head=4, d_ff=4 * d,
                         classes=int(_pick(rng, (8, 100))), batch=batch)
    if fam == "moe":
        d = int(_pick(rng, (32, 64, 128)))
        return fam, dict(n_layer=2, d_model=d, n_head=4, d_ff=2 * d, n_experts=int(_pick(rng, (4, 8))),
                         vocab=int(_pick(rng, (128, 1024))), seq=16, batch=batch)
    if fam == "recommender":
        n = int(rng.integers(2, 9))
        rows = tuple(int(_pick(rng, (64, 256, 1024, 8192, 32768))) for _ in range(n))
        return fam, dict(rows=rows, dim=int(_pick(rng, (16, 32, 64))), batch=batch * 4)
    ch = int(_pick(rng, (8, 16, 32)))
    return "vgg", dict(stages=((ch, 1), (2 * ch, 1), (2 * ch, 1)), fc=int(_pick(rng, (64, 256, 1024))),
                       batch=batch)


def random_scaled_model(rng: np.random.Generator) -> tuple[str, dict]:
    """`random_model` with its batch 1-32x larger: the ranking head's seeds change order with scale
    (replication wins on tiny problems, data parallel and FSDP once compute matters), and the
    teacher's grid stays small so that searching it is cheap."""
    fam, cfg = random_model(rng)
    return fam, dict(cfg, batch=int(cfg["batch"]) * int(2 ** rng.integers(0, 6)))


def random_topology(rng: np.random.Generator, name: str = "random") -> dict:
    """A topology dict for `Topology.from_json`: 1-4 machines, 4/8/16 devices in all (TAG-like)."""
    total = int(_pick(rng, (4, 8, 8, 8, 16)))
    nodes = int(_pick(rng, [k for k in (1, 2, 4) if total // k >= 2]))
    per = total // nodes
    devices, links = [], []
    intra_default = float(_pick(rng, INTRA))
    for node in range(nodes):
        kind = _pick(rng, KINDS)
        ids = list(range(len(devices), len(devices) + per))
        devices += [{"kind": kind, "node": node} for _ in ids]
        bw = intra_default if node == 0 or rng.random() < 0.5 else float(_pick(rng, INTRA))
        if bw != intra_default:
            links += [{"a": a, "b": b, "bandwidth": bw, "latency": 5e-6} for a in ids for b in ids if a < b]
    out = {"name": name, "devices": devices,
           "intra_node": {"bandwidth": intra_default, "latency": 2e-6 if intra_default > 1e11 else 5e-6}}
    if nodes > 1:
        out["inter_node"] = {"bandwidth": float(_pick(rng, INTER)), "latency": 3e-5,
                             "nics": int(_pick(rng, (1, per)))}
    if links:
        out["links"] = links
    return out
