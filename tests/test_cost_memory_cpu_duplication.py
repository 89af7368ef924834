"""XLA's duplication test and erfc's exp(-x²), checked against `memory_analysis()` at toy size.

A value XLA:CPU materialises for a reduction (`tag_jax.cost.simulate._fused`, `lowering="xla-cpu"`)
is recomputed inside its other consumers' fusions only when it has at most one large operand
(XLA's `EffectivelyAtMostUnary`): batch norm's ``x - mean`` is. A residual sum ``h + f(h)`` that a
LayerNorm's mean reduces has two, so XLA fuses it into none of its consumers: the backward reads
the one buffer, and what it is made from is not kept for recomputation (vit-b16 Megatron's
`add_add_fusion` per residual; benchmarks/FIDELITY.md, fourth round). And XLA expands an f32
``erfc(x)`` with an ``exp(-x*x)`` of its own that CSE merges with the derivative's: one buffer
from the forward to the backward (`negate_exponential_fusion`, exact GELU).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import tag_jax
from tag_jax.cost import Simulator
from tag_jax.emit import emit
from tag_jax.hlo import compiled_memory

simulate = sys.modules["tag_jax.cost.simulate"]  # the module (tag_jax.cost.simulate is a function)
S = jax.ShapeDtypeStruct
F32 = np.float32
from test_cost_memory_cpu_reductions import BOUND, MESH, _replicated, _topology  # noqa: E402


def _compiled_peak(graph, strats, strategy, args):
    mesh = jax.make_mesh((8,), ("a",), axis_types=(jax.sharding.AxisType.Auto,))
    return compiled_memory(emit(graph, strategy, strats, mesh).lower(*args).compile())["peak"]


def _residual_layernorm(layers, batch, width, gelu=False):
    def f(ws, x):
        def loss(ws):
            h = x
            for w in ws:
                z = h @ w
                if gelu:  # exact GELU, as jax.nn.gelu(approximate=False) writes it
                    z = z * jax.lax.erfc(-z * F32(2 ** -0.5)) / 2
                r = h + z  # residual sum: two full-size operands
                mu = jnp.mean(r, axis=-1, keepdims=True)  # LayerNorm's mean reduces r itself
                var = jnp.mean(r * r, axis=-1, keepdims=True) - mu * mu
                h = (r - mu) * jax.lax.rsqrt(var + 1e-5)
            return jnp.sum(h)
        return jax.grad(loss)(ws)
    return f, ([S((width, width), F32)] * layers, S((batch, width), F32))


def test_a_residual_sum_reduced_by_layernorm_is_one_buffer_on_xla_cpu(monkeypatch):
    f, args = _residual_layernorm(layers=6, batch=512, width=256)
    graph = tag_jax.trace(f, *args)
    strats, strategy = _replicated(graph)
    compiled = _compiled_peak(graph, strats, strategy, args)
    cpu = Simulator(graph, strats, _topology(), MESH, lowering="xla-cpu").cost(strategy)
    assert abs(cpu.peak_memory_bytes / compiled - 1) <= BOUND, (cpu.peak_memory_bytes, compiled)
    # without the duplication test the residual sum is "recomputed" in the backward: the dot
    # output and the previous residual it is made from are both kept, one buffer too many a layer
    monkeypatch.setattr(simulate, "_effectively_unary", lambda g, op: True)
    dup = Simulator(graph, strats, _topology(), MESH, lowering="xla-cpu").cost(strategy)
    assert dup.peak_memory_bytes / compiled > 1 + BOUND, (dup.peak_memory_bytes, compiled)


def test_effectively_unary_counts_large_operands_only():
    graph = tag_jax.trace(lambda a, b, m: (a + b, a - m, a * a), S((64, 32), F32), S((64, 32), F32),
                          S((64, 1), F32))
    ops = {op.primitive: op for op in graph.ops}
    assert not simulate._effectively_unary(graph, ops["add"])  # two full-size operands
    assert simulate._effectively_unary(graph, ops["sub"])  # the (64, 1) operand is broadcast


def test_erfc_and_its_derivative_share_one_exp_buffer_on_xla_cpu():
    f, args = _residual_layernorm(layers=4, batch=256, width=128, gelu=True)
    graph = tag_jax.trace(f, *args)
    exps = simulate._erfc_exps(graph)
    assert len(exps) == 4 and all(graph.ops[graph.tensors[t].producer].primitive == "exp"
                                  for t in exps)
    strats, strategy = _replicated(graph)
    sim = Simulator(graph, strats, _topology(), MESH, lowering="xla-cpu")
    live = sim.live_at(strategy)
    held = {w[1] for _, w, *_ in live["live"] if w[0] == "result"}
    assert len(exps & held) >= 3  # the forward's exp(-x²) of the layers not yet differentiated
    compiled = _compiled_peak(graph, strats, strategy, args)
    assert abs(live["peak"] / compiled - 1) <= BOUND, (live["peak"], compiled)
    plain = Simulator(graph, strats, _topology(), MESH).live_at(strategy)
    assert not exps & {w[1] for _, w, *_ in plain["live"] if w[0] == "result"}
