"""Per-primitive sharding rules: every strategy computes the unsharded op, checked under shard_map."""
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType, Mesh

import tag_jax
from tag_jax import models, rules
from tag_jax.strategy import MeshSpec, OpStrategy, TensorSharding

PER_PRIMITIVE = 3  # distinct op signatures validated per primitive


def _mesh(shape, names):
    n = math.prod(shape)
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), names,
                axis_types=(AxisType.Auto,) * len(names))


MESHES = {"1d": ((4,), ("x",)), "2d": ((2, 2), ("x", "y"))}


def _walk(graph, out):
    for op in graph.ops:
        out.append(op)
        for sub in op.subgraphs:
            _walk(sub, out)


@pytest.fixture(scope="module")
def zoo_ops():
    """Every op of every zoo model's toy training step, nested bodies included."""
    ops = []
    for name in models.names():
        ex = models.get(name, "toy")
        _walk(tag_jax.trace(ex.step, ex.state, ex.batch), ops)
    return ops


def _signature(op):
    return (tuple((tuple(v.aval.shape), str(v.aval.dtype)) for v in op.eqn.invars),
            tuple(tuple(v.aval.shape) for v in op.eqn.outvars),
            repr(sorted((k, repr(v)) for k, v in op.eqn.params.items())))


def _samples(ops, primitive):
    """A few distinct signatures of `primitive`, highest rank first (most dims to split)."""
    seen = {}
    for op in ops:
        if op.primitive == primitive:
            seen.setdefault(_signature(op), op)
    distinct = sorted(seen.values(), key=lambda op: -sum(len(v.aval.shape) for v in op.eqn.invars))
    picks, params = [], set()
    for op in distinct:  # first the highest-rank op of each distinct set of params, then the rest
        if _signature(op)[2] not in params:
            params.add(_signature(op)[2])
            picks.append(op)
    chosen = {id(op) for op in picks}
    picks += [op for op in distinct if id(op) not in chosen]
    return picks[:PER_PRIMITIVE]


def _case(op, mesh):
    in_avals = tuple(v.aval for v in op.eqn.invars)
    out_avals = tuple(v.aval for v in op.eqn.outvars)
    ss = rules.strategies(op.primitive, in_avals, out_avals, op.eqn.params, dict(mesh.shape))
    return rules.Case(op.eqn.primitive, in_avals, out_avals, op.eqn.params, ss)


ZOO_PRIMITIVES = sorted(
    "abs add add_any argmax broadcast_in_dim concatenate conv_general_dilated convert_element_type copy "
    "cumsum div dot_general eq erfc exp gather ge gt integer_pow iota is_finite le log log1p lt max min "
    "mul ne neg pad pow reduce_max reduce_sum reduce_window_max reshape rev rsqrt scatter-add "
    "select_and_scatter_add select_n sign slice split sqrt square squeeze stack stop_gradient sub tanh "
    "top_k transpose unstack".split())


def test_every_zoo_primitive_has_a_rule(zoo_ops):
    met = {op.primitive for op in zoo_ops}
    assert met <= rules.registered(), f"no rule for {sorted(met - rules.registered())}"
    assert set(ZOO_PRIMITIVES) <= met, f"zoo no longer uses {sorted(set(ZOO_PRIMITIVES) - met)}"
    assert rules.unknown_primitives(met) == ()
    assert rules.unknown_primitives(["my_custom_op", "add"]) == ("my_custom_op",)


def _check(cases, mesh):
    failures = rules.validate_many(cases, mesh)
    assert not failures, "\n".join(failures[:10])


# Groups of primitives share a compile (and a test), so the whole file stays quick on 2 cores.
GROUPS = [ZOO_PRIMITIVES[i::6] for i in range(6)]


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("group", range(len(GROUPS)))
def test_zoo_strategies_validate(zoo_ops, group, mesh_name):
    mesh = _mesh(*MESHES[mesh_name])
    cases = [_case(op, mesh) for p in GROUPS[group] for op in _samples(zoo_ops, p)]
    assert len({c.primitive.name for c in cases}) == len(GROUPS[group])
    # splits (not only replication) are exercised for every primitive whose zoo ops have a dim to
    # split (the zoo's pow and unstack act on scalars and (1,) only: see the synthetic cases)
    split = {c.primitive.name for c in cases if len(c.strategies) > 1}
    assert split >= set(GROUPS[group]) - {"pow", "unstack"}, set(GROUPS[group]) - split
    _check(cases, mesh)


def _eqn_case(fn, *args, mesh, primitive=None, index=0):
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    eqns = [e for e in jaxpr.eqns if primitive is None or e.primitive.name == primitive]
    while not eqns and len(jaxpr.eqns) == 1 and "jaxpr" in jaxpr.eqns[0].params:  # inside a jit
        jaxpr = jaxpr.eqns[0].params["jaxpr"].jaxpr
        eqns = [e for e in jaxpr.eqns if e.primitive.name == primitive]
    e = eqns[index]
    in_avals = tuple(v.aval for v in e.invars)
    out_avals = tuple(v.aval for v in e.outvars)
    ss = rules.strategies(e.primitive.name, in_avals, out_avals, e.params, dict(mesh.shape))
    return rules.Case(e.primitive, in_avals, out_avals, e.params, ss)


def _synthetic(mesh):
    f32, i32 = jnp.float32, jnp.int32
    x = jax.ShapeDtypeStruct((4, 8, 6), f32)
    table = jax.ShapeDtypeStruct((12, 8), f32)
    ids = jax.ShapeDtypeStruct((4, 6), i32)
    img = jax.ShapeDtypeStruct((4, 6, 6, 8), f32)
    w = jax.ShapeDtypeStruct((3, 3, 8, 4), f32)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)  # a typed PRNG key
    c64 = jax.ShapeDtypeStruct((4, 8, 6), jnp.complex64)

    def conv_loss(a, k):
        y = lax.conv_general_dilated(a, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y * y)
    cases = [
        _eqn_case(lambda a, i: lax.dynamic_slice(a, (0, i, 0), (4, 2, 6)), x,
                  jax.ShapeDtypeStruct((), i32), mesh=mesh),
        _eqn_case(lambda a, u, i: lax.dynamic_update_slice(a, u, (0, i, 0)), x,
                  jax.ShapeDtypeStruct((4, 2, 6), f32), jax.ShapeDtypeStruct((), i32), mesh=mesh),
        _eqn_case(lambda a: jnp.sort(a, axis=1), x, mesh=mesh),
        _eqn_case(lambda a: lax.cumsum(a, axis=2, reverse=True), x, mesh=mesh),
        _eqn_case(lambda a: lax.cummax(a, axis=0), x, mesh=mesh),
        _eqn_case(lambda a: jnp.argmin(a, axis=1), x, mesh=mesh),
        _eqn_case(lambda a: jnp.prod(a, axis=(0, 2)), x, mesh=mesh),
        _eqn_case(lambda t, i: t[i], table, ids, mesh=mesh, primitive="gather"),
        _eqn_case(lambda t, i, u: t.at[i].add(u), table, ids, jax.ShapeDtypeStruct((4, 6, 8), f32),
                  mesh=mesh, primitive="scatter-add"),
        _eqn_case(lambda t, i, u: t.at[i].set(u), table, jax.ShapeDtypeStruct((4,), i32),
                  jax.ShapeDtypeStruct((4, 8), f32), mesh=mesh, primitive="scatter"),
        _eqn_case(lambda a: lax.reduce_window(a, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"),
                  img, mesh=mesh),
        _eqn_case(lambda a, w: lax.conv_general_dilated(a, w, (1, 1), "SAME", feature_group_count=2,
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC")),
                  img, jax.ShapeDtypeStruct((3, 3, 4, 8), f32), mesh=mesh),
        _eqn_case(lambda a, t: jax.jvp(lambda v: lax.reduce_window(v, -jnp.inf, lax.max, (1, 2, 2, 1),
                                                                   (1, 2, 2, 1), "VALID"), (a,), (t,)),
                  img, img, mesh=mesh, primitive="select_and_gather_add"),
        _eqn_case(lambda a: lax.reduce_window((a, a), (0.0, 1.0), lambda p, q: (p[0] + q[0], p[1] * q[1]),
                                              (1, 2, 1, 1), (1, 2, 1, 1), "VALID"), img, mesh=mesh),
        _eqn_case(lambda k: jax.random.bits(k, (4, 8, 6)), key, mesh=mesh, primitive="random_bits"),
        _eqn_case(lambda k: jax.random.split(k, 4), key, mesh=mesh, primitive="random_split"),
        _eqn_case(lambda k: jax.random.fold_in(k, 3), key, mesh=mesh, primitive="random_fold_in"),
        _eqn_case(lambda a: lax.bitcast_convert_type(a, jnp.int32), x, mesh=mesh),
        _eqn_case(lambda a: lax.bitcast_convert_type(a, jnp.uint8), x, mesh=mesh),
        _eqn_case(lambda a: lax.broadcasted_iota(i32, (4, 8, 6), 1), x, mesh=mesh),
        *[_eqn_case(jax.grad(conv_loss, argnums=(0, 1)), img, w, mesh=mesh, primitive="conv_general_dilated",
                    index=k) for k in range(3)],  # forward, input gradient, weight gradient
        _eqn_case(lambda a: jax.lax.with_sharding_constraint(
            a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())), x, mesh=mesh,
            primitive="sharding_constraint"),
        _eqn_case(lambda a: lax.fft(a, "fft", (6,)), c64, mesh=mesh, primitive="fft"),
        _eqn_case(lambda a: lax.fft(a, "rfft", (8, 6)), x, mesh=mesh, primitive="fft"),
        _eqn_case(lambda a: lax.fft(a, "irfft", (10,)), c64, mesh=mesh, primitive="fft"),
        _eqn_case(lambda a: a.reshape(4, 2, 4, 6), x, mesh=mesh),
        _eqn_case(lambda a: a.reshape(32, 6), x, mesh=mesh),
        _eqn_case(lambda a: jnp.clip(a, 0.7, 1.2), x, mesh=mesh),
        _eqn_case(lambda a: lax.pow(a, 3), x, mesh=mesh),
        _eqn_case(lambda a: jnp.unstack(a, axis=2), x, mesh=mesh),
        _eqn_case(lambda a: jnp.stack([a, a], axis=1), x, mesh=mesh),
        _eqn_case(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), x, jax.ShapeDtypeStruct((4, 6, 2), f32),
                  mesh=mesh),
    ]
    return cases


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_rules_beyond_the_zoo_validate(mesh_name):
    mesh = _mesh(*MESHES[mesh_name])
    _check(_synthetic(mesh), mesh)


def _well_formed(strats, in_shapes, out_shapes, mesh_axes, where):
    assert strats, where
    first = strats[0]
    assert all(t.is_replicated() for t in first.inputs + first.outputs), where
    assert len({s.name for s in strats}) == len(strats), f"{where}: names repeat"
    for s in strats:
        for t, shape in zip(s.inputs + s.outputs, list(in_shapes) + list(out_shapes)):
            assert len(t.dims) == len(shape), where
            used = t.axes + t.partial
            assert len(set(used)) == len(used), f"{where}: {s.name} uses an axis twice in {t}"
            for n, d in zip(shape, t.dims):
                k = math.prod(mesh_axes[a] for a in d)
                assert n % k == 0, f"{where}: {s.name} splits a dim of {n} by {k}"


def test_replication_first_and_indivisible_dims_never_split(zoo_ops):
    distinct = list({_signature(op): op for op in zoo_ops}.values())
    for mesh_axes in ({"a": 3}, {"a": 2, "b": 3}, {"a": 4, "b": 2, "c": 5}):
        for op in distinct:
            in_avals = [v.aval for v in op.eqn.invars]
            out_avals = [v.aval for v in op.eqn.outvars]
            strats = rules.strategies(op.primitive, in_avals, out_avals, op.eqn.params, mesh_axes)
            _well_formed(strats, [a.shape for a in in_avals], [a.shape for a in out_avals], mesh_axes,
                         f"{op.primitive} {[tuple(a.shape) for a in in_avals]} on {mesh_axes}")
    # indivisible: a 3-way axis never splits the dims of 8 (only a dim of 6 may)
    s = rules.strategies("add", [jax.ShapeDtypeStruct((8, 6), jnp.float32)] * 2,
                         [jax.ShapeDtypeStruct((8, 6), jnp.float32)], {}, {"a": 3})
    assert {str(x.outputs[0]) for x in s} == {"P(None, None)", "P(None, a)", "P(None, None)+partial(a)"}
    # a size-1 mesh axis is never used; size-1 (broadcast) dims never split
    s = rules.strategies("mul", [jax.ShapeDtypeStruct((1, 4), jnp.float32),
                                 jax.ShapeDtypeStruct((4, 4), jnp.float32)],
                         [jax.ShapeDtypeStruct((4, 4), jnp.float32)], {}, {"one": 1, "a": 2})
    assert all(x.inputs[0].dims[0] == () for x in s)
    assert all("one" not in x.split_axes for x in s)
    # a Mesh or a MeshSpec may stand for the axis sizes
    mesh = _mesh((2, 2), ("x", "y"))
    args = ("exp", [jax.ShapeDtypeStruct((4, 4), jnp.float32)], [jax.ShapeDtypeStruct((4, 4), jnp.float32)],
            {"accuracy": None})
    assert rules.strategies(*args, mesh) == rules.strategies(*args, {"x": 2, "y": 2})
    spec = MeshSpec((2, 2), ("x", "y"), (0, 1, 2, 3))
    assert rules.strategies(*args, spec.axes) == rules.strategies(*args, spec)


def test_dot_general_strategies_are_the_expected_ones():
    lhs, rhs = jax.ShapeDtypeStruct((8, 16), jnp.float32), jax.ShapeDtypeStruct((16, 4), jnp.float32)
    e = jax.make_jaxpr(jnp.dot)(lhs, rhs).jaxpr.eqns[0]
    s = rules.strategies("dot_general", [lhs, rhs], [e.outvars[0].aval], e.params, {"x": 2, "y": 4})
    by_name = {x.name: x for x in s}
    assert s[0].name == "R"
    assert str(by_name["k0@x"].outputs[0]) == "P(None, None)+partial(x)"
    assert str(by_name["m0@x n0@y"].outputs[0]) == "P(x, y)"
    assert str(by_name["m0@x.y"].inputs[0]) == "P((x,y), None)"
    assert 9 <= len(s) <= 36


def test_for_graph_is_fast_on_gpt2_small():
    ex = models.get("gpt2", "small")
    graph = tag_jax.trace(ex.step, ex.state, ex.batch)
    rules.registry._CACHE.clear()
    start = time.perf_counter()
    per_op = rules.for_graph(graph, {"data": 2, "model": 4})
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"for_graph took {elapsed:.1f}s for {len(graph.ops)} ops"
    assert len(per_op) == len(graph.ops)
    assert rules.unknown_primitives(graph) == ()
    dots = [s for op, s in zip(graph.ops, per_op) if op.primitive == "dot_general"]
    assert min(len(s) for s in dots) > 4 and max(len(s) for s in dots) <= 40


def test_a_broken_rule_is_caught():
    mesh = _mesh((4,), ("x",))
    lhs, rhs = jax.ShapeDtypeStruct((8, 16), jnp.float32), jax.ShapeDtypeStruct((16, 4), jnp.float32)
    e = jax.make_jaxpr(jnp.dot)(lhs, rhs).jaxpr.eqns[0]
    out = [e.outvars[0].aval]
    R2, K = TensorSharding(((), ())), TensorSharding(((), ("x",)))
    # contracting dim split, output claimed complete (it is a partial sum)
    wrong = OpStrategy("k split, no partial", (K, TensorSharding((("x",), ()))), (R2,))
    with pytest.raises(rules.RuleError, match=r"`dot_general` strategy 'k split, no partial'"):
        rules.validate(e.primitive, [lhs, rhs], out, e.params, mesh, wrong)
    # its corrected form passes
    right = OpStrategy("k split", (K, TensorSharding((("x",), ()))), (TensorSharding(((), ()), ("x",)),))
    rules.validate("dot_general", [lhs, rhs], out, e.params, mesh, right)
    # a partial sum pushed through a non-linear op
    x = jax.ShapeDtypeStruct((8, 4), jnp.float32)
    e = jax.make_jaxpr(jnp.exp)(x).jaxpr.eqns[0]
    p = TensorSharding(((), ()), ("x",))
    with pytest.raises(rules.RuleError, match=r"`exp` strategy 'exp of partial'.*differs"):
        rules.validate(e.primitive, [x], [x], e.params, mesh, OpStrategy("exp of partial", (p,), (p,)))
    # a reduced dim of reduce_max split: the rule must not offer it, and the validator rejects it
    e = jax.make_jaxpr(lambda a: jnp.max(a, axis=1))(x).jaxpr.eqns[0]
    offered = rules.strategies("reduce_max", [x], [e.outvars[0].aval], e.params, {"x": 4})
    assert all(not s.inputs[0].dims[1] for s in offered)
    bad = OpStrategy("max over split dim", (TensorSharding(((), ("x",))),), (TensorSharding(((),), ("x",)),))
    with pytest.raises(rules.RuleError, match="reduce_max"):
        rules.validate(e.primitive, [x], [e.outvars[0].aval], e.params, mesh, bad)
    # malformed: splits a dim of 8 three ways is rejected before running
    with pytest.raises(rules.RuleError, match="not divisible"):
        rules.validate("exp", [x], [x], {"accuracy": None}, _mesh((3,), ("x",)),
                       OpStrategy("bad", (TensorSharding((("x",), ())),), (TensorSharding((("x",), ())),)))


def test_no_partial_sums_of_booleans_or_through_integer_division():
    b = jax.ShapeDtypeStruct((4,), jnp.bool_)
    e = jax.make_jaxpr(lambda v: jnp.broadcast_to(v, (2, 4)))(b).jaxpr.eqns[0]
    s = rules.strategies("broadcast_in_dim", [b], [e.outvars[0].aval], e.params, {"x": 2})
    assert not any(t.partial for x in s for t in x.inputs + x.outputs)
    i = jax.ShapeDtypeStruct((4,), jnp.int32)
    s = rules.strategies("div", [i, i], [i], {}, {"x": 2})
    assert not any(t.partial for x in s for t in x.inputs + x.outputs)
    f = jax.ShapeDtypeStruct((4,), jnp.float32)
    s = rules.strategies("div", [f, f], [f], {}, {"x": 2})
    assert [t.partial for t in s[-1].inputs] == [("x",), ()]
    mesh = _mesh((2, 2), ("x", "y"))
    _check([_eqn_case(lambda v: jnp.broadcast_to(v, (2, 4)), b, mesh=mesh),
            _eqn_case(lax.div, i, i, mesh=mesh)], mesh)
