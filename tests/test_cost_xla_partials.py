"""The simulator's model of how XLA handles partial sums, checked against compiled HLO at toy size.

Each test builds a small graph with one hand-picked option per op, prices it with the simulator and
compiles the program `tag_jax.emit` makes of the same strategy (8 CPU devices), then compares the
per-kind collective bytes (`tag_jax.hlo.collectives`, where XLA:CPU's all-reduce + 1/n slice is a
reduce-scatter). The causes were found on random strategies of mlp-real (benchmarks/FIDELITY.md).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tag_jax
from tag_jax.cost import Simulator
from tag_jax.strategy import MeshSpec, Strategy, TensorSharding as TS
from toy_strategies import compare_with_compiled, one_option_per_op, toy_topology

S = jax.ShapeDtypeStruct
F32 = np.float32
MESH = MeshSpec((8,), ("a",), tuple(range(8)))


def P(*dims, partial=()):
    return TS(tuple(() if d is None else (d,) if isinstance(d, str) else tuple(d) for d in dims),
              tuple(partial))


@pytest.fixture(scope="module")
def flat_mesh():
    return jax.make_mesh((8,), ("a",), axis_types=(jax.sharding.AxisType.Auto,))


def _compare(fn, args, in_shardings, pick, flat_mesh):
    return compare_with_compiled(fn, args, in_shardings, pick, MESH, flat_mesh)


def test_partial_wanted_replicated_and_split_is_reduce_scattered_then_gathered(flat_mesh):
    """y = x @ w with the contraction split, wanted replicated by one consumer and row-split by
    the other: GSPMD gives the reduced value its most split user sharding, so XLA reduce-scatters
    and all-gathers for the replicated user (not an all-reduce and a local slice)."""
    def f(x, w):
        y = x @ w
        return jnp.tanh(y), y * 2.0

    def pick(op, k):
        if op.primitive == "dot_general":
            return [P(None, "a"), P("a", None)], [P(None, None, partial="a")]
        if op.primitive == "mul":
            return [P("a", None), P()], [P("a", None)]
        return None

    predicted, real, *_ = _compare(f, (S((64, 256), F32), S((256, 128), F32)),
                                   (P(None, "a"), P("a", None)), pick, flat_mesh)
    y = 64 * 128 * 4
    assert predicted == {"reduce-scatter": y // 8, "all-gather": y}
    assert real == predicted


def test_select_operand_moves_to_the_reduced_layout(flat_mesh):
    """Adam's ``b1 * mu + g`` with g a partial weight gradient and mu column-split, the sum
    wanted row-split: the strategy asks for mu as a local select of a partial sum, which the program
    cannot say; XLA reduce-scatters g and moves mu to rows (an all-to-all), where the select would
    all-gather mu whole."""
    def f(x, w, mu):
        return (mu * 0.9 + x @ w) * 2.0

    def pick(op, k):
        if op.primitive == "dot_general":
            return [P(None, "a"), P("a", None)], [P(None, None, partial="a")]
        if op.primitive == "mul" and k == 0:
            return [P(None, None, partial="a"), P()], [P(None, None, partial="a")]
        if op.primitive == "add":
            return [P(None, None, partial="a")] * 2, [P(None, None, partial="a")]
        if op.primitive == "mul":
            return [P("a", None), P()], [P("a", None)]
        return None

    args = (S((64, 256), F32), S((256, 128), F32), S((64, 128), F32))
    predicted, real, *_ = _compare(f, args, (P(None, "a"), P("a", None), P(None, "a")), pick,
                                   flat_mesh)
    y = 64 * 128 * 4
    assert predicted == {"reduce-scatter": y // 8, "all-to-all": y // 8}
    assert real == predicted


def test_all_reduce_only_ever_sliced_counts_as_a_reduce_scatter(flat_mesh):
    """A weight gradient reduced to replicated for a replicated transpose whose uses only take row
    or column slices: XLA's all-reduce is followed by (transposes and) slices only, which is
    XLA:CPU's reduce-scatter, counted at the slice size (mlp-real random-18)."""
    def f(x, g):
        d = (x.T @ g).T
        return d * 3.0, d + 1.0

    def pick(op, k):
        if op.primitive == "transpose" and k == 0:  # x.T, batch split
            return [P("a", None)], [P(None, "a")]
        if op.primitive == "dot_general":
            return [P(None, "a"), P("a", None)], [P(None, None, partial="a")]
        if op.primitive == "mul":
            return [P("a", None), P()], [P("a", None)]
        if op.primitive == "add":
            return [P(None, "a"), P()], [P(None, "a")]
        return None

    predicted, real, *_ = _compare(f, (S((256, 64), F32), S((256, 64), F32)),
                                   (P("a", None), P("a", None)), pick, flat_mesh)
    assert predicted == {"reduce-scatter": 64 * 64 * 4 // 8}
    assert real == predicted


def test_all_reduce_used_whole_stays_an_all_reduce(flat_mesh):
    """The same reduction read by elementwise compute before the slices (``d ** 2`` replicated, then
    split): XLA fuses the slice after the computation, the fusion reads the reduced value whole and
    the all-reduce stays (whole-array bytes)."""
    def f(x, g, m):
        d = x.T @ g
        return jnp.where(m > 0, d ** 2, 0.0) * 3.0

    def pick(op, k):
        if op.primitive == "transpose" and k == 0:
            return [P("a", None)], [P(None, "a")]
        if op.primitive == "dot_general":
            return [P(None, "a"), P("a", None)], [P(None, None, partial="a")]
        if op.primitive == "mul":
            return [P("a", None), P()], [P("a", None)]
        return None

    args = (S((256, 64), F32), S((256, 64), F32), S((64, 64), F32))
    predicted, real, *_ = _compare(f, args, (P("a", None), P("a", None), P(None, None)), pick,
                                   flat_mesh)
    assert predicted["all-reduce"] == 64 * 64 * 4
    assert real == predicted


def test_transposed_select_is_no_partial_sum(flat_mesh):
    """A replicated value transposed "as a select" (R -> R + partial) and then wanted replicated:
    the program never makes a partial sum, so nothing is reduced."""
    def f(x, w):
        return (x @ w).T * 2.0

    def pick(op, k):
        if op.primitive == "transpose":
            return [P(None, None, partial="a")], [P(None, None, partial="a")]
        return None

    predicted, real, *_ = _compare(f, (S((64, 256), F32), S((256, 128), F32)), (P(None, None),) * 2, pick,
                                   flat_mesh)
    assert predicted == {} and real == {}


def test_gathered_tables_for_lookups_are_live_together_on_xla_cpu():
    """Row-split tables all-gathered for their lookups are issued together before the first lookup
    (XLA:CPU's schedule, recommender-real FSDP): with `lowering="xla-cpu"` their gathered copies
    count at once; without it, just in time, one at a time."""
    def f(t1, t2, ids, w):
        a = jnp.take(t1, ids, axis=0)
        b = jnp.take(t2, ids, axis=0)
        return (a + b) @ w

    args = (S((4096, 64), F32), S((4096, 64), F32), S((32,), np.int32), S((64, 8), F32))
    graph = tag_jax.trace(f, *args)

    def pick(op, k):
        return None  # replicated ops: each row-split table is all-gathered for its lookup

    strats = one_option_per_op(graph, pick)
    ins = (P("a", None), P("a", None), P(None), P(None, None))
    strategy = Strategy(MESH, (0,) * len(graph.ops), ins)
    table = 4096 * 64 * 4
    args_bytes = 2 * table // 8 + 32 * 4 + 64 * 8 * 4
    cpu = Simulator(graph, strats, toy_topology(), MESH, lowering="xla-cpu").cost(strategy)
    assert cpu.peak_memory_bytes >= args_bytes + 2 * table  # both gathered tables live together
    plain = Simulator(graph, strats, toy_topology(), MESH).cost(strategy)
    assert args_bytes + table <= plain.peak_memory_bytes < args_bytes + 2 * table
    with pytest.raises(ValueError, match="lowering"):
        Simulator(graph, strats, toy_topology(), MESH, lowering="tpu")


def test_cpu_lowering_counts_the_weight_gradient_convolution_copies():
    """XLA:CPU copies a convolution's operands that are not NHWC/HWIO into that layout for the
    kernel (a weight-gradient convolution: both, batch and feature swapped), live while it runs."""
    def f(x, w):
        def loss(w):
            return jnp.sum(jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC")))
        return jax.grad(loss)(w)

    args = (S((8, 16, 16, 32), F32), S((3, 3, 32, 32), F32))
    graph = tag_jax.trace(f, *args)
    strats = one_option_per_op(graph, lambda op, k: None)
    strategy = Strategy(MESH, (0,) * len(graph.ops), (P(None, None, None, None),) * 2)
    plain = Simulator(graph, strats, toy_topology(), MESH).cost(strategy).peak_memory_bytes
    cpu = Simulator(graph, strats, toy_topology(), MESH, lowering="xla-cpu").cost(strategy).peak_memory_bytes
    convs = [op for op in graph.ops if op.primitive == "conv_general_dilated"]
    assert len(convs) == 2  # forward and weight gradient
    extra = cpu - plain
    assert extra > 0 and extra <= 2 * 8 * 16 * 16 * 32 * 4 + 3 * 3 * 32 * 32 * 4
