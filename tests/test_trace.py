"""The op graph describes what the function computes: same results, right FLOPs, roles and paths."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from tag_jax.hlo import Role, TraceError, as_function, evaluate, trace


@jax.custom_vjp
def _sin_vjp(x):
    return jnp.sin(x)


_sin_vjp.defvjp(lambda x: (jnp.sin(x), x), lambda r, g: (g * jnp.cos(r),))


@jax.custom_jvp
def _softplus(x):
    return jnp.logaddexp(x, 0.0)


_softplus.defjvp(lambda p, t: (_softplus(p[0]), t[0] * jax.nn.sigmoid(p[0])))


def _nested(w, x):
    """Every nesting construct the tracer must see through or keep."""
    y = jax.checkpoint(lambda z: jnp.tanh(z @ w))(x)
    y = jax.jit(lambda z: z * 2.0)(y)
    y = lax.cond(y.sum() > 0, lambda z: z + 1.0, lambda z: z - 1.0, y)
    y = lax.fori_loop(0, 3, lambda i, z: z @ w * 0.5, y)
    y, _ = lax.scan(lambda c, xs: (jnp.tanh(c + xs), c.sum()), y, jnp.ones((4,) + y.shape))
    # A data-dependent while loop cannot be reverse-differentiated: keep it off the gradient path.
    _, z = lax.while_loop(lambda c: c[0] < 2.5 * c[1].mean(), lambda c: (c[0] + 1.0, c[1] * 0.5),
                          (0.0, lax.stop_gradient(y)))
    y = y + z
    return _sin_vjp(_softplus(y)).sum()


def test_nested_constructs_evaluate_to_the_same_values():
    w = jax.random.normal(jax.random.key(0), (8, 8)) / 4
    x = jax.random.normal(jax.random.key(1), (5, 8))
    for fn in (_nested, jax.grad(_nested), jax.value_and_grad(_nested, argnums=(0, 1))):
        graph = trace(fn, w, x)
        got = as_function(graph)(w, x)
        want = fn(w, x)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        # Call-like wrappers are inlined; control flow stays as one op each.
        prims = {op.primitive for op in graph.ops}
        assert not prims & {"jit", "pjit", "custom_jvp_call", "custom_vjp_call", "remat2", "checkpoint"}
        assert {"cond", "scan", "while"} <= prims


def test_matmul_flops_and_bytes_are_exact():
    graph = trace(lambda a, b: a @ b, jax.ShapeDtypeStruct((64, 32), jnp.float32),
                  jax.ShapeDtypeStruct((32, 16), jnp.float32))
    (op,) = graph.ops
    assert op.primitive == "dot_general"
    assert op.flops == 2 * 64 * 32 * 16 == graph.flops
    assert op.bytes == 4 * (64 * 32 + 32 * 16 + 64 * 16)


def test_scan_and_counted_while_multiply_costs_by_trip_count():
    w = jax.ShapeDtypeStruct((16, 16), jnp.float32)
    x = jax.ShapeDtypeStruct((4, 16), jnp.float32)
    one = 2 * 4 * 16 * 16

    def scanned(w, x):
        return lax.scan(lambda c, _: (c @ w, None), x, None, length=6)[0]

    def counted(w, x):
        return lax.while_loop(lambda c: c[0] < 7, lambda c: (c[0] + 1, c[1] @ w), (0, x))[1]

    def unknown(w, x):
        return lax.while_loop(lambda c: c[1].sum() < 7.0, lambda c: (c[0] + 1, c[1] @ w), (0, x))[1]

    gs = trace(scanned, w, x)
    assert gs.ops[-1].primitive == "scan" and gs.flops == 6 * one
    gw = trace(counted, w, x)
    loop = [op for op in gw.ops if op.primitive == "while"][0]
    assert loop.trips_known and loop.trips == 7
    assert one * 7 <= gw.flops <= one * 7 * 1.1  # plus the counter arithmetic
    gu = trace(unknown, w, x)
    loop = [op for op in gu.ops if op.primitive == "while"][0]
    assert not loop.trips_known and loop.trips == 1
    assert "unknown trip count" in gu.summary()


class _Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return nn.Dense(32)(jax.nn.gelu(nn.Dense(64)(h))), None


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, h):
        stack = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=5)
        return stack(name="layers")(h, None)[0]


class _Unrolled(nn.Module):
    @nn.compact
    def __call__(self, h):
        for i in range(5):
            h = _Block(name=f"layer_{i}")(h, None)[0]
        return h


def test_flax_scan_layers_cost_the_same_as_unrolled_layers():
    x = jnp.ones((8, 32))
    costs = []
    for module in (_Scanned(), _Unrolled()):
        params = jax.eval_shape(module.init, jax.random.key(0), x)

        def loss(p, x):
            return (module.apply(p, x) ** 2).mean()

        graph = trace(jax.grad(loss), params, jax.ShapeDtypeStruct(x.shape, x.dtype))
        dots = sum(op.flops for op in graph.ops if op.primitive == "dot_general") + sum(
            o.flops for op in graph.ops for g in op.subgraphs for o in g.ops if o.primitive == "dot_general")
        costs.append(dots)
    # Forward + two backward matmuls per Dense, 2 Dense per layer, 5 layers; unrolled code skips the
    # input gradient of the very first matmul (x needs none), the scanned body cannot.
    per_matmul = 2 * 8 * 32 * 64
    assert costs[0] == 5 * 2 * 3 * per_matmul
    assert costs[1] == 5 * 2 * 3 * per_matmul - per_matmul


def _sgd_step(params, opt_state, batch):
    def loss(p):
        return jnp.mean((jnp.tanh(batch["x"] @ p["dense"]["kernel"]) - batch["y"]) ** 2)

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = _OPT.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


_OPT = optax.adam(1e-3)


def test_roles_and_paths_of_a_training_step():
    params = {"dense": {"kernel": jax.ShapeDtypeStruct((16, 4), jnp.float32)}}
    opt_state = jax.eval_shape(_OPT.init, params)
    batch = {"x": jax.ShapeDtypeStruct((8, 16), jnp.float32), "y": jax.ShapeDtypeStruct((8, 4), jnp.float32)}
    g = trace(_sgd_step, params, opt_state, batch)
    assert g.by_path("params/dense/kernel").role == Role.PARAMETER
    assert g.by_path("opt_state/0/mu/dense/kernel").role == Role.OPTIMIZER_STATE
    assert g.by_path("batch/x").role == Role.BATCH
    assert g.by_path("out/0/dense/kernel").role == Role.OUTPUT
    # The weight gradient is the backward dot_general (JAX emits it transposed, then a transpose).
    dots = [op for op in g.ops if op.primitive == "dot_general"]
    grad_dots = [op for op in dots if g.tensors[op.outputs[0]].role == Role.GRADIENT]
    assert [g.tensors[op.outputs[0]].shape for op in grad_dots] == [(4, 16)]
    assert g.tensors[dots[0].outputs[0]].role == Role.ACTIVATION
    assert any(t.role == Role.UPDATE for t in g.tensors)
    # Every consumer link points back to a producer in topological order.
    for op in g.ops:
        for tid in op.inputs:
            producer = g.tensors[tid].producer
            assert producer is None or producer < op.id
            assert op.id in g.tensors[tid].consumers


def test_explicit_roles_override_the_guess():
    g = trace(lambda w, x: x @ w, jnp.ones((4, 4)), jnp.ones((2, 4)), roles={"w": "parameter"})
    assert g.tensors[g.inputs[0]].role == Role.PARAMETER
    assert g.tensors[g.inputs[1]].role == Role.BATCH
    with pytest.raises(TraceError, match=r"roles=\{'w': 'weights'\}: 'weights' is not a role; an "
                                         r"input is one of 'parameter', 'optimizer_state'"):
        trace(lambda w, x: x @ w, jnp.ones((4, 4)), jnp.ones((2, 4)), roles={"w": "weights"})


def test_abstract_inputs_are_never_allocated():
    # 64 GiB of float32 per operand: tracing must only look at shapes.
    big = jax.ShapeDtypeStruct((131072, 131072), jnp.float32)
    g = trace(lambda a, b: jnp.tanh(a @ b).sum(), big, big)
    assert g.flops >= 2 * 131072 ** 3


def test_functions_that_are_not_training_steps():
    w = jnp.ones((8, 8))
    # inference
    g = trace(lambda params, x: jax.nn.relu(x @ params["w"]), {"w": w}, jnp.ones((2, 8)))
    assert g.by_path("params/w").role == Role.PARAMETER
    # a static argument and a keyword argument
    def layer(x, n, *, scale):
        for _ in range(n):
            x = x * scale
        return x

    g = trace(layer, jnp.ones(3), 4, static_argnums=1, scale=jnp.float32(2.0))
    assert [op.primitive for op in g.ops] == ["mul"] * 4
    assert [g.tensors[t].path for t in g.inputs] == ["x", "scale"]
    np.testing.assert_allclose(evaluate(g, [jnp.ones(3), jnp.float32(2.0)])[0], 16.0)


def test_unsupported_primitive_names_itself_and_the_source_line():
    def f(x):
        y = jax.pure_callback(lambda v: np.asarray(v) * 2, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
        return y + 1

    with pytest.raises(TraceError, match=r"`pure_callback` at .*test_trace.py:\d+"):
        trace(f, jnp.ones(3))


def test_tracing_errors_name_the_function():
    def bad(x):
        return x @ jnp.ones((5, 5))

    with pytest.raises(TraceError, match="tracing bad failed.*dot_general"):
        trace(bad, jnp.ones((3, 4)))


def test_graph_is_immutable():
    g = trace(lambda x: x + 1, jnp.ones(2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.ops[0].flops = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.name = "other"


def test_convolution_flops_match_xla_including_strided_gradients():
    from tag_jax.hlo import compiled_flops

    def loss(w, x):
        y = lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y ** 2)

    w = jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32)
    x = jax.ShapeDtypeStruct((2, 9, 9, 4), jnp.float32)
    fn = jax.grad(loss, argnums=(0, 1))
    graph = trace(fn, w, x)
    convs = [op for op in graph.ops if op.primitive == "conv_general_dilated"]
    assert len(convs) == 3  # forward, input gradient (lhs-dilated), weight gradient
    xla = compiled_flops(jax.jit(fn).lower(w, x).compile())
    conv_flops = sum(op.flops for op in convs)
    assert abs(graph.flops - xla) / xla < 0.05
    assert conv_flops / graph.flops > 0.8


def test_roles_from_dataflow_when_no_name_says():
    """`carry = (params, opt_state, ema)` and arrays `x`, `y`: nothing in the paths names a role,
    so the step's dataflow decides: updated from the backward pass and read forward -> parameter;
    updated from it but not read forward -> optimizer state; carried otherwise -> state; the rest
    batch."""
    tx = optax.adam(1e-3)
    w = {"w1": jnp.ones((16, 32)), "w2": jnp.ones((32, 4))}

    def step(carry, x, y):
        p, o, ema = carry
        loss, g = jax.value_and_grad(lambda p: ((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2).mean())(p)
        u, o = tx.update(g, o, p)
        return (optax.apply_updates(p, u), o, 0.9 * ema + 0.1 * x.mean(0)), loss

    args = ((w, tx.init(w), jnp.zeros(16)), jnp.ones((8, 16)), jnp.ones((8, 4)))
    g = trace(step, *args)
    roles = {g.tensors[t].path: g.tensors[t].role for t in g.inputs}
    assert roles["carry/0/w1"] == roles["carry/0/w2"] == Role.PARAMETER
    assert roles["carry/1/0/mu/w1"] == roles["carry/1/0/nu/w2"] == Role.OPTIMIZER_STATE
    assert roles["carry/1/0/count"] == roles["carry/2"] == Role.STATE
    assert roles["x"] == roles["y"] == Role.BATCH
    # a name still wins over the dataflow
    g = trace(step, *args, roles={"carry/0": "state"})
    assert {g.tensors[t].path: g.tensors[t].role for t in g.inputs}["carry/0/w1"] == Role.STATE


def test_a_whole_argument_is_a_parameter_when_gradients_update_it():
    """`def step(w, x)`: `w` comes back made from its gradient, so it is a parameter; an
    autoencoder's `imgs` comes back in its own shape, but from the forward pass only: still batch."""
    def step(w, inp, target):
        loss, g = jax.value_and_grad(lambda w: ((inp @ w - target) ** 2).mean())(w)
        return w - 0.1 * g, loss

    def autoencoder(w, imgs):
        loss, g = jax.value_and_grad(lambda w: ((imgs @ w @ w.T - imgs) ** 2).mean())(w)
        return w - g, imgs @ w @ w.T

    g = trace(step, jnp.ones((16, 4)), jnp.ones((8, 16)), jnp.ones((8, 4)))
    assert [g.tensors[t].role for t in g.inputs] == [Role.PARAMETER, Role.BATCH, Role.BATCH]
    g = trace(autoencoder, jnp.ones((16, 4)), jnp.ones((8, 16)))
    assert [g.tensors[t].role for t in g.inputs] == [Role.PARAMETER, Role.BATCH]
