"""Data-movement ops: transpose, broadcast, reshape, squeeze, concatenate, pad, slice, rev, split,
stack, unstack, iota, dynamic_slice, dynamic_update_slice.

A dimension the op touches (sliced, padded, reversed, concatenated along) is never split; the others
carry their factor from input to output. Shape-carrying params are rewritten to local shapes by each
rule's `local`.
"""
from __future__ import annotations

import jax

from tag_jax.rules.factors import Factors, position
from tag_jax.rules.registry import register


def _s(aval) -> tuple[int, ...]:
    return tuple(int(d) for d in aval.shape)


def _lab(i: int, n: int) -> str | None:
    return f"d{i}" if n > 1 else None


@register("transpose")
def _transpose(in_avals, out_avals, params):
    perm = params["permutation"]
    shape = _s(in_avals[0])
    ins = tuple(_lab(i, n) for i, n in enumerate(shape))
    return Factors((ins,), (tuple(ins[p] for p in perm),), linear=((0,),))


@register("broadcast_in_dim")
def _broadcast(in_avals, out_avals, params):
    out_shape, src = _s(out_avals[0]), _s(in_avals[0])
    out = [_lab(j, n) for j, n in enumerate(out_shape)]
    ins = tuple(out[j] if src[i] == out_shape[j] else None
                for i, j in enumerate(params["broadcast_dimensions"]))
    extra = tuple((None,) * len(_s(a)) for a in in_avals[1:])  # dynamic shapes: never split
    return Factors((ins,) + extra, (tuple(out),), linear=((0,),),
                   local=lambda p, li, lo: {**p, "shape": lo[0], "sharding": None})


def reshape_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Minimal groups of non-1 dims of `a` and `b` with equal products, in order."""
    ia = [i for i, n in enumerate(a) if n != 1]
    ib = [j for j, n in enumerate(b) if n != 1]
    groups, i, j = [], 0, 0
    while i < len(ia) and j < len(ib):
        gi, gj, pa, pb = [ia[i]], [ib[j]], a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                gi.append(ia[i]); pa *= a[ia[i]]; i += 1
            else:
                gj.append(ib[j]); pb *= b[ib[j]]; j += 1
        groups.append((gi, gj))
    return groups


@register("reshape")
def _reshape(in_avals, out_avals, params):
    a, b = _s(in_avals[0]), _s(out_avals[0])
    ins, outs = [None] * len(a), [None] * len(b)
    if params.get("dimensions") is None and 0 not in a:
        # one-to-one dims share a factor; a merged or split group splits its major-most dims, which
        # keeps each device's block a contiguous 1/k of the group (divisibility is checked per dim)
        for k, (gi, gj) in enumerate(reshape_groups(a, b)):
            ins[gi[0]] = outs[gj[0]] = f"r{k}"
    extra = tuple((None,) * len(_s(x)) for x in in_avals[1:])
    return Factors((tuple(ins),) + extra, (tuple(outs),), linear=((0,),),
                   local=lambda p, li, lo: {**p, "new_sizes": lo[0], "sharding": None})


@register("squeeze")
def _squeeze(in_avals, out_avals, params):
    shape = _s(in_avals[0])
    gone = {d % len(shape) for d in params["dimensions"]}
    ins = tuple(None if i in gone else _lab(i, n) for i, n in enumerate(shape))
    return Factors((ins,), (tuple(l for i, l in enumerate(ins) if i not in gone),), linear=((0,),))


def _keep_dims(shape, untouched) -> tuple:
    return tuple(_lab(i, n) if i in untouched else None for i, n in enumerate(shape))


@register("concatenate")
def _concatenate(in_avals, out_avals, params):
    shape = _s(out_avals[0])
    labs = _keep_dims(shape, set(range(len(shape))) - {params["dimension"]})
    return Factors((labs,) * len(in_avals), (labs,))


@register("pad")
def _pad(in_avals, out_avals, params):
    shape = _s(in_avals[0])
    untouched = {i for i, cfg in enumerate(params["padding_config"]) if tuple(map(int, cfg)) == (0, 0, 0)}
    labs = _keep_dims(shape, untouched)
    return Factors((labs, ()), (labs,))


@register("slice")
def _slice(in_avals, out_avals, params):
    shape = _s(in_avals[0])
    strides = params["strides"] or (1,) * len(shape)
    untouched = {i for i, n in enumerate(shape) if params["start_indices"][i] == 0
                 and params["limit_indices"][i] == n and strides[i] == 1}
    labs = _keep_dims(shape, untouched)

    def local(p, li, lo):
        return {**p, "limit_indices": tuple(li[0][i] if i in untouched else int(x)
                                            for i, x in enumerate(p["limit_indices"]))}

    return Factors((labs,), (labs,), local=local)


@register("rev")
def _rev(in_avals, out_avals, params):
    shape = _s(in_avals[0])
    labs = _keep_dims(shape, set(range(len(shape))) - set(params["dimensions"]))
    return Factors((labs,), (labs,), linear=((0,),))


@register("split")
def _split(in_avals, out_avals, params):
    shape = _s(in_avals[0])
    labs = _keep_dims(shape, set(range(len(shape))) - {params["axis"] % len(shape)})
    return Factors((labs,), (labs,) * len(out_avals))


@register("stack")
def _stack(in_avals, out_avals, params):
    shape = _s(in_avals[0])
    labs = tuple(_lab(i, n) for i, n in enumerate(shape))
    axis = params["axis"] % (len(shape) + 1)
    return Factors((labs,) * len(in_avals), (labs[:axis] + (None,) + labs[axis:],))


@register("unstack")
def _unstack(in_avals, out_avals, params):
    shape = _s(in_avals[0])
    axis = params["axis"] % len(shape)
    labs = _keep_dims(shape, set(range(len(shape))) - {axis})
    return Factors((labs,), (labs[:axis] + labs[axis + 1:],) * len(out_avals))


def _iota_impl(params, args, strategy, mesh_axes):
    d = params["dimension"]
    local = strategy.outputs[0].local_shape(params["shape"], mesh_axes)
    axes = strategy.outputs[0].dims[d]
    pos = position(axes, mesh_axes)
    base = jax.lax.broadcasted_iota(params["dtype"], local, d)
    return [base + (pos * local[d]).astype(params["dtype"]) if axes else base]


@register("iota")
def _iota(in_avals, out_avals, params):
    shape = _s(out_avals[0])
    return Factors((), (tuple(_lab(i, n) for i, n in enumerate(shape)),), impl=_iota_impl)


@register("dynamic_slice")
def _dynamic_slice(in_avals, out_avals, params):
    shape, sizes = _s(in_avals[0]), params["slice_sizes"]
    full = {i for i, n in enumerate(shape) if sizes[i] == n}
    labs = _keep_dims(shape, full)

    def local(p, li, lo):
        return {**p, "slice_sizes": tuple(li[0][i] if i in full else int(x)
                                          for i, x in enumerate(p["slice_sizes"]))}

    n_idx = len(in_avals) - 1
    return Factors((labs,) + ((),) * n_idx, (labs,), local=local,
                   index_bounds=(None,) + tuple(shape[:n_idx]))


@register("dynamic_update_slice")
def _dynamic_update_slice(in_avals, out_avals, params):
    shape, upd = _s(in_avals[0]), _s(in_avals[1])
    labs = _keep_dims(shape, {i for i, n in enumerate(shape) if upd[i] == n})
    n_idx = len(in_avals) - 2
    return Factors((labs, labs) + ((),) * n_idx, (labs,),
                   index_bounds=(None, None) + tuple(shape[:n_idx]))
