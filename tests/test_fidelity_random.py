"""Partial sums on the random strategies of mlp-real (benchmarks/FIDELITY.md, issue #3), at toy size.

Each test builds a small graph with one hand-picked option per op, prices it with the simulator and
compiles the program `tag_jax.emit` makes of the same strategy (8 CPU devices, a 2x4 (a, b) mesh or
a flat one), then compares the per-kind collective bytes (`tag_jax.hlo.collectives`, where XLA:CPU's
all-reduce + 1/n slice is a reduce-scatter). Every case here was mispredicted before the rule it
checks; the rules are what the compiled HLO of the toy programs shows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tag_jax
from tag_jax.cost import reshard_collectives
from tag_jax.hlo import collectives
from tag_jax.strategy import MeshSpec, TensorSharding as TS
from toy_strategies import compare_with_compiled

S = jax.ShapeDtypeStruct
F32 = np.float32
MESH2 = MeshSpec((2, 4), ("a", "b"), tuple(range(8)))
MESH1 = MeshSpec((8,), ("a",), tuple(range(8)))
AB = ("a", "b")


def P(*dims, partial=()):
    return TS(tuple(() if d is None else (d,) if isinstance(d, str) else tuple(d) for d in dims),
              tuple((partial,) if isinstance(partial, str) else partial))


@pytest.fixture(scope="module")
def meshes():
    auto = jax.sharding.AxisType.Auto
    return {MESH2: jax.make_mesh((2, 4), AB, axis_types=(auto, auto)),
            MESH1: jax.make_mesh((8,), ("a",), axis_types=(auto,))}


def _compare(fn, args, in_shardings, pick, mesh, jax_mesh):
    return compare_with_compiled(fn, args, in_shardings, pick, mesh, jax_mesh)[:2]


# A weight-gradient-like dot (contraction split over a and b) wanted by two consumers in two
# shardings. The emitter leaves the partial result unconstrained; the program reduces it to the
# first consumer's sharding, extended per dimension by a later one that refines it.
TWO_USERS = [
    # (first, second, what XLA does)
    (P("b", None), P(AB, None)),  # reduce to b (RS b, AR a), permute to (a,b): not the most split
    (P(AB, None), P("b", None)),  # reduce-scatter to (a,b), all-gather to b
    (P("a", None), P(AB, None)),  # (a,b) refines a: reduce-scatter to (a,b), all-gather to a
    (P(None, None), P(AB, None)),  # (a,b) refines replicated
    (P("a", None), P("b", None)),  # b does not refine a: reduce to a (RS a, AR b), permute to b
    (P(None, "b"), P(AB, None)),  # merged P(a,b): an all-reduce per axis, then gather / all-to-all
    (P(None, "a"), P("b", None)),  # merged P(b,a)
]


@pytest.mark.parametrize("w1,w2", TWO_USERS, ids=[f"{a}+{b}" for a, b in TWO_USERS])
def test_partial_wanted_twice_is_reduced_to_the_first_users_sharding_refined(w1, w2, meshes):
    def f(x, g):
        y = x.T @ g
        return y * 2.0, y * 3.0

    def pick(op, k):
        if op.primitive == "transpose":
            return [P(AB, None)], [P(None, AB)]
        if op.primitive == "dot_general":
            return [P(None, AB), P(AB, None)], [P(None, None, partial=AB)]
        if op.primitive == "mul":
            w = w1 if k == 0 else w2
            return [w, P()], [w]
        return None

    predicted, real = _compare(f, (S((256, 64), F32), S((256, 64), F32)), (P(AB, None), P(AB, None)),
                               pick, MESH2, meshes[MESH2])
    assert predicted == real


@pytest.mark.parametrize("wants", [[P("a"), P(None), P(None)], [P(None), P("a")]],
                         ids=["split-first", "replicated-first"])
def test_reduce_sum_wanted_twice_is_all_reduced_in_place(wants, meshes):
    """A reduce_sum over the split dim, wanted split by one consumer and replicated by another:
    XLA all-reduces it where it is made and slices (a dot's partial would be reduce-scattered)."""
    def f(x):
        r = jnp.sum(x, axis=1)
        return tuple(r * float(i + 2) for i in range(len(wants)))

    def pick(op, k):
        if op.primitive == "reduce_sum":
            return [P(None, "a")], [P(None, partial="a")]
        if op.primitive == "mul":
            return [wants[k], P()], [wants[k]]
        return None

    predicted, real = _compare(f, (S((64, 256), F32),), (P(None, "a"),), pick, MESH1, meshes[MESH1])
    assert predicted == real == {"all-reduce": 64 * 4}


# partial sums reduced towards shardings whose step 2 (reshard.py) was priced wrong
PARTIAL_RESHARDS = [
    # scattered onto two dims: one all-reduce of the whole piece per axis, last dim's first
    (P(None, None, partial=AB), P("a", "b"), [("all-reduce", ("b",), 64 * 128 * 4),
                                              ("all-reduce", ("a",), 64 * 128 * 4)]),
    (P(None, None, partial=AB), P("b", "a"), [("all-reduce", ("a",), 64 * 128 * 4),
                                              ("all-reduce", ("b",), 64 * 128 * 4)]),
    # a dim split by a reduced axis together with another: all-reduce the whole, slice after
    (P(None, None, partial="b"), P(AB, None), [("all-reduce", ("b",), 64 * 128 * 4)]),
    (P(None, None, partial="b"), P(("b", "a"), None), [("all-reduce", ("b",), 64 * 128 * 4)]),
    (P(None, None, partial="a"), P(None, AB), [("all-reduce", ("a",), 64 * 128 * 4)]),
    (P(None, None, partial="a"), P(None, ("b", "a")), [("all-reduce", ("a",), 64 * 128 * 4)]),
]


@pytest.mark.parametrize("src,dst,expected", PARTIAL_RESHARDS,
                         ids=[f"{s}->{d}" for s, d, _ in PARTIAL_RESHARDS])
def test_partial_reshards_match_compiled_hlo(src, dst, expected, meshes):
    from jax.sharding import NamedSharding, PartitionSpec
    predicted = [(c.kind, c.axes, c.bytes) for c in reshard_collectives(src, dst, (64, 128), F32, MESH2)]
    assert predicted == expected
    jm = meshes[MESH2]
    k = src.partial if len(src.partial) > 1 else src.partial[0]
    f = jax.jit(lambda x, w: x @ w, in_shardings=(NamedSharding(jm, PartitionSpec(None, k)),
                                                 NamedSharding(jm, PartitionSpec(k, None))),
                out_shardings=NamedSharding(jm, PartitionSpec(*dst.to_partition_spec())))
    got = [(c.kind, c.bytes) for c in collectives(f.lower(S((64, 256), F32), S((256, 128), F32)).compile())]
    assert got == [(kind, b) for kind, _, b in expected]


@pytest.mark.parametrize("want", [P("b", None), P(None, "b"), P(AB, None)], ids=str)
def test_select_axes_added_to_a_partial_sum_are_not_reduced(want, meshes):
    """A dot partial over b, transposed by an option partial over (a, b): the a part is a local
    select (no sum over a is ever made), so only b is reduced."""
    def f(x, g):
        return (x.T @ g).T * 2.0

    def pick(op, k):
        if op.primitive == "transpose" and k == 0:
            return [P("b", None)], [P(None, "b")]
        if op.primitive == "dot_general":
            return [P(None, "b"), P("b", None)], [P(None, None, partial="b")]
        if op.primitive == "transpose":
            return [P(None, None, partial=AB)], [P(None, None, partial=AB)]
        if op.primitive == "mul":
            return [want, P()], [want]
        return None

    predicted, real = _compare(f, (S((256, 64), F32), S((256, 64), F32)), (P("b", None), P("b", None)),
                               pick, MESH2, meshes[MESH2])
    assert "all-reduce" not in predicted or want == P(AB, None)
    assert predicted == real


def test_unit_power_of_a_transposed_gradient_then_slices_is_a_reduce_scatter(meshes):
    """Adam's first moment reads ``g ** 1`` (optax), which XLA's simplifier removes: a square weight
    gradient all-reduced for the transpose and the power, whose uses only slice it, is XLA:CPU's
    reduce-scatter (mlp-real random-18: 268 MB of all-reduce predicted, a reduce-scatter compiled)."""
    def f(x, g):
        d = jax.lax.integer_pow((x.T @ g).T, 1)
        return d * 3.0, d + 1.0

    def pick(op, k):
        if op.primitive == "transpose" and k == 0:
            return [P("a", None)], [P(None, "a")]
        if op.primitive == "dot_general":
            return [P(None, "a"), P("a", None)], [P(None, None, partial="a")]
        if op.primitive == "transpose":
            return [P(None, None, partial="a")], [P(None, None, partial="a")]
        if op.primitive == "mul":
            return [P("a", None), P()], [P("a", None)]
        if op.primitive == "add":
            return [P(None, "a"), P()], [P(None, "a")]
        return None

    predicted, real = _compare(f, (S((256, 64), F32), S((256, 64), F32)), (P("a", None), P("a", None)),
                               pick, MESH1, meshes[MESH1])
    assert predicted == real == {"reduce-scatter": 64 * 64 * 4 // 8}


def test_reduction_sliced_before_an_all_to_all_is_a_reduce_scatter(meshes):
    """A square gradient partial over (a, b) reduced to P(None, b) for its transpose (reduce-scatter
    over b, all-reduce over a); the transposed value is wanted P(None, (a, b)), which XLA reaches by
    slicing a off dim 1 and an all-to-all over b, and P(b, a), a slice: every use of the all-reduce
    over a slices it, so it is a reduce-scatter (mlp-real random-17)."""
    def f(x, g):
        d = (x.T @ g).T
        return d * 3.0, d + 1.0

    def pick(op, k):
        if op.primitive == "transpose" and k == 0:
            return [P(AB, None)], [P(None, AB)]
        if op.primitive == "dot_general":
            return [P(None, AB), P(AB, None)], [P(None, None, partial=AB)]
        if op.primitive == "transpose":
            return [P(None, "b")], [P("b", None)]
        if op.primitive == "mul":
            return [P(None, AB), P()], [P(None, AB)]
        if op.primitive == "add":
            return [P("b", "a"), P()], [P("b", "a")]
        return None

    predicted, real = _compare(f, (S((256, 64), F32), S((256, 64), F32)), (P(AB, None), P(AB, None)),
                               pick, MESH2, meshes[MESH2])
    assert predicted == real
    assert "all-reduce" not in real


def test_scatter_add_of_local_selects_makes_no_partial_sum(meshes):
    """The label gradient's scatter-add into zeros with an option that only wants its operands as
    partial selects (R + partial, no operand split): fed non-partial values it is a select itself,
    never partial in the program, so nothing is all-reduced (mlp-real random-12/17: 4 KB and 4 MB
    of all-reduce predicted, none compiled). Still priced apart: the sim gathers both select
    operands (512 B) where XLA scatters in their layout and gathers the result (256 B)."""
    def f(u, w):
        z = jnp.zeros((64, 1), jnp.float32).at[:, 0].add(u * 2.0)
        return (z * 3.0) @ w

    args = (S((64,), F32), S((1, 32), F32))
    graph = tag_jax.trace(f, *args)

    def pick(op, k):
        if op.primitive == "scatter-add":
            ins = [TS.replicated(len(graph.tensors[t].shape)) if graph.tensors[t].dtype.kind == "i"
                   else TS(((),) * len(graph.tensors[t].shape), ("a",)) for t in op.inputs]
            return ins, [P(None, None, partial="a")]
        if op.primitive == "mul" and k == 0:
            return [P("a"), P()], [P("a")]
        if op.primitive == "broadcast_in_dim" and graph.tensors[op.outputs[0]].shape == (64, 1):
            return [P()], [P("a", None)]
        return None

    predicted, real = _compare(f, args, (P("a"), P(None, None)), pick, MESH1, meshes[MESH1])
    assert "all-reduce" not in predicted and "all-reduce" not in real
    assert real == {"all-gather": 64 * 4}


SUPERSET = [
    (P(None, None, partial="a"), P("a", None)),
    (P("b", None, partial="a"), P("b", None)),
    (P(None, None, partial="a"), P(None, "b")),
    (P(None, None, partial="b"), P("a", None)),
]


@pytest.mark.parametrize("carried,wanted", SUPERSET, ids=[f"{c}:{w}" for c, w in SUPERSET])
def test_partial_carried_over_fewer_axes_is_reduced_whole_at_its_root(carried, wanted, meshes):
    """A dot partial over (a, b) fed to an elementwise op whose option wants it partial over one of
    them only (Adam's update on a 2-D mesh): the program has no partial sharding between ops, so XLA
    reduces the dot over both axes where it is made, towards what the elementwise result's
    consumer wants, and the op runs on reduced values (was: the other axis all-reduced before the
    op, the op's result a new root reduced again after it)."""
    def f(x, w):
        return jnp.tanh((x @ w) * 2.0)

    def pick(op, k):
        if op.primitive == "dot_general":
            return [P(None, AB), P(AB, None)], [P(None, None, partial=AB)]
        if op.primitive == "mul":
            return [carried, P()], [carried]
        if op.primitive == "tanh":
            return [wanted], [wanted]
        return None

    predicted, real = _compare(f, (S((64, 256), F32), S((256, 128), F32)), (P(None, AB), P(AB, None)),
                               pick, MESH2, meshes[MESH2])
    assert predicted == real


PINNED_MOVES = [
    (P(None, AB), [P("b", None)]),
    (P(None, "b"), [P("a", None)]),
    (P(AB, None), [P(None, "b")]),
    (P(None, AB), [P("a", "b"), P("b", None)]),
    (P(None, AB), [P("b", None), P(None, "b")]),
]


@pytest.mark.parametrize("src,wants", PINNED_MOVES, ids=[f"{s}->{'+'.join(map(str, w))}" for s, w in PINNED_MOVES])
def test_pinned_value_moved_to_one_split_of_another_dim_is_gathered_whole(src, wants, meshes):
    """A value split on one dim only, wanted split on another dim only by one axis (not an
    all-to-all of that axis): in the emitted program, where both layouts are sharding constraints,
    XLA finds no efficient reshard and all-gathers the whole tensor, then slices (mlp-real random
    2-D strategies: parameters and Adam's moments, e.g. ``P(None,(data,model)) -> P(model,None)``,
    an all-to-all and an all-gather of 1/4 predicted, 268 MB gathered compiled; was: the axis
    sliced first, or the local piece moved by an all-to-all)."""
    def f(x):
        return tuple(x * float(i + 2) for i in range(len(wants)))

    def pick(op, k):
        if op.primitive == "mul":
            return [wants[k], P()], [wants[k]]
        return None

    predicted, real = _compare(f, (S((64, 64), F32),), (src,), pick, MESH2, meshes[MESH2])
    assert predicted == real
    assert real["all-gather"] >= 64 * 64 * 4


def test_select_wanted_one_way_is_made_in_its_reduction_layout(meshes):
    """A local select (``b1 * mu`` with the scalar wanted partial over a: a partial result no sum
    made) wanted by one consumer as ``P(a, None)``: the emitter pins it where a reduction towards
    that would leave it, ``P(a, b)`` (a as a free slice), so XLA computes it there and all-gathers
    over b (1/2 of the tensor), not from ``P(None, b)`` (the whole, `test_pinned_value_moved_...`).
    mlp-real random-5: Adam's ``b1 * mu`` moments, 268 MB predicted per moment, 134 MB compiled."""
    def f(m, s):
        return (s * m) + 1.0

    def pick(op, k):
        if op.primitive == "mul":
            shapes = [len(graph.tensors[t].shape) for t in op.inputs]
            return ([P(partial="a") if n == 0 else P(None, "b") for n in shapes],
                    [P(None, "b", partial="a")])
        if op.primitive == "add":
            return [P("a", None), P()], [P("a", None)]
        return None

    args = (S((64, 64), F32), S((), F32))
    graph = tag_jax.trace(f, *args)
    predicted, real = _compare(f, args, (P(None, "b"), P()), pick, MESH2, meshes[MESH2])
    assert predicted == real == {"all-gather": 64 * 64 * 4 // 2}


def test_select_chain_operands_are_moved_to_where_the_chain_ends(meshes):
    """Adam's update on a 2-D mesh as a chain of local selects: ``m / 2`` wanted partial(a, b) and
    ``0.1 * x`` wanted partial(a) (non-partial operands), added as ``P(None, a)`` + partial(b), the
    sum wanted ``P(None, a)``. The program pins only the chain's end, and XLA moves each operand
    there (x: a permute and a gather over a; m: an all-to-all over a), not gathered whole to the
    selects' replicated layouts (mlp-real random-3, 5, 19: 1.13x all-gather predicted)."""
    def f(m, x):
        return ((m / 2.0) + (0.1 * x)) * 3.0

    def pick(op, k):
        if op.primitive == "div":
            return [P(None, None, partial=AB), P()], [P(None, None, partial=AB)]
        if op.primitive == "mul" and k == 0:
            return [P(), P(None, None, partial="a")], [P(None, None, partial="a")]
        if op.primitive == "add":
            w = P(None, "a", partial="b")
            return [w, w], [w]
        if op.primitive == "mul":
            return [P(None, "a"), P()], [P(None, "a")]
        return None

    predicted, real = _compare(f, (S((64, 64), F32), S((64, 64), F32)), (P("a", None), P(None, "b")),
                               pick, MESH2, meshes[MESH2])
    assert predicted == real


@pytest.mark.parametrize("wants", [[P(None, None), P(None, "b"), P(None, "a")],
                                   [P(None, "b"), P(None, "a")],
                                   [P(None, "b"), P("b", None)]],
                         ids=["full+b+a", "b+a", "b+b0"])
def test_identical_leading_all_gathers_of_one_tensor_are_shared(wants, meshes):
    """A weight ``P((a,b), None)`` wanted replicated, ``P(None, b)`` and ``P(None, a)``: each
    reshard is one full all-gather over (a, b) (then a local slice), and XLA's CSE keeps one
    (mlp-real random-1: dense_3.kernel gathered once for three targets, priced three times).
    Reshards that start differently are not merged (``P(b, None)``: a permute, then a gather)."""
    def f(w):
        return w * 2.0, w * 3.0, w * 4.0

    def pick(op, k):
        if op.primitive == "mul":
            w = wants[k % len(wants)]
            return [w, P()], [w]
        return None

    predicted, real = _compare(f, (S((64, 64), F32),), (P(AB, None),), pick, MESH2, meshes[MESH2])
    assert predicted == real


GATHER_PATHS = [
    # (shape, layout, wanted): every reshard starts with the same all-gather
    ((64, 64), P("a", "b"), [P(None, None), P("a", None)]),  # replication vs partial: two
    ((64, 64), P("a", "b"), [P("a", None), P(None, None)]),
    ((64, 64), P("b", "a"), [P(None, None), P(None, "b")]),  # vs partial, then all-to-all: two
    ((64, 64), P("b", "a"), [P("b", None), P(None, "b")]),  # both partial: one
    ((64, 64), P("b", "a"), [P(None, None), P("b", None), P(None, "b")]),  # two
    ((8, 8, 16, 16), P("b", "a", None, None), [P(None, None, None, None), P("b", None, None, None)]),
    ((8, 8, 16, 16), P(None, None, "b", "a"),
     [P(None, None, None, None), P(None, None, "b", None), P(None, None, None, "b")]),
]


@pytest.mark.parametrize("shape,src,wants", GATHER_PATHS,
                         ids=[f"{len(s)}d-{a}->{'+'.join(map(str, w))}" for s, a, w in GATHER_PATHS])
def test_leading_all_gather_is_shared_only_on_one_path(shape, src, wants, meshes):
    """Alike leading all-gathers of one tensor are shared only by reshards on the same path: the
    partitioner's replication (a replicated target, or a full gather then a slice) or its
    partial replication (a target keeping some split, or an all-to-all after the gather). A
    replicated target and a partially replicated one gather twice (vgg-19 random-7: fc6.kernel
    ``P(model, data)`` wanted ``P(None, None)`` and ``P(None, model)``; a ``P(model, data,
    None, None)`` activation wanted replicated and ``P(model, None, None, None)``)."""
    def f(w):
        return tuple(w * float(i + 2) for i in range(len(wants)))

    def pick(op, k):
        if op.primitive == "mul":
            w = wants[k % len(wants)]
            return [w, P()], [w]
        return None

    predicted, real = _compare(f, (S(shape, F32),), (src,), pick, MESH2, meshes[MESH2])
    assert predicted == real


CHAIN_ENDS = [
    # (x's layout, what the chain's pinned end wants): XLA's collectives
    (P(None, "b"), P("a", None)),  # run in P(a,b) (u and x sliced), one all-gather over b
    (P(None, "a"), P("a", None)),  # conflict: u's P(a,None) wins, x moved by an all-to-all
    (P("a", None), P("b", None)),  # run in P(a,None), one permute to the end
    (P("a", None), P(None, "b")),  # run in P(a,None), sliced to P(a,b), an all-gather over a
    (P("a", None), P("a", "b")),  # run in P(a,None), sliced: nothing
]


@pytest.mark.parametrize("x_sh,end", CHAIN_ENDS, ids=[f"{a}->{b}" for a, b in CHAIN_ENDS])
def test_select_chain_runs_where_its_operands_merge(x_sh, end, meshes):
    """A chain of local selects (``u + 0.1 * x`` wanted ``P(None,a)`` + partial(b), ``* 0.5``
    wanted partial(a), then ``+ 1`` wanted `end`; u ``P(a,None)``): the program pins only the
    last select (to `end`), so GSPMD propagates forward: the unpinned ops run in their operands'
    layouts merged (first operand first), and the pinned one is moved once, an unpinned value
    sliced towards the pin first. Not each operand moved to the end (mlp-real random-1: Adam's
    update computed as ``[4096,2048]``, then one all-gather)."""
    def f(u, x):
        return ((u + 0.1 * x) * 0.5) + 1.0

    def pick(op, k):
        if op.primitive == "mul" and k == 0:
            return [P(), x_sh], [x_sh]
        if op.primitive == "add" and k == 0:
            w = P(None, "a", partial="b")
            return [w, w], [w]
        if op.primitive == "mul":
            return [P(None, None, partial="a"), P()], [P(None, None, partial="a")]
        if op.primitive == "add":
            return [end, P()], [end]
        return None

    predicted, real = _compare(f, (S((64, 64), F32), S((64, 64), F32)), (P("a", None), x_sh),
                               pick, MESH2, meshes[MESH2])
    assert predicted == real


@pytest.mark.parametrize("result,compiled", [
    (P(None, None), {"all-reduce": 64 * 64 * 4}),          # all-reduced in float32, then converted
    (P("a", None), {"reduce-scatter": 64 * 64 * 4 // 8}),  # the same, converted, sliced 1/8
], ids=["whole", "split"])
def test_a_bf16_partial_sum_is_reduced_in_float32_on_cpu(result, compiled, meshes):
    """XLA:CPU all-reduces a bf16 weight gradient in float32 and converts it back (`tag_jax.hlo`
    reads a reduce-scatter through the convert); with `lowering="xla-cpu"` the simulator counts
    float32's bytes, by default (GPU/TPU) bf16's."""
    from tag_jax.cost import Simulator
    from toy_strategies import one_option_per_op, toy_topology
    from tag_jax.strategy import Strategy

    def f(x, g):
        return (x.T @ g) * 2.0

    def pick(op, k):
        if op.primitive == "transpose":
            return [P("a", None)], [P(None, "a")]
        if op.primitive == "dot_general":
            return [P(None, "a"), P("a", None)], [P(None, None, partial="a")]
        if op.primitive == "mul":
            return [result, P()], [result]
        return None

    args = (S((256, 64), jnp.bfloat16), S((256, 64), jnp.bfloat16))
    predicted, real = _compare(f, args, (P("a", None), P("a", None)), pick, MESH1, meshes[MESH1])
    assert real == compiled
    assert predicted == {k: v // 2 for k, v in compiled.items()}
    graph = tag_jax.trace(f, *args)
    strategy = Strategy(MESH1, (0,) * len(graph.ops), (P("a", None), P("a", None)))
    cpu = Simulator(graph, one_option_per_op(graph, pick), toy_topology(), MESH1, lowering="xla-cpu")
    assert {k: v for k, v in cpu.cost(strategy).comm_bytes_by_kind.items() if v} == real
