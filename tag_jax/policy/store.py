"""Weights on disk: a flat .npz of named float arrays plus the feature schema and network config.

No pickle: names are '/'-joined parameter paths, metadata are 0-d string arrays, and loading uses
`np.load(..., allow_pickle=False)`. A file made for another feature schema is refused, because the
network would silently read the wrong columns.
"""
from __future__ import annotations

import json
import os

import numpy as np

from tag_jax.policy.features import SCHEMA_VERSION
from tag_jax.paths import nest

DEFAULT_PATH = os.path.join(os.path.dirname(__file__), "weights", "policy.npz")


class SchemaMismatchError(ValueError):
    """The weights were trained on features of another schema version."""


def flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        out.update(flatten(v, name) if isinstance(v, dict) else {name: np.asarray(v, np.float32)})
    return out


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    return nest(flat)


def save(path: str, params, config: dict, meta: dict | None = None,
         schema: str = SCHEMA_VERSION) -> None:
    flat = {f"params/{k}": v for k, v in flatten(params).items()}
    flat["__schema__"] = np.array(schema)
    flat["__config__"] = np.array(json.dumps(config))
    flat["__meta__"] = np.array(json.dumps(meta or {}))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **flat)
    os.replace(tmp, path)


def load(path: str = DEFAULT_PATH) -> tuple[dict, dict, dict]:
    """(params, network config, training metadata); raises SchemaMismatchError on another schema."""
    with np.load(path, allow_pickle=False) as z:
        schema = str(z["__schema__"]) if "__schema__" in z else "<none>"
        if schema != SCHEMA_VERSION:
            raise SchemaMismatchError(
                f"policy weights {path} were trained for feature schema {schema!r}, but this "
                f"tag_jax builds features of schema {SCHEMA_VERSION!r}; retrain them with "
                "`python -m tag_jax.policy.train` or pass policy=None to plan without the policy")
        config = json.loads(str(z["__config__"]))
        meta = json.loads(str(z["__meta__"]))
        params = unflatten({k[len("params/"):]: z[k] for k in z.files if k.startswith("params/")})
    return params, config, meta
