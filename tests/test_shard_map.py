"""Steps that partition part of themselves with shard_map: the region runs as written, on its own
mesh; the planner shards the code around it, and prices the region's own collectives."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import shard_map
from jax.sharding import PartitionSpec as P

import tag_jax
from tag_jax import rules
from tag_jax.hlo import TraceError, collective_bytes_by_kind, collectives

TOPO = tag_jax.Topology.preset("2x4-v100-25gbe")


def _mesh():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _compiled_kinds(sharded, *args):
    return {k: v for k, v in collective_bytes_by_kind(collectives(sharded.lower(*args).compile())).items() if v}


def _predicted_kinds(plan):
    return {k: v for k, v in plan.cost.comm_bytes_by_kind.items() if v}


def _megatron_step(mesh):
    def block(x, w1, w2):  # columns, then rows, one psum: tensor parallel by hand
        def body(x, w1, w2):
            return jax.lax.psum(jax.nn.gelu(x @ w1) @ w2, "model")
        return shard_map(body, mesh=mesh, in_specs=(P("data", None), P(None, "model"), P("model", None)),
                         out_specs=P("data", None))(x, w1, w2)

    def step(params, x, y):
        def loss(p):
            return jnp.mean((block(x, p["w1"], p["w2"]) @ p["head"] - y) ** 2)
        value, g = jax.value_and_grad(loss)(params)
        return jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, params, g), value

    k = jax.random.split(jax.random.key(0), 5)
    params = {"w1": jax.random.normal(k[0], (64, 256)) / 8, "w2": jax.random.normal(k[1], (256, 64)) / 16,
              "head": jax.random.normal(k[2], (64, 8)) / 8}
    return step, (params, jax.random.normal(k[3], (32, 64)), jax.random.normal(k[4], (32, 8)))


def test_a_hand_written_shard_map_block_runs_as_written_and_its_psums_are_priced():
    mesh = _mesh()
    step, args = _megatron_step(mesh)
    sharded = tag_jax.auto_shard(step, mesh, topology=TOPO, time_budget_s=1.0)
    got, want = sharded(*args), jax.jit(step)(*args)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    plan = sharded.plan(*args)
    # the region's inputs come as its specs say; the weights are not moved to reach it
    specs = {a.path: a.sharding for a in plan.arguments}
    assert str(specs["params/w1"]) == "P(None, model)" and str(specs["params/w2"]) == "P(model, None)"
    assert _predicted_kinds(plan) == _compiled_kinds(sharded, *args)
    assert plan.mesh.devices.flatten().tolist() == mesh.devices.flatten().tolist()


def test_every_collective_kind_in_a_body_is_predicted_as_compiled():
    mesh = _mesh()

    def body(x):
        return (jax.lax.psum(x, "model"), jax.lax.all_gather(x, "model", tiled=True),
                jax.lax.psum_scatter(x, "model", tiled=True),
                jax.lax.ppermute(x, "model", [(i, (i + 1) % 4) for i in range(4)]),
                jax.lax.all_to_all(x, "model", 0, 0, tiled=True), jax.lax.pmax(x, ("data", "model")))

    def fn(x):
        return shard_map(body, mesh=mesh, in_specs=P("data", "model"),
                         out_specs=(P("data", None), P("data", None)) + (P("data", "model"),) * 3 + (P(),),
                         check_vma=False)(x)

    x = jax.random.normal(jax.random.key(0), (64, 128))
    sharded = tag_jax.auto_shard(fn, mesh, topology=TOPO, time_budget_s=0.5)
    for a, b in zip(sharded(x), jax.jit(fn)(x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    predicted = _predicted_kinds(sharded.plan(x))
    assert set(predicted) == {"all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute"}
    assert predicted == _compiled_kinds(sharded, x)


def test_a_shard_map_step_needs_its_own_mesh():
    mesh = _mesh()
    step, args = _megatron_step(mesh)
    with pytest.raises(ValueError, match=r"`shard_map` .* runs on mesh \{'data': 2, 'model': 4\}.*"
                                         r"given a list of devices: pass the shard_map's own"):
        tag_jax.auto_shard(step, jax.devices(), topology=TOPO, time_budget_s=0.5).plan(*args)
    other = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with pytest.raises(ValueError, match=r"given mesh \{'data': 4, 'model': 2\}"):
        tag_jax.auto_shard(step, other, topology=TOPO, time_budget_s=0.5).plan(*args)
    # a baseline planned on another mesh says which op is at fault and what to do
    with pytest.raises(rules.RuleError, match=r"`shard_map` \(op \d+.*plan on the shard_map's own mesh"):
        tag_jax.baselines.data_parallel(step, jax.make_mesh((8,), ("devices",)), topology=TOPO).plan(*args)


def test_a_partly_manual_shard_map_is_refused_naming_the_auto_axes():
    mesh = _mesh()

    def fn(x):
        return shard_map(lambda a: a * 2.0, mesh=mesh, in_specs=P("data"), out_specs=P("data"),
                         axis_names={"data"})(x)

    with pytest.raises(TraceError, match=r"leaves mesh axes \['model'\] to the compiler"):
        tag_jax.trace(fn, jax.ShapeDtypeStruct((16, 8), jnp.float32))


def test_a_shard_map_over_an_explicit_mesh_is_refused_saying_to_use_auto_axes():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)

    def fn(x):
        return shard_map(lambda a: a * 2.0, mesh=mesh, in_specs=P("data", "model"),
                         out_specs=P("data", "model"))(x)

    with pytest.raises(TraceError, match=r"needs a mesh with Auto axes"):
        tag_jax.trace(fn, jax.ShapeDtypeStruct((16, 8), jnp.float32))


def test_a_region_inside_a_scan_is_priced_once_per_iteration():
    mesh = _mesh()

    def step(ws, x):
        def loss(ws):
            def layer(h, w):
                block = shard_map(lambda a, b: jax.lax.psum(jnp.tanh(a @ b), "model"), mesh=mesh,
                                  in_specs=(P("data", "model"), P("model", None)), out_specs=P("data", None))
                return block(h, w), None
            return jnp.mean(jax.lax.scan(layer, x, ws)[0] ** 2)
        value, g = jax.value_and_grad(loss)(ws)
        return ws - 0.1 * g, value

    ws = jax.random.normal(jax.random.key(0), (3, 64, 64)) / 8
    x = jax.random.normal(jax.random.key(1), (32, 64))
    sharded = tag_jax.auto_shard(step, mesh, topology=TOPO, time_budget_s=1.0)
    for a, b in zip(sharded(ws, x), jax.jit(step)(ws, x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # the psums of 3 layers, forward and backward; (the loop runs replicated in the plan, and the
    # moves of its values into the region's specs inside the body are not priced: all-gather)
    assert _predicted_kinds(sharded.plan(ws, x))["all-reduce"] == _compiled_kinds(sharded, ws, x)["all-reduce"]
