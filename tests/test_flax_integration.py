"""auto_shard with Flax's own training containers: TrainState (linen), nnx split/merge, donation."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import tag_jax
from tag_jax.plan import Plan, PlanMismatchError
from tag_jax.search import planner as planner_module

TOPO = tag_jax.Topology.preset("2x4-v100-25gbe")


def _mesh():
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _batch():
    kx, ky = jax.random.split(jax.random.key(1))
    return {"x": jax.random.normal(kx, (16, 32)), "y": jax.random.randint(ky, (16,), 0, 8)}


def _assert_trees_close(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="fc2")(nn.relu(nn.Dense(64, name="fc1")(x)))


def _train_state():
    model = MLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, 32)))["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1))


def train_step(state, batch):
    def loss_fn(params):
        logits = state.apply_fn({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


def test_train_state_step_equals_the_unsharded_step():
    state, batch = _train_state(), _batch()
    step = tag_jax.auto_shard(train_step, _mesh(), topology=TOPO, time_budget_s=0.5)
    got = step(state, batch)
    want = jax.jit(train_step)(state, batch)
    _assert_trees_close(got, want)
    new_state, _ = got
    assert isinstance(new_state, train_state.TrainState) and int(new_state.step) == 1
    assert new_state.apply_fn is state.apply_fn and new_state.tx is state.tx  # static fields kept
    # the parameters are recognised as parameters by their `params` field
    roles = {a.path: a.role for a in step.plan(state, batch).arguments}
    assert roles["state/params/fc1/kernel"] == "parameter"
    # a second step reuses the plan and the program
    step(*got[:1], batch)
    assert len(step._plans) == 1


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(32, 64, rngs=rngs)
        self.fc2 = nnx.Linear(64, 8, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


def nnx_step(graphdef, params, batch):
    """A pure step over nnx state: the graphdef has no arrays, so it travels in the pytree
    structure (static), and the state argument is named `params` so its role is parameter."""
    model = nnx.merge(graphdef, params)

    def loss_fn(model):
        logits = model(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    new = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, nnx.state(model, nnx.Param), grads)
    return new, loss


def test_nnx_split_plan_merge_equals_the_unsharded_step():
    graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
    batch = _batch()
    step = tag_jax.auto_shard(nnx_step, _mesh(), topology=TOPO, time_budget_s=0.5)
    plan = step.plan(graphdef, params, batch)
    assert {a.path: a.role for a in plan.arguments}["params/fc1/kernel/value"] == "parameter"
    got_params, got_loss = step(graphdef, params, batch)
    want_params, want_loss = jax.jit(nnx_step, static_argnums=0)(graphdef, params, batch)
    _assert_trees_close((got_params, got_loss), (want_params, want_loss))
    model = nnx.merge(graphdef, got_params)  # back to a module, values intact
    np.testing.assert_allclose(np.asarray(model.fc1.kernel[...]),
                               np.asarray(want_params["fc1"]["kernel"][...]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(model(batch["x"])),
                               np.asarray(nnx.merge(graphdef, want_params)(batch["x"])),
                               rtol=1e-5, atol=1e-6)


def test_donated_state_is_deleted_and_the_result_is_right():
    state, batch = _train_state(), _batch()
    want = jax.jit(train_step)(state, batch)
    step = tag_jax.auto_shard(train_step, _mesh(), topology=TOPO, time_budget_s=0.5,
                              donate_argnums=(0,))
    plan = step.plan(state, batch)
    state, batch = plan.shard_args(state, batch)  # on the plan's layout: donation reuses these buffers
    leaves = jax.tree_util.tree_leaves(state)
    got = step(state, batch)
    _assert_trees_close(got, want)
    assert all(x.is_deleted() for x in leaves)
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(batch))
    with pytest.raises(RuntimeError, match="deleted"):
        np.asarray(leaves[0])


class ScannedBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(32)(nn.gelu(nn.Dense(64)(nn.LayerNorm()(x))))
        return x + h, None


class ScannedNet(nn.Module):
    """Layers under `nn.scan` of `nn.remat` (one traced layer, recomputed in the backward), and
    dropout drawing from a typed PRNG key (`jax.random.key`), as Flax training loops are written."""

    @nn.compact
    def __call__(self, x, rng):
        x = nn.Dense(32)(x)
        layers = nn.scan(nn.remat(ScannedBlock), variable_axes={"params": 0},
                         split_rngs={"params": True}, length=3)
        x, _ = layers()(x, None)
        x = nn.Dropout(0.25, deterministic=False)(x, rng=rng)
        return nn.Dense(8)(x)


def scanned_step(state, batch):
    rng, dropout = jax.random.split(state["rng"])
    tx = optax.adamw(1e-2)

    def loss_fn(params):
        logits = ScannedNet().apply({"params": params}, batch["x"], dropout)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt, "rng": rng}, loss


def test_scan_remat_dropout_with_a_typed_key_equals_the_unsharded_step():
    batch = _batch()
    params = ScannedNet().init(jax.random.key(0), batch["x"], jax.random.key(1))["params"]
    state = {"params": params, "opt": optax.adamw(1e-2).init(params), "rng": jax.random.key(2)}
    step = tag_jax.auto_shard(scanned_step, _mesh(), topology=TOPO, time_budget_s=1.0)
    plan = step.plan(state, batch)
    key_arg = {a.path: a for a in plan.arguments}["state/rng"]
    assert key_arg.shape == () and key_arg.itemsize == 8  # a threefry key: two uint32 words
    [line] = [l for l in plan.summary().splitlines() if "state/rng" in l]
    assert line.split()[:2] == ["state/rng", "key[]"]
    (got, got_loss), (want, want_loss) = step(state, batch), jax.jit(scanned_step)(state, batch)
    np.testing.assert_array_equal(jax.random.key_data(got.pop("rng")),
                                  jax.random.key_data(want.pop("rng")))
    _assert_trees_close((got, got_loss), (want, want_loss))


class DropoutNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(32, 64, rngs=rngs)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.fc2 = nnx.Linear(64, 8, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.drop(nnx.relu(self.fc1(x))))


def nnx_dropout_step(graphdef, state, batch):
    """The whole nnx state travels, its Rngs stream too (a scalar count and a typed key, which
    the step advances)."""
    model = nnx.merge(graphdef, state)

    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads))
    return nnx.state(model), loss


def test_nnx_state_with_an_rng_stream_equals_the_unsharded_step():
    graphdef, state = nnx.split(DropoutNet(nnx.Rngs(0, dropout=1)))
    batch = _batch()
    step = tag_jax.auto_shard(nnx_dropout_step, _mesh(), topology=TOPO, time_budget_s=1.0,
                              static_argnums=0)
    got = step(graphdef, state, batch)
    want = jax.jit(nnx_dropout_step, static_argnums=0)(graphdef, state, batch)

    def plain(tree):  # key data for the typed keys, so that values compare
        return jax.tree_util.tree_map(
            lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended)
            else x, tree)

    _assert_trees_close(plain(got), plain(want))
    roles = {a.path: a.role for a in step.plan(graphdef, state, batch).arguments}
    # roles from the NNX variable types, though the argument is not named `params`
    assert roles["state/fc1/kernel/value"] == "parameter"
    assert roles["state/drop/rngs/count/value"] == roles["state/drop/rngs/key/value"] == "state"


def test_nnx_optimizer_state_is_optimizer_state_by_its_variable_type():
    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        grads = nnx.grad(lambda m: ((m(batch["x"]) - 1.0) ** 2).mean())(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer))

    graph = tag_jax.trace(step, state, _batch())
    roles = {graph.tensors[t].path: graph.tensors[t].role.value for t in graph.inputs}
    assert roles["state/0/fc1/kernel/value"] == "parameter"
    assert roles["state/1/opt_state/0/mu/fc1/kernel/value"] == "optimizer_state"
    assert roles["batch/x"] == "batch"


def nnx_jit_style_step(model, optimizer, batch):
    """The step as `nnx.jit` takes it: objects in, mutated in place, the loss out."""
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def test_nnx_objects_are_updated_in_place_as_nnx_jit_does():
    def make():
        model = DropoutNet(nnx.Rngs(0, dropout=1))
        return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    (m1, o1), (m2, o2) = make(), make()
    batch = _batch()
    step = tag_jax.auto_shard(nnx_jit_style_step, _mesh(), topology=TOPO, time_budget_s=1.0)
    reference = nnx.jit(nnx_jit_style_step)
    for _ in range(2):  # the second step reads what the first wrote back (weights, Adam, RNG)
        np.testing.assert_allclose(float(step(m1, o1, batch)), float(reference(m2, o2, batch)),
                                   rtol=1e-5, atol=1e-6)
    _assert_trees_close(nnx.state(m1, nnx.Param), nnx.state(m2, nnx.Param))
    assert int(o1.step[...]) == 2
    plan = step.plan(m1, o1, batch)
    roles = {a.path: a.role for a in plan.arguments}
    assert roles["state/0/fc1/kernel/value"] == "parameter"
    assert roles["state/1/opt_state/0/mu/fc1/kernel/value"] == "optimizer_state"
    assert repr(step) == "ShardedFunction(nnx_jit_style_step, 1 plan(s))"


def test_a_saved_plan_of_nnx_objects_runs_again_without_planning(tmp_path, monkeypatch):
    def make():
        model = DropoutNet(nnx.Rngs(0, dropout=1))
        return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    (m1, o1), (m2, o2) = make(), make()
    batch = _batch()
    planned = tag_jax.auto_shard(nnx_jit_style_step, _mesh(), topology=TOPO, time_budget_s=1.0)
    plan = planned.plan(m1, o1, batch)
    path = tmp_path / "nnx_plan.json"
    plan.save(str(path))

    def never(*args, **kwargs):
        raise AssertionError("a saved plan must not be searched again")

    monkeypatch.setattr(planner_module, "search", never)
    step = tag_jax.auto_shard(nnx_jit_style_step, _mesh(), topology=TOPO, plan=str(path))
    reference = nnx.jit(nnx_jit_style_step)
    for _ in range(2):
        np.testing.assert_allclose(float(step(m1, o1, batch)), float(reference(m2, o2, batch)),
                                   rtol=1e-5, atol=1e-6)
    _assert_trees_close(nnx.state(m1, nnx.Param), nnx.state(m2, nnx.Param))
    again = step.plan(m1, o1, batch)
    assert again.strategy == plan.strategy and again.fingerprint == plan.fingerprint

    # Plan.load traces the objects' state the same way: the loaded program takes (state, batch)
    loaded = Plan.load(str(path), nnx_jit_style_step, m1, o1, batch, topology=TOPO)
    assert loaded.strategy == plan.strategy
    assert [a.path for a in loaded.arguments] == [a.path for a in plan.arguments]

    # another batch size traces another program: refused, naming what to do
    small = {k: v[:8] for k, v in batch.items()}
    with pytest.raises(PlanMismatchError, match=r"argument batch/x was float32\[16, 32\] when planned, "
                                                r"now float32\[8, 32\].*plan this one anew"):
        step(m1, o1, small)
    with pytest.raises(PlanMismatchError, match="planned for another topology"):
        tag_jax.auto_shard(nnx_jit_style_step, _mesh(), plan=str(path),
                           topology=tag_jax.Topology.preset("1x8-a100-nvlink"))(m1, o1, batch)
    with pytest.raises(ValueError, match=r"runs on devices \[0, 1, 2, 3, 4, 5, 6, 7\].*has \[0, 1, 2, 3\]"):
        tag_jax.auto_shard(nnx_jit_style_step, jax.devices()[:4], plan=str(path))
