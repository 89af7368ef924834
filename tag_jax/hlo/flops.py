"""FLOPs of one primitive application, from shapes alone.

The counts follow XLA's HloCostAnalysis conventions closely enough to be checked against
`compiled.cost_analysis()`: a multiply-add is 2 FLOPs, an elementwise arithmetic op is one FLOP per
output element, a reduction one FLOP per input element, and data movement (reshape, transpose,
slice, gather, broadcast) is free; a dtype conversion is one FLOP per element, as in XLA. Transcendentals (exp, log, tanh, sqrt, ...)
are not FLOPs here, as in XLA, which reports them as "transcendentals" (`TRANSCENDENTAL`).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

# Ops that move or relabel data without arithmetic.
MOVEMENT = frozenset({
    "broadcast_in_dim", "reshape", "transpose", "squeeze", "expand_dims", "slice", "dynamic_slice",
    "dynamic_update_slice", "gather", "concatenate", "pad", "rev", "copy", "copy_p",
    "iota", "select_n", "bitcast_convert_type", "sharding_constraint", "stop_gradient", "device_put",
    "squeeze", "split", "reduce_precision", "pjit", "jit",
})

# XLA reports these under "transcendentals", not "flops"; we follow it so counts stay comparable.
TRANSCENDENTAL = frozenset({
    "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "asin", "acos", "atan",
    "atan2", "sinh", "cosh", "asinh", "acosh", "atanh", "sqrt", "rsqrt", "cbrt", "pow", "erf_inv", "lgamma",
    "digamma",
})

REDUCTIONS = frozenset({
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "reduce_xor",
    "argmax", "argmin", "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "reduce_precision",
})


def _size(aval: Any) -> int:
    return math.prod(getattr(aval, "shape", ()) or ())


def dot_general_flops(lhs_shape: Sequence[int], out_shape: Sequence[int], params: dict) -> float:
    (lhs_contract, _), _ = params["dimension_numbers"]
    k = math.prod(lhs_shape[d] for d in lhs_contract)
    return 2.0 * math.prod(out_shape) * k


def conv_flops(lhs_shape: Sequence[int], rhs_shape: Sequence[int], out_shape: Sequence[int],
               params: dict) -> float:
    """2 x (output batch x output features) x (input features per group) x valid window taps.

    Like XLA, only taps that land on a real input element count: taps on padding or on the holes of
    an lhs dilation (the input gradient of a strided convolution) are free.
    """
    dn = params["dimension_numbers"]
    lhs_spatial, rhs_spatial, out_spatial = dn.lhs_spec[2:], dn.rhs_spec[2:], dn.out_spec[2:]
    taps = 1
    for i in range(len(lhs_spatial)):
        taps *= _valid_taps(lhs_shape[lhs_spatial[i]], rhs_shape[rhs_spatial[i]], out_shape[out_spatial[i]],
                            params["window_strides"][i], params["padding"][i][0],
                            (params.get("lhs_dilation") or (1,) * len(lhs_spatial))[i],
                            (params.get("rhs_dilation") or (1,) * len(lhs_spatial))[i])
    out_nf = out_shape[dn.out_spec[0]] * out_shape[dn.out_spec[1]]
    return 2.0 * out_nf * rhs_shape[dn.rhs_spec[1]] * taps


def _valid_taps(n_in: int, n_kernel: int, n_out: int, stride: int, pad_lo: int, lhs_dil: int,
                rhs_dil: int) -> int:
    """How many (output position, kernel tap) pairs of one spatial dim read a real input element."""
    import numpy as np

    pos = (np.arange(n_out)[:, None] * stride + np.arange(n_kernel)[None, :] * rhs_dil) - pad_lo
    valid = (pos >= 0) & (pos <= (n_in - 1) * lhs_dil) & (pos % lhs_dil == 0)
    return int(valid.sum())


def primitive_flops(name: str, in_avals: Sequence[Any], out_avals: Sequence[Any], params: dict) -> float:
    """FLOPs of one application of primitive `name` (not counting enclosing loop trips)."""
    if name == "dot_general":
        return dot_general_flops(in_avals[0].shape, out_avals[0].shape, params)
    if name == "conv_general_dilated":
        return conv_flops(in_avals[0].shape, in_avals[1].shape, out_avals[0].shape, params)
    if name in MOVEMENT or name in TRANSCENDENTAL:
        return 0.0
    if name in REDUCTIONS:
        return float(_size(in_avals[0]))
    if name in ("scatter-add", "scatter_add", "scatter", "scatter_mul", "scatter_min", "scatter_max"):
        return float(_size(in_avals[-1]))  # one op per update element
    if name == "integer_pow":
        return float(_size(out_avals[0]) * max(1, abs(params.get("y", 2)) - 1))
    if name in ("sort",):
        n = _size(in_avals[0])
        return float(n * max(1.0, math.log2(max(n, 2))))
    if name in ("top_k",):
        return float(_size(in_avals[0]) * max(1.0, math.log2(max(params.get("k", 2), 2))))
    # Elementwise arithmetic and everything else: one FLOP per output element.
    return float(sum(_size(a) for a in out_avals))


def bytes_moved(in_avals: Sequence[Any], out_avals: Sequence[Any]) -> float:
    total = 0
    for a in list(in_avals) + list(out_avals):
        dtype = getattr(a, "dtype", None)
        if dtype is not None and hasattr(a, "shape"):
            total += _size(a) * dtype.itemsize
    return float(total)
