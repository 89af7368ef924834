"""Donation through ShardedFunction works as jax.jit's: donated caller arrays are consumed."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import tag_jax
from tag_jax.plan import _argnums

TOPO = tag_jax.Topology.preset("2x4-v100-25gbe")


def _mesh():
    return jax.make_mesh((8,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))


def step(params, batch):
    def loss_fn(p):
        h = jnp.tanh(batch["x"] @ p["w1"] + p["b1"])
        return jnp.mean((h @ p["w2"] - batch["y"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads), loss


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w1": jax.random.normal(k1, (16, 32)) * 0.1, "b1": jnp.zeros((32,)),
            "w2": jax.random.normal(k2, (32, 4)) * 0.1}


def _batch():
    kx, ky = jax.random.split(jax.random.key(1))
    return {"x": jax.random.normal(kx, (32, 16)), "y": jax.random.normal(ky, (32, 4))}


def _close(got, want):
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def want():
    return jax.jit(step)(_params(), _batch())


@pytest.fixture(scope="module")
def fn():
    return tag_jax.baselines.data_parallel(step, _mesh(), topology=TOPO, donate_argnums=(0,))


def _off_layout(plan, params):
    """Every parameter on one device: none is in the plan's (replicated over 8) layout."""
    for x, s in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(plan.in_shardings[0])):
        assert not x.sharding.is_equivalent_to(s, x.ndim)
    return params


def test_resharded_donated_arrays_are_deleted(fn, want):
    params, batch = _params(), _batch()
    plan = fn.plan(params, batch)
    leaves = jax.tree_util.tree_leaves(_off_layout(plan, params))
    got = fn(params, batch)
    _close(got, want)
    assert all(x.is_deleted() for x in leaves)
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(batch))  # not donated
    with pytest.raises(RuntimeError, match="deleted"):
        np.asarray(params["w1"])
    with pytest.raises(RuntimeError, match="deleted"):
        fn(params, batch)  # as with jax.jit: a donated array cannot be passed again


def test_laid_out_donated_arrays_are_deleted(fn, want):
    params, batch = _params(), _batch()
    params, batch = fn.plan(params, batch).shard_args(params, batch)
    leaves = jax.tree_util.tree_leaves(params)
    got = fn(params, batch)
    _close(got, want)
    assert all(x.is_deleted() for x in leaves)
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(batch))


def test_mixed_layouts_and_numpy_leaves(fn, want):
    params, batch = _params(), _batch()
    plan = fn.plan(params, batch)
    laid = jax.device_put(params["w1"], plan.in_shardings[0]["w1"])  # in the plan's layout
    # an equivalent sharding on another Mesh object (Explicit axes): the same buffers, donated
    explicit = jax.make_mesh((8,), ("devices",))
    relabelled = jax.device_put(params["w2"], NamedSharding(explicit, P()))
    host = np.asarray(params["b1"])  # numpy: nothing to delete
    mixed = {"w1": laid, "b1": host, "w2": relabelled}
    got = fn(mixed, batch)
    _close(got, want)
    assert laid.is_deleted() and relabelled.is_deleted()
    np.testing.assert_array_equal(host, np.zeros(32, np.float32))
    assert not params["b1"].is_deleted()  # the jax array it was copied from was never passed


def test_an_array_also_passed_undonated_is_kept():
    def add(a, b):
        return a + 1.0, b * 2.0

    f = tag_jax.baselines.data_parallel(add, _mesh(), topology=TOPO, donate_argnums=0)
    x = jnp.arange(8.0)  # on one device: resharded for both arguments
    out_a, out_b = f(x, x)
    np.testing.assert_allclose(np.asarray(out_a), np.arange(8.0) + 1)
    np.testing.assert_allclose(np.asarray(out_b), np.arange(8.0) * 2)
    assert not x.is_deleted()  # jax.jit would refuse; here the non-donated use keeps it
    y = jnp.arange(8.0)
    f(y, jnp.zeros(8))
    assert y.is_deleted()


def test_auto_shard_loop_with_donation(want):
    f = tag_jax.auto_shard(step, _mesh(), topology=TOPO, time_budget_s=0.3, donate_argnums=(0,))
    params, batch = _params(), _batch()
    first = jax.tree_util.tree_leaves(params)
    params, loss = f(params, batch)
    _close((params, loss), want)
    assert all(x.is_deleted() for x in first)
    for _ in range(2):  # the results come back in the plan's layout and are donated in turn
        prev = jax.tree_util.tree_leaves(params)
        params, loss = f(params, batch)
        assert all(x.is_deleted() for x in prev)
    assert np.isfinite(float(loss))


def test_argnums():
    assert _argnums(0, 3) == {0}
    assert _argnums((0, -1), 3) == {0, 2}
    assert _argnums((), 2) == set()


def test_arguments_already_in_place_are_not_put_again(monkeypatch):
    """A training loop feeds each step's results back: leaves already on the plan's shardings go
    straight to the program (jax.device_put of a placed leaf costs ~30 us; gpt2-small has ~450)."""
    import tag_jax.plan as plan_module

    state = {"w": jax.random.normal(jax.random.key(0), (16, 4))}
    batch = {"x": jax.random.normal(jax.random.key(1), (32, 16))}

    def step(state, batch):  # the new state in the old one's layout (a carried result)
        return {"w": state["w"] - 0.1 * jax.grad(lambda w: (batch["x"] @ w).mean())(state["w"])}

    f = tag_jax.auto_shard(step, jax.devices(), time_budget_s=0.2, policy=None)
    s1 = f(state, batch)
    puts = []
    real_put = jax.device_put
    monkeypatch.setattr(plan_module.jax, "device_put", lambda x, s, **kw: puts.append(1) or real_put(x, s, **kw))
    s2 = f(s1, batch)
    assert len(puts) == 1  # the fresh batch only; the state came back in place
    np.testing.assert_allclose(np.asarray(s2["w"]), np.asarray(step(step(state, batch), batch)["w"]),
                               rtol=1e-5, atol=1e-6)


def test_reusing_a_donated_state_is_refused_naming_the_leaf(fn):
    # XLA:CPU kills the process (SIGSEGV) when a multi-device program gets a donated buffer
    params = jax.device_put(_params(), fn.plan(_params(), _batch()).in_shardings[0])
    fn(params, _batch())
    with pytest.raises(RuntimeError, match=r"argument 0\[.b1.\] of \w+ was donated to an earlier call"):
        fn(params, _batch())
