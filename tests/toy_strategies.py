"""Toy programs whose collectives the simulator predicts and XLA compiles: one option per op,
a two-node topology, and the comparison of the two (8 CPU devices)."""
import tag_jax
from tag_jax.cost import simulate
from tag_jax.emit import emit
from tag_jax.hlo import collective_bytes_by_kind, collectives
from tag_jax.strategy import OpStrategy, Strategy, TensorSharding as TS
from tag_jax.topology import Device, Link, Topology


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


def toy_topology() -> Topology:
    """8 devices in two nodes of four."""
    devs = tuple(Device(i, "x", 100e12, 10e12, 16e9, 1e12, node=i // 4) for i in range(8))
    return Topology(devs, intra_node=Link(100e9, 1e-6), inter_node=Link(1e9, 1e-5))


def compare_with_compiled(fn, args, in_shardings, pick, mesh, jax_mesh):
    """(predicted bytes per kind, compiled bytes per kind, graph, options, strategy) of `fn` with
    each op's option from `pick` (nonzero kinds only)."""
    graph = tag_jax.trace(fn, *args)
    strats = one_option_per_op(graph, pick)
    strategy = Strategy(mesh, (0,) * len(graph.ops), tuple(in_shardings))
    cost = simulate(graph, strats, strategy, toy_topology())
    predicted = {k: v for k, v in cost.comm_bytes_by_kind.items() if v}
    compiled = emit(graph, strategy, strats, jax_mesh).lower(*args).compile()
    real = {k: v for k, v in collective_bytes_by_kind(collectives(compiled)).items() if v}
    return predicted, real, graph, strats, strategy
