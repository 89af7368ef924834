"""gather and scatter: embedding lookups and their gradients.

gather: indices' batch dims split the output's batch dims (the table stays whole along the indexed
dims), and a table dimension sliced in full (the embedding feature) splits with the output's offset dim.
A table split on its indexed (vocabulary) dim also works without communication when one dim is
indexed: each device looks up the rows it holds and zeros the others (gather: partial output), or adds
only the updates that land in its rows (scatter-add: the output stays split). Out-of-range indices,
which jax fills or clips, give zeros there instead.
scatter-add: the transposes: updates split on batch scatter into a whole table each, leaving the result
(and the operand it adds to) a partial sum; a fully-windowed feature dim splits table and updates alike.
Batching dims (``operand_batching_dims``) split operand, indices and output together. Other scatters
(overwrite, mul, min, max) split only batching and feature dims.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.lax import GatherScatterMode

from tag_jax.rules.factors import Factors, position
from tag_jax.rules.registry import register


def _s(aval) -> tuple[int, ...]:
    return tuple(int(d) for d in aval.shape)


@register("gather")
def _gather(in_avals, out_avals, params):
    dn, sizes = params["dimension_numbers"], params["slice_sizes"]
    op_shape, idx_shape, out_shape = _s(in_avals[0]), _s(in_avals[1]), _s(out_avals[0])
    op, idx, out = [None] * len(op_shape), [None] * len(idx_shape), [None] * len(out_shape)
    batch_out = [d for d in range(len(out_shape)) if d not in dn.offset_dims]
    for k, od in enumerate(batch_out):  # indices dim k (the index vector dim is last)
        idx[k] = out[od] = f"b{k}"
        if k in dn.start_indices_batching_dims:
            op[dn.operand_batching_dims[list(dn.start_indices_batching_dims).index(k)]] = f"b{k}"
    offset_operand = [d for d in range(len(op_shape))
                      if d not in dn.collapsed_slice_dims and d not in dn.operand_batching_dims]
    full = set()
    for od, d in zip(dn.offset_dims, offset_operand):
        if d not in dn.start_index_map and sizes[d] == op_shape[d]:
            op[d] = out[od] = f"f{d}"
            full.add(d)
    vocab = _vocab_dim(dn.start_index_map, dn.collapsed_slice_dims, dn.operand_batching_dims, sizes)
    if vocab is not None:
        op[vocab] = "v"

    def local(p, li, lo):
        return {**p, "slice_sizes": tuple(li[0][d] if d in full else int(n)
                                          for d, n in enumerate(p["slice_sizes"]))}

    bound = min([op_shape[d] for d in dn.start_index_map] or [1])
    return Factors((tuple(op), tuple(idx)), (tuple(out),), local=local, index_bounds=(None, bound),
                   summed=frozenset({"v"} if vocab is not None else ()),
                   impl=_masked_gather if vocab is not None else None)


def _vocab_dim(index_map, collapsed, batching, sizes=None):
    """The one indexed operand dim, if it is collapsed (one row per index): it may split by rows."""
    if len(index_map) != 1 or index_map[0] not in collapsed or index_map[0] in batching:
        return None
    if sizes is not None and sizes[index_map[0]] != 1:
        return None
    return index_map[0]


def _shifted(indices, d, strategy_dims, local_rows, mesh_axes):
    """Indices into this device's rows of the split dim `d`, and which of them land there."""
    start = (position(strategy_dims[d], mesh_axes) * local_rows).astype(indices.dtype)
    shifted = indices - start
    return shifted, (shifted >= 0) & (shifted < local_rows)


def _masked_gather(params, args, strategy, mesh_axes):
    table, indices = args
    dn = params["dimension_numbers"]
    d = dn.start_index_map[0]
    p = {k: v for k, v in params.items()}
    if not strategy.inputs[0].dims[d]:
        return [jax.lax.gather(table, indices, **p)]
    shifted, hit = _shifted(indices, d, strategy.inputs[0].dims, table.shape[d], mesh_axes)
    p["mode"] = GatherScatterMode.CLIP
    out = jax.lax.gather(table, shifted, **p)
    mask = jnp.expand_dims(hit[..., 0], tuple(dn.offset_dims))
    return [jnp.where(mask, out, jnp.zeros((), out.dtype))]


def _scatter(additive: bool):
    def rule(in_avals, out_avals, params):
        dn = params["dimension_numbers"]
        op_shape, idx_shape, upd_shape = _s(in_avals[0]), _s(in_avals[1]), _s(in_avals[2])
        op, idx, upd = [None] * len(op_shape), [None] * len(idx_shape), [None] * len(upd_shape)
        summed = set()
        upd_scatter = [d for d in range(len(upd_shape)) if d not in dn.update_window_dims]
        for k, ud in enumerate(upd_scatter):
            if k in dn.scatter_indices_batching_dims:
                op[dn.operand_batching_dims[list(dn.scatter_indices_batching_dims).index(k)]] = f"b{k}"
            elif not additive:
                continue
            else:
                summed.add(f"b{k}")
            idx[k] = upd[ud] = f"b{k}"
        window_operand = [d for d in range(len(op_shape))
                          if d not in dn.inserted_window_dims and d not in dn.operand_batching_dims]
        for ud, d in zip(dn.update_window_dims, window_operand):
            if d not in dn.scatter_dims_to_operand_dims and upd_shape[ud] == op_shape[d]:
                op[d] = upd[ud] = f"f{d}"
        vocab = (_vocab_dim(dn.scatter_dims_to_operand_dims, dn.inserted_window_dims,
                            dn.operand_batching_dims) if additive else None)
        if vocab is not None:
            op[vocab] = "v"
        bound = min([op_shape[d] for d in dn.scatter_dims_to_operand_dims] or [1])
        return Factors((tuple(op), tuple(idx), tuple(upd)), (tuple(op),), summed=frozenset(summed),
                       summed_inputs=(0,) if additive else (), linear=((0, 2),) if additive else (),
                       index_bounds=(None, bound, None),
                       impl=_row_split_scatter_add if vocab is not None else None)
    return rule


register("scatter-add", "scatter_add")(_scatter(True))
register("scatter", "scatter-mul", "scatter_mul", "scatter-min", "scatter-max")(_scatter(False))


def _row_split_scatter_add(params, args, strategy, mesh_axes):
    operand, indices, updates = args
    dn = params["dimension_numbers"]
    d = dn.scatter_dims_to_operand_dims[0]
    p = {k: v for k, v in params.items() if k not in ("update_jaxpr", "update_consts")}
    if strategy.inputs[0].dims[d]:
        indices, _ = _shifted(indices, d, strategy.inputs[0].dims, operand.shape[d], mesh_axes)
        p["mode"] = GatherScatterMode.FILL_OR_DROP  # updates for other devices' rows are dropped
    return [jax.lax.scatter_add(operand, indices, updates, **p)]
