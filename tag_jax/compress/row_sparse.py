"""Row-sparse exchange of embedding-table gradients: exact, static capacity, dense fallback.

A lookup ``table[ids]`` touches few rows, so its gradient is a few rows plus their indices. Each
device merges its duplicate indices, then all-gathers ``capacity`` (index, row) pairs and scatter-adds
everyone's rows into the dense result. If some device touched more than ``capacity`` distinct rows,
every device instead takes the plain psum of its dense gradient: the counts travel with the indices,
so all devices see the same counts and the same ``lax.cond`` branch. Either way the result equals
the psum of the dense gradients up to summation order.

Indices outside ``[0, num_rows)`` (e.g. -1 for padding) contribute nothing, on both paths.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from tag_jax.compress._common import AxisName, axis_tuple, gather_invariant, group_size, named, varying


def default_capacity(num_indices: int, num_rows: int) -> int:
    """The static capacity that never overflows: one slot per index, at most one per table row."""
    return max(1, min(int(num_indices), int(num_rows)))


def _merge(idx, vals, num_rows: int, capacity: int):
    """Sum rows with equal indices: (``capacity`` indices padded with ``num_rows``, their rows, #distinct)."""
    key = jnp.where((idx >= 0) & (idx < num_rows), idx, num_rows)  # invalid indices sort last, then drop
    order = jnp.argsort(key)
    key, vals = key[order], vals[order]
    new = jnp.concatenate([jnp.ones((1,), bool), key[1:] != key[:-1]])
    seg = jnp.cumsum(new) - 1  # slot of each sorted entry; slots >= capacity are dropped
    count = jnp.sum(new & (key < num_rows)).astype(jnp.int32)
    rows = jax.ops.segment_sum(vals, seg, num_segments=capacity, indices_are_sorted=True)
    slots = jnp.full((capacity,), num_rows, jnp.int32).at[seg].set(key.astype(jnp.int32), mode="drop")
    return slots, rows, count


def _dense(key, vals, num_rows: int):
    return jnp.zeros((num_rows, vals.shape[1]), vals.dtype).at[key].add(vals, mode="drop")


@named("row_sparse_psum", ("axes", "num_rows", "capacity"))
def _row_sparse_psum(indices, rows, *, axes, num_rows, capacity):
    n = indices.size
    row_shape = rows.shape[indices.ndim:]
    idx = indices.reshape(n).astype(jnp.int32)
    vals = rows.reshape(n, math.prod(row_shape))
    slots, merged, count = _merge(idx, vals, num_rows, capacity)
    # One gather carries indices and counts: every device then decides on identical data.
    meta = gather_invariant(jnp.concatenate([slots, count[None]]), axes, 0, tiled=False)
    overflow = jnp.any(meta[:, capacity] > capacity)

    def sparse(merged, idx, vals):
        got = gather_invariant(merged, axes, 0, tiled=False)
        return _dense(meta[:, :capacity].reshape(-1), got.reshape(-1, vals.shape[1]), num_rows)

    def dense(merged, idx, vals):
        valid = (idx >= 0) & (idx < num_rows)
        return lax.psum(_dense(jnp.where(valid, idx, num_rows), vals, num_rows), axes)

    out = lax.cond(overflow, dense, sparse, merged, idx, vals)
    return out.reshape((num_rows, *row_shape))


def row_sparse_psum(indices, rows, axis_name: AxisName, *, num_rows: int, capacity: int | None = None):
    """``psum`` over ``axis_name`` of the dense gradient ``zeros((num_rows, ...)).at[indices].add(rows)``.

    Call inside ``jax.shard_map``. ``indices`` (integer, any shape ``B``) and ``rows`` (shape
    ``B + row_shape``) are this device's touched rows; indices outside ``[0, num_rows)`` are ignored.
    Each device sends at most ``capacity`` merged rows (default: ``min(indices.size, num_rows)``, which
    never overflows); when a device has more distinct rows than that, all devices fall back to the dense
    psum. The result, shape ``(num_rows, *row_shape)``, equals the dense psum up to summation order
    (exact) and is typed replicated over ``axis_name``. Differentiable in ``rows``; batchable.
    """
    axes = axis_tuple(axis_name, "row_sparse_psum")
    ishape, rshape = jnp.shape(indices), jnp.shape(rows)
    if not jnp.issubdtype(jnp.result_type(indices), jnp.integer):
        raise ValueError(f"row_sparse_psum: indices must be integers, got {jnp.result_type(indices)}")
    if tuple(rshape[:len(ishape)]) != tuple(ishape):
        raise ValueError(f"row_sparse_psum: rows {tuple(rshape)} must start with the indices' shape "
                         f"{tuple(ishape)} (one row per index)")
    if int(num_rows) < 1 or int(num_rows) >= 2 ** 31 - 1:
        raise ValueError(f"row_sparse_psum: num_rows={num_rows} must be in [1, 2**31 - 1)")
    n = math.prod(ishape)
    capacity = default_capacity(n, num_rows) if capacity is None else int(capacity)
    if capacity < 1:
        raise ValueError(f"row_sparse_psum: capacity={capacity} must be at least 1")
    group_size(axes, "row_sparse_psum")
    if n == 0:  # nothing touched anywhere: the psum of zeros
        return jnp.zeros((int(num_rows), *rshape[len(ishape):]), jnp.result_type(rows))
    return _row_sparse_psum(indices, rows, axes=axes, num_rows=int(num_rows), capacity=min(capacity, n))


def _lookup(table, ids):
    valid = (ids >= 0) & (ids < table.shape[0])
    got = jnp.take(table, jnp.where(valid, ids, 0), axis=0)
    return jnp.where(valid.reshape(valid.shape + (1,) * (table.ndim - 1)), got, 0).astype(table.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _row_sparse_embed(table, ids, axes, capacity):
    return _lookup(table, ids)


def _embed_fwd(table, ids, axes, capacity):
    missing = set(axes) - varying(ids)
    if missing or set(axes) & varying(table):
        raise ValueError(f"row_sparse_embed: needs ids {jnp.shape(ids)} varying over mesh axes {axes} (sharded "
                         f"batch) and table {jnp.shape(table)} replicated over them, inside "
                         f"jax.shard_map(..., check_vma=True); ids vary over {sorted(varying(ids))}, "
                         f"table over {sorted(varying(table))}")
    return _lookup(table, ids), (ids, jnp.zeros((table.shape[0], 0), table.dtype))  # carries len, dtype


def _embed_bwd(axes, capacity, res, ct):
    ids, proto = res
    dtable = row_sparse_psum(ids, ct, axes, num_rows=proto.shape[0], capacity=capacity)
    return dtable.astype(proto.dtype), None


def row_sparse_embed(table, ids, axis_name: AxisName, *, capacity: int | None = None):
    """``table[ids]`` (zeros for ids outside ``[0, len(table))``) whose table gradient is row-sparse.

    Inside ``jax.shard_map`` (``check_vma=True``) with ``table`` replicated and ``ids`` sharded over
    ``axis_name``, ``jax.grad`` gives ``table`` the plain gradient (the psum of the local scattered
    gradients) up to summation order, exchanged by :func:`row_sparse_psum` with ``capacity``.
    """
    axes = axis_tuple(axis_name, "row_sparse_embed")
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise ValueError(f"row_sparse_embed: ids must be integers, got {jnp.result_type(ids)}")
    return _row_sparse_embed(table, ids, axes, capacity)


_row_sparse_embed.defvjp(_embed_fwd, _embed_bwd)
