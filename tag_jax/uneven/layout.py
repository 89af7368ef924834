"""The layout of an uneven plan's programs: sub-groups of `local` devices and the state sharded over them.

Every group's devices are cut into sub-groups of `local` consecutive devices (`local` divides every
group's size; sub-groups never span groups, so with groups by node they sit on one node's links).
The plan's devices form a mesh ("groups", "local") = (devices / local, local), one row per sub-group:

    state      every leaf sharded over "local" on its largest dimension that `local` divides
               (replicated when none does), replicated over "groups": each sub-group holds a copy
    group g    all-gathers the parameters over "local" (within its sub-groups: fast links), then
               each device computes its local mean gradient (no other collective)
    combine    the gradient leaves in one buffer per dtype (`buckets`): reduce-scatter over "local"
               (fast), all-reduce of the 1/local shards over "groups" (the only traffic on links
               between groups); leaves with no dimension `local` divides are all-reduced over all
               devices, in one buffer too
    apply      the optimizer update on the shards (1/local of the work), no collective

`local` = 1 is the flat layout: replicated state, one all-reduce over all devices, replicated apply.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec as P


def shard_dim(shape: Sequence[int], local: int) -> int | None:
    """The dimension a leaf of this shape is sharded on over `local` devices (None: replicated)."""
    if local <= 1:
        return None
    fits = [k for k, n in enumerate(shape) if n >= local and n % local == 0]
    return max(fits, key=lambda k: (shape[k], -k)) if fits else None


def spec(shape: Sequence[int], local: int, axis: str = "local") -> P:
    k = shard_dim(shape, local)
    return P() if k is None else P(*(axis if i == k else None for i in range(len(shape))))


def shard_shape(shape: Sequence[int], local: int) -> tuple[int, ...]:
    k = shard_dim(shape, local)
    return tuple(n // local if i == k else n for i, n in enumerate(shape))


def local_abstract(tree: Any, local: int) -> Any:
    """The tree's leaves at the shape one device holds."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(shard_shape(x.shape, local), x.dtype), tree)


def nbytes(shape: Sequence[int], dtype) -> int:
    return int(math.prod(shape)) * np.dtype(dtype).itemsize


def local_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    """The sub-group sizes that divide every group size, smallest first."""
    g = math.gcd(*sizes) if sizes else 1
    return tuple(d for d in range(1, g + 1) if g % d == 0)


def sub_groups(device_ids_per_group: Sequence[Sequence[int]], local: int) -> tuple[tuple[int, ...], ...]:
    """The rows of the ("groups", "local") mesh: each group cut into runs of `local` devices."""
    rows = []
    for ids in device_ids_per_group:
        if len(ids) % local:
            raise ValueError(f"sub-groups of {local} do not divide a group of {len(ids)} devices")
        rows += [tuple(ids[j:j + local]) for j in range(0, len(ids), local)]
    return tuple(rows)


def gather_bytes(inputs: Any, local: int) -> int:
    """Per-device bytes a group program all-gathers (the sharded parameters, whole)."""
    return sum(nbytes(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(inputs)
               if shard_dim(x.shape, local) is not None)


def buckets(shapes: Sequence[Sequence[int]], dtypes: Sequence[Any], local: int):
    """[((sharded, dtype), leaf indices)]: the combining program's buffers, one per kind and dtype,
    in first-appearance order."""
    out: dict[tuple, list[int]] = {}
    for i, (shape, dt) in enumerate(zip(shapes, dtypes)):
        out.setdefault((shard_dim(shape, local) is not None, np.dtype(dt).name), []).append(i)
    return list(out.items())


def combine_buffers(combined: Any, local: int) -> list[tuple[bool, int]]:
    """[(sharded, bytes of the whole buffer)] of the combining program."""
    leaves = jax.tree_util.tree_leaves(combined)
    return [(sharded, sum(nbytes(leaves[i].shape, leaves[i].dtype) for i in idx))
            for (sharded, _), idx in buckets([x.shape for x in leaves], [x.dtype for x in leaves], local)]


def combine_bytes(combined: Any, local: int, reduced: bool = False) -> dict[str, int]:
    """Per-device bytes by kind of the combining program (the compiled collectives' convention:
    the size of each collective's per-device result); `reduced`: group programs that reduced
    their gradients already (no reduce-scatter)."""
    out = {"reduce-scatter": 0, "all-reduce": 0}
    for x in jax.tree_util.tree_leaves(combined):
        b = nbytes(x.shape, x.dtype)
        if shard_dim(x.shape, local) is None:
            out["all-reduce"] += b
        else:
            out["reduce-scatter"] += 0 if reduced else b // local
            out["all-reduce"] += b // local
    return {k: v for k, v in out.items() if v}
