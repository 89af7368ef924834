"""Run an `OpGraph` as a program: bind each op's primitive in order.

This is how tag_jax re-evaluates a traced function without calling the user's Python again, and the
hook where emission places sharding constraints on planned tensors (`on_tensor`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from jax._src import source_info_util  # private; as jax.core.eval_jaxpr does

from tag_jax.hlo.graph import OpGraph


def evaluate(graph: OpGraph, flat_args: Sequence[Any],
             on_tensor: Callable[[int, Any], Any] | None = None, *,
             on_operand: Callable[[int, int, Any], Any] | None = None,
             on_op: Callable[[Any, list[Any]], list[Any] | None] | None = None) -> list[Any]:
    """Evaluate the graph on flat arguments (in `graph.inputs` order); return flat results.

    `on_tensor(tensor_id, value)` is called on every argument and op result and may return a
    replacement (e.g. the value under `jax.lax.with_sharding_constraint`). `on_operand(op id,
    position, value)` may replace the value one op reads, without changing it for other readers.
    `on_op(op, operand values)` may return the op's results (a list) to use instead of binding its
    primitive, or None to bind it as usual (emission's compressed-psum replacements).
    """
    if len(flat_args) != len(graph.inputs):
        raise ValueError(f"{graph.name} takes {len(graph.inputs)} array arguments, got {len(flat_args)}")
    hook = on_tensor or (lambda tid, value: value)
    env: dict[int, Any] = {tid: hook(tid, v) for tid, v in zip(graph.inputs, flat_args)}
    env.update(graph.constants)
    for op in graph.ops:
        eqn = op.eqn
        invals = [env[t] for t in op.inputs]
        if on_operand is not None:
            invals = [on_operand(op.id, p, v) for p, v in enumerate(invals)]
        replaced = None if on_op is None else on_op(op, invals)
        if replaced is not None:
            for tid, value in zip(op.outputs, replaced):
                env[tid] = hook(tid, value)
            continue
        if op.primitive == "sharding_constraint":  # the user's layout hint: the plan replaces it
            for tid, value in zip(op.outputs, invals):
                env[tid] = hook(tid, value)
            continue
        params = eqn.primitive.get_bind_params(eqn.params)
        # Keep the op's name stack and source so a re-traced program reads like the original.
        name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
        with source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack), \
                eqn.ctx.manager:
            outs = eqn.primitive.bind(*invals, **params)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for tid, value in zip(op.outputs, outs):
            env[tid] = hook(tid, value)
    return [env[t] for t in graph.outputs]


def as_function(graph: OpGraph, on_tensor: Callable[[int, Any], Any] | None = None) -> Callable:
    """A Python function with the original pytree signature that evaluates the graph."""

    def run(*args: Any, **kwargs: Any) -> Any:
        flat = jax.tree_util.tree_leaves((args, kwargs))
        outs = evaluate(graph, flat, on_tensor)
        return jax.tree_util.tree_unflatten(graph.out_tree, outs)

    return run
