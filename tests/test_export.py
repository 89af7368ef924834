"""tag_jax.export: PartitionSpec pytrees equal the plan's shardings; logical axis rules reproduce them."""
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

import tag_jax
from tag_jax import export

TOPO = tag_jax.Topology.preset("2x4-v100-25gbe")
EMBED, MLP_DIM, CLASSES = 16, 64, 8


def _mesh():
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _padded(spec, ndim):
    return tuple(spec) + (None,) * (ndim - len(spec))


class Block(nn.Module):
    """A model with MaxText-style logical names on every parameter; Megatron knows fc1/fc2."""

    hidden: int = MLP_DIM

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        h = nn.Dense(self.hidden, name="fc1", kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
        x = nn.Dense(EMBED, name="fc2", kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(
            nn.relu(h))
        return nn.Dense(CLASSES, name="head", kernel_init=nn.with_logical_partitioning(init, ("embed", "vocab")),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)))(x)


def _example(hidden=MLP_DIM):
    model, tx = Block(hidden), optax.sgd(0.1)
    x = jnp.zeros((16, EMBED))
    boxed = model.init(jax.random.key(0), x)["params"]
    params = nn.meta.unbox(boxed)
    state = {"params": params, "opt_state": tx.init(params)}
    batch = {"x": x, "labels": jnp.zeros((16,), jnp.int32)}

    def step(state, batch):
        def loss(p):
            logits = model.apply({"params": p}, batch["x"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

        grads = jax.grad(loss)(state["params"])
        updates, opt = tx.update(grads, state["opt_state"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt}

    return step, state, batch, nn.get_partition_spec(boxed)


@pytest.fixture(scope="module")
def named():
    return _example()


@pytest.fixture(scope="module")
def megatron_plan(named):
    step, state, batch, _ = named
    return tag_jax.baselines.megatron(step, _mesh(), topology=TOPO).plan(state, batch)


@pytest.fixture(scope="module")
def auto_plan(named):
    step, state, batch, _ = named
    return tag_jax.auto_shard(step, _mesh(), topology=TOPO, time_budget_s=0.5).plan(state, batch)


def test_partition_specs_equal_the_plans_in_shardings(auto_plan):
    specs = export.partition_specs(auto_plan)
    want = jax.tree_util.tree_map(lambda s: s.spec, auto_plan.in_shardings)
    assert jax.tree_util.tree_structure(specs) == jax.tree_util.tree_structure(want)
    assert jax.tree_util.tree_leaves(specs) == jax.tree_util.tree_leaves(want)
    assert all(isinstance(s, P) for s in jax.tree_util.tree_leaves(specs))


def test_params_subtree_lines_up_with_the_params(named, megatron_plan):
    _, state, _, _ = named
    specs = export.partition_specs(megatron_plan, "params")
    assert jax.tree_util.tree_structure(specs) == jax.tree_util.tree_structure(state["params"])
    by_path = export.specs_by_path(megatron_plan)
    flat, _ = jax.tree_util.tree_flatten_with_path(specs)
    for kp, spec in flat:
        assert spec == by_path["state/params/" + "/".join(k.key for k in kp)]
    # Megatron splits the hidden (mlp) dimension of the first layer over the model axis
    assert specs["fc1"]["kernel"] == P(None, "model")
    assert specs["fc2"]["kernel"] == P("model")
    assert specs["head"]["kernel"] == P()


def test_rules_from_model_names_reproduce_the_specs(named, megatron_plan, auto_plan):
    *_, names = named
    for plan in (megatron_plan, auto_plan):
        rules = export.logical_axis_rules(plan, names)
        specs = export.partition_specs(plan, "params")
        flat_names = jax.tree_util.tree_leaves(names, is_leaf=lambda x: isinstance(x, P))
        flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
        for logical, spec in zip(flat_names, flat_specs):
            got = nn.logical_to_mesh_axes(tuple(logical), rules)
            assert _padded(got, len(logical)) == _padded(spec, len(logical))
    assert dict(export.logical_axis_rules(megatron_plan, names)) == {
        "embed": None, "mlp": "model", "vocab": None}


def test_derived_size_names_reproduce_the_specs(megatron_plan):
    rules = export.logical_axis_rules(megatron_plan)  # naming="size": d16, d64, d8
    assert dict(rules) == {"d16": None, "d64": "model", "d8": None}
    table = export.logical_names(megatron_plan)
    assert table["fc1/kernel"] == ("d16", "d64") and table["fc2/kernel"] == ("d64", "d16")
    for key, a in export.parameter_keys(megatron_plan).items():
        got = nn.logical_to_mesh_axes(table[key], rules)
        assert _padded(got, len(a.shape)) == _padded(a.sharding.to_partition_spec(), len(a.shape))


def test_conflicting_dimensions_are_named_in_the_error():
    # square MLP: Megatron splits fc1's columns and fc2's rows, both of size 16
    step, state, batch, names = _example(hidden=EMBED)
    plan = tag_jax.baselines.megatron(step, _mesh(), topology=TOPO).plan(state, batch)
    with pytest.raises(export.LogicalAxisConflict,
                       match=r"logical axis 'd16' is split over (None|'model') in 'state/params/fc\d/\w+' "
                             r"\(dim \d\) but over (None|'model') in 'state/params/fc\d/\w+'.*"
                             r"naming='path'"):
        export.logical_axis_rules(plan)
    rules = dict(export.logical_axis_rules(plan, naming="path"))  # one name per dimension
    assert rules["fc1/kernel:1"] == "model" and rules["fc2/kernel:0"] == "model"
    assert rules["fc1/kernel:0"] is None
    assert dict(export.logical_axis_rules(plan, names))["mlp"] == "model"  # the model's names work


def test_missing_names_are_reported(megatron_plan):
    with pytest.raises(KeyError, match="no logical names for parameter 'state/params/fc1/bias'"):
        export.logical_axis_rules(megatron_plan, {"fc1": {"kernel": ("embed", "mlp")}})
    with pytest.raises(ValueError, match="dimension 0 of parameter 'state/params/fc1/bias'"):
        export.logical_axis_rules(megatron_plan, lambda key, shape: (None,) * len(shape))


def test_loaded_plan_exports_by_path(megatron_plan, tmp_path):
    megatron_plan.save(str(tmp_path / "plan.json"))
    loaded = tag_jax.Plan.load(str(tmp_path / "plan.json"))
    assert export.partition_specs(loaded) == export.specs_by_path(megatron_plan)
    nested = export.partition_specs(loaded, "params")
    assert nested["fc1"]["kernel"] == P(None, "model")
    assert export.logical_axis_rules(loaded) == export.logical_axis_rules(megatron_plan)
