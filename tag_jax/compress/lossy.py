"""Opt-in LOSSY psums: fewer bytes on the wire, results NOT equal to ``lax.psum``.

Nothing here is exact and the planner must never pick these unless a user asks. Each states an
elementwise error bound against the exact sum ``S = sum_m x_m`` over the ``M`` devices:

- :func:`lossy_psum_bf16`: cast to bfloat16, psum, cast back.
  ``|out - S| <= M * 2**-8 * sum_m |x_m|`` (every input and partial sum rounded once to 8 bits).
- :func:`lossy_psum_int8`: two-phase int8 all-reduce. Each device quantizes with its own scale
  ``s_m = max|x_m| / 127`` (per tensor, or per row of ``x`` viewed as ``(len(x), -1)``) and sends
  chunk ``j`` to device ``j`` (all-to-all); device ``j`` sums the dequantized chunks in float32,
  re-quantizes the sum with ``t = max|chunk| / 127`` and all-gathers it. Per tensor (or per row):
  ``|out - S| <= sum_m s_m / 2 + t / 2`` with ``t <= (max|S| + sum_m s_m / 2) / 127``, i.e. about
  ``(sum_m max|x_m| + max|S|) / 254``.

Gradients pass straight through (the transpose of the exact psum), so they can sit in a
differentiated step; both batch under ``jax.vmap``. Names in jaxprs: ``jit[name=lossy_psum_bf16]``,
``jit[name=lossy_psum_int8]``.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from tag_jax.compress._common import AxisName, axis_tuple, gather_invariant, group_size, named

BF16_ERROR_BOUND = "M * 2**-8 * sum_m |x_m|"
INT8_ERROR_BOUND = "sum_m s_m / 2 + t / 2  (s_m = max|x_m| / 127, t = max|chunk sum| / 127)"


@named("lossy_psum_bf16", ("axes",))
def _psum_bf16(x, *, axes):
    return lax.psum(x.astype(jnp.bfloat16), axes).astype(x.dtype)


def lossy_psum_bf16(x, axis_name: AxisName):
    """LOSSY ``lax.psum(x, axis_name)`` computed in bfloat16 (half the bytes of float32); see module bounds.

    Note XLA:CPU performs bf16 all-reduces in float32, so only accelerators see the saving.
    """
    axes = axis_tuple(axis_name, "lossy_psum_bf16")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"lossy_psum_bf16: x must be floating point, got {jnp.result_type(x)}")
    group_size(axes, "lossy_psum_bf16")
    return _psum_bf16(x, axes=axes)


def _quantize(v, axis):
    """int8 values and float32 scales (max|v| / 127 over ``axis``; 1 where that max is 0)."""
    amax = jnp.max(jnp.abs(v), axis=axis, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127, 1).astype(jnp.float32)
    return jnp.clip(jnp.round(v / scale), -127, 127).astype(jnp.int8), scale


def _int8_allreduce(x, axes, m: int, per_row: bool):
    """Blocks (M, k, C) of ``x`` quantized, exchanged, summed, re-quantized and gathered."""
    shape, dtype = x.shape, x.dtype
    v = x.astype(jnp.float32).reshape((shape[0], -1) if per_row and x.ndim else (-1, 1))
    rows = v.shape[0]
    k = -(-rows // m)
    v = jnp.pad(v, ((0, m * k - rows), (0, 0))).reshape(m, k, v.shape[1])  # block j goes to device j
    q, s = _quantize(v, (2,) if per_row else (0, 1, 2))                   # s: (M, k, 1) or (1, 1, 1)
    q = lax.all_to_all(q, axes, 0, 0, tiled=True)                         # now block m came from device m
    if per_row:
        s = lax.all_to_all(s, axes, 0, 0, tiled=True)
    else:
        s = lax.all_gather(s[0], axes, axis=0, tiled=True)[:, None]      # (M, 1, 1): each sender's scale
    chunk = jnp.sum(q.astype(jnp.float32) * s, axis=0)                    # (k, C): my block of the sum
    q2, t = _quantize(chunk, (1,) if per_row else (0, 1))
    q2 = gather_invariant(q2, axes, 0, tiled=False)                       # (M, k, C), replicated
    t = gather_invariant(t, axes, 0, tiled=False)                         # (M, k, 1) or (M, 1, 1)
    out = (q2.astype(jnp.float32) * t).reshape(m * k, -1)[:rows]
    return out.reshape(shape).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _psum_int8_vjp(x, axes, m, per_row):
    return _psum_int8(x, axes=axes, m=m, per_row=per_row)


def _int8_fwd(x, axes, m, per_row):
    # A zero-size slice keeps x's shard_map type (which axes it varies over) for the backward pass.
    return _psum_int8(x, axes=axes, m=m, per_row=per_row), (x.reshape(-1)[:0],)


def _int8_bwd(axes, m, per_row, res, ct):
    proto = jnp.broadcast_to(jnp.sum(res[0]), ct.shape).astype(ct.dtype)
    return jax.linear_transpose(lambda v: lax.psum(v, axes), proto)(ct)  # straight-through


_psum_int8_vjp.defvjp(_int8_fwd, _int8_bwd)


@named("lossy_psum_int8", ("axes", "m", "per_row"))
def _psum_int8(x, *, axes, m, per_row):
    return _int8_allreduce(x, axes, m, per_row)


def lossy_psum_int8(x, axis_name: AxisName, *, per_row: bool = False):
    """LOSSY ``lax.psum(x, axis_name)`` exchanged as int8 (about a quarter of float32's bytes).

    ``per_row=True`` scales each row of ``x`` (viewed as ``(x.shape[0], -1)``) separately, which
    keeps small rows accurate next to large ones. Result in ``x.dtype``, typed replicated over
    ``axis_name`` like a psum's. Error bound in the module docstring.
    """
    axes = axis_tuple(axis_name, "lossy_psum_int8")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"lossy_psum_int8: x must be floating point, got {jnp.result_type(x)}")
    if per_row and jnp.ndim(x) < 1:
        raise ValueError("lossy_psum_int8: per_row=True needs x with at least one dim")
    m = group_size(axes, "lossy_psum_int8")
    if math.prod(jnp.shape(x)) == 0:
        return lax.psum(x, axes)
    return _psum_int8_vjp(x, axes, m, bool(per_row))
