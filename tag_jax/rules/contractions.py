"""dot_general and conv_general_dilated: batch, free (M, N / output feature) and contracting (K /
input feature) factors; splitting a contracting factor leaves the output a partial sum."""
from __future__ import annotations

from tag_jax.rules.factors import Factors
from tag_jax.rules.registry import register


@register("dot_general")
def _dot_general(in_avals, out_avals, params):
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    lr, rr = len(in_avals[0].shape), len(in_avals[1].shape)
    lhs, rhs, out = [None] * lr, [None] * rr, []
    for i, (a, b) in enumerate(zip(lb, rb)):
        lhs[a] = rhs[b] = f"b{i}"
        out.append(f"b{i}")
    for i, (a, b) in enumerate(zip(lc, rc)):
        lhs[a] = rhs[b] = f"k{i}"
    for name, labs, used in (("m", lhs, set(lc) | set(lb)), ("n", rhs, set(rc) | set(rb))):
        for j, d in enumerate(x for x in range(len(labs)) if x not in used):
            labs[d] = f"{name}{j}"
            out.append(f"{name}{j}")
    return Factors((tuple(lhs), tuple(rhs)), (tuple(out),),
                   summed=frozenset(f"k{i}" for i in range(len(lc))))


@register("conv_general_dilated")
def _conv(in_avals, out_avals, params):
    dn = params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    lhs = [None] * len(in_avals[0].shape)
    rhs = [None] * len(in_avals[1].shape)
    out = [None] * len(out_avals[0].shape)
    fgc, bgc = params["feature_group_count"], params["batch_group_count"]
    summed = frozenset()
    if bgc == 1:
        lhs[lhs_spec[0]] = out[out_spec[0]] = "b"
    if fgc == 1 and bgc == 1:
        rhs[rhs_spec[0]] = out[out_spec[1]] = "o"
        lhs[lhs_spec[1]] = rhs[rhs_spec[1]] = "i"
        summed = frozenset({"i"})
    return Factors((tuple(lhs), tuple(rhs)), (tuple(out),), summed=summed)
