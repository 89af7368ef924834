"""FLOPs of one primitive application, from shapes alone.

The counts follow XLA's HloCostAnalysis conventions closely enough to be checked against
`compiled.cost_analysis()`: a multiply-add is 2 FLOPs, an elementwise arithmetic op is one FLOP per
output element, a reduction one FLOP per input element, and data movement (reshape, transpose,
slice, gather, broadcast, convert) is free. Transcendentals (exp, log, tanh, ...) count one per element
here; XLA reports them separately, so they are a small, documented difference.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

# Ops that move or relabel data without arithmetic.
MOVEMENT = frozenset({
    "broadcast_in_dim", "reshape", "transpose", "squeeze", "expand_dims", "slice", "dynamic_slice",
    "dynamic_update_slice", "gather", "concatenate", "pad", "rev", "copy", "copy_p", "convert_element_type",
    "iota", "select_n", "bitcast_convert_type", "sharding_constraint", "stop_gradient", "device_put",
    "squeeze", "split", "reduce_precision", "pjit", "jit",
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


def conv_flops(rhs_shape: Sequence[int], out_shape: Sequence[int], params: dict) -> float:
    # Each output element is a dot product over (input features per group) x (kernel window):
    # exactly the kernel's elements divided by its output-feature count.
    dn = params["dimension_numbers"]
    out_feature_dim = dn.rhs_spec[0]
    per_output = math.prod(rhs_shape) / rhs_shape[out_feature_dim]
    return 2.0 * math.prod(out_shape) * per_output


def primitive_flops(name: str, in_avals: Sequence[Any], out_avals: Sequence[Any], params: dict) -> float:
    """FLOPs of one application of primitive `name` (not counting enclosing loop trips)."""
    if name == "dot_general":
        return dot_general_flops(in_avals[0].shape, out_avals[0].shape, params)
    if name == "conv_general_dilated":
        return conv_flops(in_avals[1].shape, out_avals[0].shape, params)
    if name in MOVEMENT:
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
