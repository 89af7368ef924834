"""Compressed-psum replacements of single ops, for emission (`tag_jax.hlo.evaluate`'s `on_op`).

A plan's `CompressionChoice`s name source ops by id. SFB needs nothing here: the strategy gives the
weight-gradient op option 0 and emission pins its factors replicated (two all-gathers). Two methods
replace an op's evaluation with a `jax.shard_map`:

- "row_sparse": a table-gradient scatter-add becomes ``operand + row_sparse_psum(ids, rows)`` with
  the indices and rows in the layout they were produced in (split over the data axes); the result is
  replicated, as option 0 of the scatter-add says. Its operands are not resharded first.
- "lossy_bf16" / "lossy_int8": the op runs on its local blocks (its planned option gives a partial
  sum over the data axes) and the partial result is summed by `lossy_psum_bf16` / `lossy_psum_int8`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh, PartitionSpec

from tag_jax.hlo.graph import Op, OpGraph
from tag_jax.strategy import OpStrategy, Strategy

REPLACED = ("row_sparse", "lossy_bf16", "lossy_int8")


def replacements(graph: OpGraph, strategy: Strategy, op_strategies: Sequence[Sequence[OpStrategy]],
                 mesh: Mesh, choices: Sequence[Any]) -> tuple[dict[int, Callable[[list], list]], frozenset[int]]:
    """({op id: fn(operand values) -> result values}, op ids whose operands must stay as produced).

    Lossy choices leave the strategy as planned, so each source's option is the strategy's."""
    from tag_jax.emit.program import EmitError, produced_shardings

    made = produced_shardings(graph, strategy, op_strategies)
    fns: dict[int, Callable[[list], list]] = {}
    keep: set[int] = set()
    for ch in choices:
        for op_id, method in ch.sources:
            if method not in REPLACED:
                continue
            if not 0 <= op_id < len(graph.ops):
                raise EmitError(f"compression of {ch.gradient}: op {op_id} is not in {graph.name}; "
                                "the plan was made for another graph")
            op = graph.ops[op_id]
            if method == "row_sparse":
                fns[op_id] = _row_sparse(graph, op, made, mesh, ch.gradient)
                keep.add(op_id)
            else:
                fns[op_id] = _lossy(op, op_strategies[op_id][strategy.choices[op_id]], mesh, method, ch)
    return fns, frozenset(keep)


def _row_sparse(graph: OpGraph, op: Op, made, mesh: Mesh, gradient: str) -> Callable[[list], list]:
    from tag_jax.compress import row_sparse_psum
    from tag_jax.emit.program import EmitError
    from tag_jax.search.compression import row_sparse_layout, row_sparse_pattern

    why = row_sparse_pattern(graph, op)
    axes = row_sparse_layout(graph, made, op)
    if why is not None or not axes:
        raise EmitError(f"row_sparse for {gradient}: {op.where()} cannot use row_sparse_psum: "
                        f"{why or 'its indices are not split over data axes on dim 0 alone'}; plan it "
                        "with compression='none' or another method")
    ids_spec = PartitionSpec(axes)
    upd_spec = PartitionSpec(axes)
    num_rows = graph.tensors[op.inputs[0]].shape[0]

    def local(ids, rows):
        return row_sparse_psum(ids[..., 0], rows, axes, num_rows=num_rows)

    summed = jax.shard_map(local, mesh=mesh, in_specs=(ids_spec, upd_spec), out_specs=PartitionSpec())

    def run(invals: list) -> list:
        operand, ids, rows = invals
        return [operand + summed(ids, rows).astype(operand.dtype)]

    return run


def _lossy(op: Op, option: OpStrategy, mesh: Mesh, method: str, ch) -> Callable[[list], list]:
    from tag_jax.compress import lossy_psum_bf16, lossy_psum_int8
    from tag_jax.emit.program import EmitError

    out = option.outputs[0]
    if len(op.outputs) != 1 or set(out.partial) != set(ch.axes):
        raise EmitError(f"{method} for {ch.gradient}: option {option.name!r} of {op.where()} does not "
                        f"give a partial sum over {ch.axes}; plan it with compression='lossless'")
    psum = lossy_psum_bf16 if method == "lossy_bf16" else lossy_psum_int8
    axes = tuple(a for a in mesh.axis_names if a in out.partial)
    params = op.eqn.primitive.get_bind_params(op.eqn.params)

    def local(*vals):
        return psum(op.eqn.primitive.bind(*vals, **params), axes)

    in_specs = tuple(s.to_partition_spec() for s in option.inputs)
    reduced = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out.without_partial().to_partition_spec())
    return lambda invals: [reduced(*invals)]
