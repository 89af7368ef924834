"""Reductions, scans along an axis, sorting, FFTs and windowed ops.

Kept dimensions split freely. A reduced dimension splits only for ``reduce_sum`` (the output becomes a
partial sum); max/min/argmax/cumulative/sort axes need communication and are never split. Windowed ops
(``reduce_window_*``, ``select_and_scatter_add``) split the dimensions whose window is trivial (size 1,
stride 1, no padding or dilation): batch and channels in a pooling layer.
"""
from __future__ import annotations

from tag_jax.rules.factors import Factors
from tag_jax.rules.registry import register


def _s(aval) -> tuple[int, ...]:
    return tuple(int(d) for d in aval.shape)


def _lab(i: int, n: int) -> str | None:
    return f"d{i}" if n > 1 else None


def _reduction(summed: bool):
    def rule(in_avals, out_avals, params):
        shape = _s(in_avals[0])
        axes = {a % len(shape) for a in params["axes"]} if shape else set()
        ins = tuple((f"k{i}" if summed and n > 1 else None) if i in axes else _lab(i, n)
                    for i, n in enumerate(shape))
        outs = tuple(l for i, l in enumerate(ins) if i not in axes)
        return Factors((ins,), (outs,) * len(out_avals),
                       summed=frozenset(l for i, l in enumerate(ins) if i in axes and l),
                       linear=((0,),) if summed else ())
    return rule


register("reduce_sum")(_reduction(True))
register("reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "reduce_xor",
         "argmax", "argmin")(_reduction(False))


def _along_axis(key: str, linear: bool = False):
    def rule(in_avals, out_avals, params):
        shape = _s(in_avals[0])
        axis = params[key] % len(shape)
        labs = tuple(None if i == axis else _lab(i, n) for i, n in enumerate(shape))
        return Factors((labs,) * len(in_avals), (labs,) * len(out_avals),
                       linear=((0,),) if linear else ())
    return rule


register("cumsum")(_along_axis("axis", linear=True))
register("cumprod", "cummax", "cummin", "cumlogsumexp")(_along_axis("axis"))
register("sort")(_along_axis("dimension"))


@register("fft")
def _fft(in_avals, out_avals, params):
    # the transform runs over the trailing len(fft_lengths) dims (never split); the leading ones
    # split freely, and a partial sum passes through, as the transform is linear
    shape = _s(in_avals[0])
    lead = len(shape) - len(params["fft_lengths"])
    ins = tuple(_lab(i, n) if i < lead else None for i, n in enumerate(shape))
    outs = ins[:lead] + (None,) * (len(_s(out_avals[0])) - lead)
    return Factors((ins,), (outs,), linear=((0,),))


@register("top_k")
def _top_k(in_avals, out_avals, params):
    shape = _s(in_avals[0])
    axis = params.get("axis", -1) % len(shape)
    labs = tuple(None if i == axis else _lab(i, n) for i, n in enumerate(shape))
    return Factors((labs,), (labs,) * len(out_avals))


def _trivial_window_dims(shape, params) -> set[int]:
    n = len(shape)
    wd = params["window_dimensions"]
    st = params.get("window_strides") or (1,) * n
    pad = params.get("padding") or ((0, 0),) * n
    bd = params.get("base_dilation") or (1,) * n
    wdl = params.get("window_dilation") or (1,) * n
    return {i for i in range(n) if wd[i] == 1 and st[i] == 1 and tuple(pad[i]) == (0, 0)
            and bd[i] == 1 and wdl[i] == 1}


@register("reduce_window_max", "reduce_window_min", "reduce_window_sum")
def _reduce_window(in_avals, out_avals, params):
    shape = _s(in_avals[0])
    keep = _trivial_window_dims(shape, params)
    labs = tuple(_lab(i, n) if i in keep else None for i, n in enumerate(shape))
    return Factors((labs,), (labs,))


@register("select_and_scatter_add")
def _select_and_scatter_add(in_avals, out_avals, params):
    shape = _s(in_avals[1])  # (source: pooled gradient, operand: pooling input)
    keep = _trivial_window_dims(shape, params)
    labs = tuple(_lab(i, n) if i in keep else None for i, n in enumerate(shape))
    return Factors((labs, labs), (labs,))


@register("select_and_gather_add")
def _select_and_gather_add(in_avals, out_avals, params):
    shape = _s(in_avals[1])  # (tangents, operand) -> pooled tangents
    keep = _trivial_window_dims(shape, params)
    labs = tuple(_lab(i, n) if i in keep else None for i, n in enumerate(shape))
    return Factors((labs, labs), (labs,))


@register("reduce_window")
def _reduce_window_generic(in_avals, out_avals, params):
    n = len(out_avals)  # operands..., then one scalar init value per operand
    shape = _s(in_avals[0])
    keep = _trivial_window_dims(shape, params)
    labs = tuple(_lab(i, m) if i in keep else None for i, m in enumerate(shape))
    return Factors((labs,) * n + ((),) * (len(in_avals) - n), (labs,) * n)
