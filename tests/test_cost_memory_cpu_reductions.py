"""XLA:CPU's fusion of reductions, checked against `memory_analysis()` at toy size.

On XLA:CPU (jax 0.10.2) a reduction is a YNNPACK fusion whose reduced value may be at most one
multiply/maximum of materialised operands. Batch norm's ``x - mean`` feeds the backward's
``reduce_sum(dy * (x - mean))``, so XLA materialises it in the forward and keeps it until the
backward, while still recomputing it from ``x`` inside the loop fusions of its other users (so
``x`` stays live too). The simulator models this with `lowering="xla-cpu"`
(`tag_jax.cost.simulate._fused`); found in resnet-50 FSDP's buffer assignment (benchmarks/FIDELITY.md).
"""

import jax
import jax.numpy as jnp
import numpy as np

import tag_jax
from tag_jax.cost import Simulator
from tag_jax.emit import emit
from tag_jax.hlo import compiled_memory
from tag_jax.strategy import MeshSpec, OpStrategy, Strategy, TensorSharding as TS
from tag_jax.topology import Device, Link, Topology

S = jax.ShapeDtypeStruct
F32 = np.float32
MESH = MeshSpec((8,), ("a",), tuple(range(8)))
BOUND = 0.20  # benchmarks/fidelity.py's MEMORY_BOUND


def _topology():
    devs = tuple(Device(i, "x", 100e12, 10e12, 16e9, 1e12, node=i // 4) for i in range(8))
    return Topology(devs, intra_node=Link(100e9, 1e-6), inter_node=Link(1e9, 1e-5))


def _replicated(graph):
    rep = lambda ts: tuple(TS.replicated(len(graph.tensors[t].shape)) for t in ts)  # noqa: E731
    strats = tuple((OpStrategy(op.primitive, rep(op.inputs), rep(op.outputs)),) for op in graph.ops)
    return strats, Strategy(MESH, (0,) * len(graph.ops), rep(graph.inputs))


def _normalised_mlp(layers, batch, width):
    def f(ws, x):
        def loss(ws):
            h = x
            for w in ws:
                z = h @ w
                c = z - jnp.mean(z, axis=0)  # batch norm without scale: x - mean ...
                v = jnp.mean(c * c, axis=0)
                h = jax.nn.relu(c * jax.lax.rsqrt(v + 1e-5))  # ... feeds reductions both ways
            return jnp.sum(h)
        return jax.grad(loss)(ws)
    return f, ([S((width, width), F32)] * layers, S((batch, width), F32))


def test_values_feeding_reductions_are_materialised_on_xla_cpu():
    f, args = _normalised_mlp(layers=6, batch=512, width=256)
    graph = tag_jax.trace(f, *args)
    strats, strategy = _replicated(graph)
    mesh = jax.make_mesh((8,), ("a",), axis_types=(jax.sharding.AxisType.Auto,))
    compiled = compiled_memory(emit(graph, strategy, strats, mesh).lower(*args).compile())["peak"]
    cpu = Simulator(graph, strats, _topology(), MESH, lowering="xla-cpu").cost(strategy)
    plain = Simulator(graph, strats, _topology(), MESH).cost(strategy)
    assert abs(cpu.peak_memory_bytes / compiled - 1) <= BOUND, (cpu.peak_memory_bytes, compiled)
    # without the rule each x - mean is fused away and the forward's residuals are undercounted
    assert plain.peak_memory_bytes / compiled < 1 - BOUND, (plain.peak_memory_bytes, compiled)


def test_live_set_at_the_peak_holds_the_materialised_centred_values():
    f, args = _normalised_mlp(layers=3, batch=64, width=32)
    graph = tag_jax.trace(f, *args)
    strats, strategy = _replicated(graph)
    sim = Simulator(graph, strats, _topology(), MESH, lowering="xla-cpu")
    live = sim.live_at(strategy)
    assert live["peak"] == sim.cost(strategy).peak_memory_bytes
    made = {graph.ops[graph.tensors[w[1]].producer].primitive for _, w, *_ in live["live"]
            if w[0] == "result" and graph.tensors[w[1]].shape == (64, 32)}
    # the centred values (sub), the dot outputs they are recomputed from, the relu outputs
    assert {"sub", "dot_general", "max"} <= made
    plain = Simulator(graph, strats, _topology(), MESH).live_at(strategy)
    assert "sub" not in {graph.ops[graph.tensors[w[1]].producer].primitive
                         for _, w, *_ in plain["live"] if w[0] == "result"}


def test_a_multiply_reduced_is_fused_into_the_reduction_on_xla_cpu():
    """reduce_sum(a * b) of materialised a, b is one YNNPACK fusion: the product is no buffer."""
    graph = tag_jax.trace(lambda a, b: jnp.sum(a * b, axis=0), S((512, 256), F32), S((512, 256), F32))
    strats, strategy = _replicated(graph)
    cpu = Simulator(graph, strats, _topology(), MESH, lowering="xla-cpu").cost(strategy)
    plain = Simulator(graph, strats, _topology(), MESH).cost(strategy)
    assert cpu.peak_memory_bytes == plain.peak_memory_bytes == 2 * 512 * 256 * 4 + 256 * 4
