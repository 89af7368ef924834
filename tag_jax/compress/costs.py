"""What each way of summing a gradient over M devices costs one device: bytes and extra FLOPs.

Pure functions of shapes, dtypes and the group size ``M``, so a selector can price every choice
without tracing. ``|T|`` is the byte size of one device's (local) ``T``; rings are assumed. The
row-sparse capacity ``c`` is the one the primitive uses: ``min(capacity, indices per device)``.

=================  ====================================================  =================================
method             bytes sent (= received) per device                    extra FLOPs per device
=================  ====================================================  =================================
psum (plain)       ``2(M-1)/M |G|`` (ring all-reduce of gradient G)       0
SFB dot / conv     ``(M-1)(|X| + |dY|)`` (all-gather both factors)        ``(M-1) F``, F = local dW FLOPs:
                                                                          dot ``2 |W| prod(x free dims)``,
                                                                          conv ``2 |dY| |W| / out_features``
                                                                          (elements, not bytes)
row-sparse         ``(M-1)(c r + (c+1) 4)``: c = capacity rows of r      ``M c e`` adds (scatter of the
                   bytes, c int32 indices + 1 count                       gathered rows, e elems per row)
row-sparse         ``(M-1)(c+1) 4 + 2(M-1)/M |G|`` (indices, then the     0
 (overflow)        dense fallback psum)
bf16 (lossy)       ``2(M-1)/M |G|/2``                                     0 (casts only)
int8 (lossy)       ``(M-1)(2 N'/M + 2 s)``: all-to-all, then all-gather,  ``6 N'`` (quantize, dequantize,
                   of N' int8 (elements padded to a multiple of M; rows   sum; an estimate)
                   if per row) and of float32 scales, s bytes per block
                   (4 per tensor; 4k per row, k rows per block)
=================  ====================================================  =================================

``Cost.collectives`` lists what a compiled program runs for the method, as
``tag_jax.hlo.collectives`` reports it: ``(kind, per-device result bytes)``. An all-gather's result
is ``M`` times what each device contributes; an all-reduce's is the reduced tensor. The dense
fallback of row-sparse sits in the other branch of a conditional, so a compiled row-sparse program
lists the collectives of both :func:`row_sparse_cost` and ``row_sparse_cost(..., overflow=True)``.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

INDEX_BYTES = 4  # row-sparse indices and counts are int32


@dataclasses.dataclass(frozen=True)
class Cost:
    """Per-device cost of one way of summing a gradient over a group of ``group_size`` devices."""

    method: str
    exact: bool
    group_size: int
    sent_bytes: float
    received_bytes: float
    extra_flops: float
    collectives: tuple[tuple[str, int], ...]  # (kind, per-device result bytes), as hlo.collectives reports


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def _check_group(m) -> int:
    if int(m) != m or m < 1:
        raise ValueError(f"group_size must be a positive integer (devices on the mesh axis), got {m!r}")
    return int(m)


def _gather(m: int, local_bytes: int) -> tuple[float, tuple[str, int]]:
    """Ring all-gather: send (and receive) (M-1) blocks; the result holds all M."""
    return (m - 1) * local_bytes, ("all-gather", m * local_bytes)


def psum_cost(shape, dtype, group_size: int) -> Cost:
    """Plain ring all-reduce of a ``shape``/``dtype`` gradient: ``2(M-1)/M |G|`` each way."""
    m, s = _check_group(group_size), _nbytes(shape, dtype)
    sent = 2 * (m - 1) / m * s
    return Cost("psum", True, m, sent, sent, 0.0, (("all-reduce", s),) if m > 1 else ())


def _sfb(method, m, x_bytes, dy_bytes, local_flops) -> Cost:
    sx, cx = _gather(m, x_bytes)
    sd, cd = _gather(m, dy_bytes)
    colls = (cx, cd) if m > 1 else ()
    return Cost(method, True, m, sx + sd, sx + sd, float((m - 1) * local_flops), colls)


def dot_weight_grad_flops(x_shape, w_shape, dimension_numbers) -> int:
    """FLOPs of one local dot_general weight gradient: ``2 |W| prod(x's free dims)`` (elements)."""
    (cx, _), (bx, _) = dimension_numbers
    return 2 * math.prod(w_shape) * math.prod(s for d, s in enumerate(x_shape) if d not in cx and d not in bx)


def sfb_dot_cost(x_shape, dy_shape, group_size: int, *, x_dtype="float32", dy_dtype=None,
                 dimension_numbers=None) -> Cost:
    """SFB for ``dy = dot_general(x, w, dimension_numbers)`` with local shapes ``x_shape``, ``dy_shape``.

    Both factors are gathered in their common dtype (as :func:`tag_jax.compress.sfb_dot_grad` does).
    """
    from tag_jax.compress.sfb import default_dense_dimension_numbers, dot_weight_shape
    m = _check_group(group_size)
    dn = dimension_numbers or default_dense_dimension_numbers(len(x_shape))
    dtype = np.result_type(x_dtype, dy_dtype or x_dtype)
    w_shape = dot_weight_shape(tuple(x_shape), tuple(dy_shape), dn)
    return _sfb("sfb_dot", m, _nbytes(x_shape, dtype), _nbytes(dy_shape, dtype),
                dot_weight_grad_flops(x_shape, w_shape, dn))


def conv_weight_grad_flops(dy_shape, kernel_shape, out_features: int) -> int:
    """FLOPs of one local conv kernel gradient: ``2 |dY| |W| / out_features`` (elements)."""
    return 2 * math.prod(dy_shape) * math.prod(kernel_shape) // int(out_features)


def sfb_conv_cost(x_shape, dy_shape, kernel_shape, group_size: int, *, x_dtype="float32", dy_dtype=None,
                  dimension_numbers=None) -> Cost:
    """SFB for a ``lax.conv_general_dilated`` kernel gradient with local ``x_shape``, ``dy_shape``."""
    from jax import lax
    m = _check_group(group_size)
    dtype = np.result_type(x_dtype, dy_dtype or x_dtype)
    spec = lax.conv_dimension_numbers(tuple(x_shape), tuple(kernel_shape), dimension_numbers)
    out_features = kernel_shape[spec.rhs_spec[0]]
    return _sfb("sfb_conv", m, _nbytes(x_shape, dtype), _nbytes(dy_shape, dtype),
                conv_weight_grad_flops(dy_shape, kernel_shape, out_features))


def row_sparse_cost(num_rows: int, row_shape, dtype, group_size: int, capacity: int, *,
                    overflow: bool = False) -> Cost:
    """Row-sparse exchange of a ``(num_rows, *row_shape)`` gradient with ``capacity`` rows per device.

    ``overflow=True`` prices the dense fallback (taken when a device has more distinct rows than
    ``capacity``): the index gather already happened, then a plain all-reduce.
    """
    m = _check_group(group_size)
    meta_sent, meta = _gather(m, (capacity + 1) * INDEX_BYTES)
    if overflow:
        dense = psum_cost((num_rows, *row_shape), dtype, m)
        sent = meta_sent + dense.sent_bytes
        return Cost("row_sparse_dense_fallback", True, m, sent, sent, 0.0, (meta, *dense.collectives))
    rows_sent, rows = _gather(m, capacity * _nbytes(row_shape, dtype))
    sent = meta_sent + rows_sent
    return Cost("row_sparse", True, m, sent, sent, float(m * capacity * math.prod(row_shape)), (meta, rows))


def lossy_bf16_cost(shape, dtype, group_size: int) -> Cost:
    """bf16 ring all-reduce. (XLA:CPU runs it in float32: a CPU module shows a float32 all-reduce.)"""
    m, n = _check_group(group_size), math.prod(shape)
    sent = 2 * (m - 1) / m * 2 * n
    return Cost("lossy_bf16", False, m, sent, sent, 0.0, (("all-reduce", 2 * n),) if m > 1 else ())


def lossy_int8_cost(shape, dtype, group_size: int, *, per_row: bool = False) -> Cost:
    """Two-phase int8 all-reduce (all-to-all of int8 blocks, sum, all-gather of int8 blocks) + scales."""
    m = _check_group(group_size)
    rows, cols = (shape[0], math.prod(shape[1:])) if per_row else (math.prod(shape), 1)
    k = -(-rows // m)  # rows per block after padding to a multiple of M
    block = k * cols    # int8 bytes per block
    scales = k * 4 if per_row else 4
    colls = [("all-to-all", m * block)]
    colls += [("all-to-all", m * scales)] if per_row else [("all-gather", m * scales)]
    colls += [("all-gather", m * block), ("all-gather", m * scales)]
    sent = (m - 1) * (2 * block + 2 * scales)
    return Cost("lossy_int8", False, m, float(sent), float(sent), 6.0 * m * block, tuple(colls))
