"""Strategies with one option per op, for toy programs whose collectives are compared with XLA's."""
from tag_jax.strategy import OpStrategy, TensorSharding as TS


def one_option_per_op(graph, pick):
    """One option per op: `pick(op, k)` gives (input shardings, output shardings) or None for
    replicated; k counts the ops of that primitive seen so far."""
    seen, out = {}, []
    for op in graph.ops:
        k = seen[op.primitive] = seen.get(op.primitive, -1) + 1
        got = pick(op, k)
        if got is None:
            got = ([TS.replicated(len(graph.tensors[t].shape)) for t in op.inputs],
                   [TS.replicated(len(graph.tensors[t].shape)) for t in op.outputs])
        out.append((OpStrategy(f"{op.primitive}{k}", tuple(got[0]), tuple(got[1])),))
    return tuple(out)
