"""auto_shard: plans that run, equal the unsharded step, and are never worse than a baseline."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tag_jax
from tag_jax import models, rules
from tag_jax.search.planner import PlanningError

TOPO = tag_jax.Topology.preset("2x4-v100-25gbe")


def _replicated_peak(ex) -> float:
    from tag_jax import rules
    from tag_jax.cost import Simulator
    from tag_jax.search.planner import replicated_strategy
    from tag_jax.strategy import MeshSpec

    graph = tag_jax.trace(ex.step, ex.state, ex.batch)
    mesh = MeshSpec((8,), ("devices",), tuple(range(8)))
    sim = Simulator(graph, rules.for_graph(graph, mesh.axes), TOPO, mesh)
    return sim.cost(replicated_strategy(graph, mesh)).peak_memory_bytes


def _mesh():
    return jax.make_mesh((8,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_auto_sharded_step_equals_unsharded_step(name):
    ex = models.get(name, "toy", optimizer="sgd")
    state, batch = ex.init(jax.random.key(0))
    # At toy sizes replicating everything is fastest; a memory limit below that plan's peak makes
    # the planner shard, so the check covers a sharded program.
    limit = 0.9 * _replicated_peak(ex)
    step = tag_jax.auto_shard(ex.step, _mesh(), topology=TOPO, time_budget_s=2.0, memory_limit=limit)
    assert any(a.sharding.axes for a in step.plan(state, batch).arguments)
    got = step(state, batch)
    want = jax.jit(ex.step)(state, batch)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    plan = step.plan(state, batch)
    assert plan.cost.peak_memory_bytes <= limit
    # never worse than a hand-written plan that fits the same memory
    fitting = [c.step_time_s for c in (getattr(tag_jax.baselines, kind)(ex.step, _mesh(), topology=TOPO)
                                       .plan(state, batch).cost for kind in ("data_parallel", "fsdp"))
               if c.peak_memory_bytes <= limit]
    assert fitting and plan.cost.step_time_s <= min(fitting) * (1 + 1e-9)


def test_plan_is_deterministic_for_a_seed():
    ex = models.get("mlp", "toy")
    plans = [tag_jax.auto_shard(ex.step, _mesh(), topology=TOPO, time_budget_s=1.0, seed=3)
             .plan(ex.state, ex.batch) for _ in range(2)]
    # Same seed, same evaluations in the same order; the time budget may cut one run shorter, so
    # compare the seeded part: identical starting plans and an identical mesh choice when equal.
    assert plans[0].search.seeds == plans[1].search.seeds


def test_memory_limit_that_nothing_fits_names_the_largest_tensor():
    ex = models.get("gpt2", "toy")
    step = tag_jax.auto_shard(ex.step, _mesh(), topology=TOPO, time_budget_s=0.5, memory_limit=1000)
    graph = step.trace(ex.state, ex.batch)
    largest = max((graph.tensors[t] for t in graph.inputs), key=lambda t: t.nbytes)
    with pytest.raises(PlanningError, match=r"no plan fits the memory limit of 1000 B per device: "
                                            r"the best reached .*KiB \(.*: arguments .* per device, "
                                            r"activations and temporaries .*; largest tensor ") as err:
        step.plan(ex.state, ex.batch)
    assert largest.path in str(err.value)
    # the split is the best plan's own: its arguments' shards plus the rest make its peak
    text = str(err.value)
    assert ("rematerialise layers" in text) == (_bytes_in(text, "temporaries ") > _bytes_in(text, "arguments "))


def _bytes_in(text: str, after: str) -> float:
    """The size that follows `after` in a message (`_bytes` format: 1.50 KiB, 12 B)."""
    number, unit = text.split(after, 1)[1].split()[:2]
    unit = unit.rstrip(";,)")
    return float(number) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]


def test_empty_device_list_is_refused():
    with pytest.raises(ValueError, match="no devices to plan for"):
        tag_jax.auto_shard(lambda x: x, [], topology=TOPO)


def test_indivisible_shapes_plan_and_run():
    """Dimensions no mesh axis divides (7 rows, 5 features on 8 devices) are never split; the plan
    still runs and gives the unsharded values."""
    import jax.numpy as jnp

    def f(w, x):
        return jnp.tanh(x @ w).sum(axis=0), x.T @ x

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
    step = tag_jax.auto_shard(f, _mesh(), topology=TOPO, time_budget_s=0.5)
    plan = step.plan(w, x)
    for a in plan.arguments:
        for n, axes in zip(a.shape, a.sharding.dims):
            assert not axes or n % 8 == 0
    for got, want in zip(step(w, x), jax.jit(f)(w, x)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_non_array_outputs_are_refused_with_the_output_named():
    import jax.numpy as jnp

    step = tag_jax.auto_shard(lambda x: (jnp.sin(x), "done"), _mesh(), topology=TOPO, time_budget_s=0.2)
    with pytest.raises(tag_jax.TraceError, match=r"<class 'str'> at output component \[1\].*returns arrays"):
        step.plan(jnp.ones((8, 4)))


def test_side_effect_callbacks_are_refused_naming_the_primitive():
    import jax.numpy as jnp
    from jax.experimental import io_callback

    def noisy(x):
        io_callback(print, None, x)  # a side effect: it cannot be planned across devices
        return jnp.sin(x)

    step = tag_jax.auto_shard(noisy, _mesh(), topology=TOPO, time_budget_s=0.2)
    with pytest.raises(tag_jax.TraceError, match=r"io_callback.*side effect"):
        step.plan(jnp.ones((8, 4)))


def test_python_side_effects_run_once_per_plan_not_per_call():
    """Python code in the function runs when it is traced (once per input signature), as under
    jax.jit; the sharded program does not re-run it."""
    import jax.numpy as jnp

    calls = []

    def f(x):
        calls.append(1)
        return jnp.sin(x) * 2

    step = tag_jax.auto_shard(f, _mesh(), topology=TOPO, time_budget_s=0.2)
    x = jnp.ones((8, 4))
    for _ in range(3):
        np.testing.assert_allclose(np.asarray(step(x)), np.sin(np.ones((8, 4))) * 2, rtol=1e-6)
    assert len(calls) == 1


def test_planner_seeds_the_ilp_and_the_2d_plan_and_is_never_worse():
    """The ILP's plan (first mesh) and the 2-D tensor-parallel plan (each 2-D mesh of a small
    graph) join the baselines as seeds; the result is never slower than any seed."""
    from tag_jax import rules
    from tag_jax.search.planner import search, two_d_strategy
    from tag_jax.search.propagate import carried_outputs
    from tag_jax.strategy import MeshSpec

    ex = models.get("mlp", "toy")
    graph = tag_jax.trace(ex.step, ex.state, ex.batch)
    r = search(graph, TOPO, list(range(8)), mesh_shape=(4, 2), axis_names=("data", "model"),
               time_budget_s=8.0, seed=0)
    assert {"ilp (data=4,model=2)", "2d (data=4,model=2)", "megatron (data=4,model=2)"} <= set(r.seeds)
    assert r.cost.step_time_s <= min(r.seeds.values()) * (1 + 1e-9)
    # the 2-D plan: matrices stored split over both axes (model on rows, data on columns) and
    # used where they lie, vectors over both axes where they divide, the batch over data
    mesh = MeshSpec((4, 2), ("data", "model"), tuple(range(8)))
    st = two_d_strategy(graph, rules.for_graph(graph, mesh.axes), mesh, carried_outputs(graph))
    for tid, sh in zip(graph.inputs, st.input_shardings):
        t = graph.tensors[tid]
        if "/params/" in (t.path or "") and len(t.shape) == 2 and t.shape[0] % 2 == 0 and t.shape[1] % 4 == 0:
            assert sh.dims == (("model",), ("data",)), (t.path, sh)
        if t.role.name == "BATCH" and t.shape[0] % 4 == 0:
            assert sh.dims[0] == ("data",)


def test_slow_devices_are_left_out_where_one_program_would_wait_for_them():
    # On 4 A100 + 4 V100 a float32 matmul runs 10x faster on an A100 (TF32): a program on the four
    # A100 alone beats any program on all eight, which the V100 would pace.
    ex = models.get("mlp", "toy", optimizer="sgd")
    state, batch = ex.init(jax.random.key(0))
    topo = tag_jax.Topology.preset("4xa100-4xv100")
    step = tag_jax.auto_shard(ex.step, None, topology=topo, time_budget_s=2.0, policy=None)
    plan = step.plan(state, batch)
    assert sorted(plan.mesh.devices.flat, key=lambda d: d.id) == jax.devices()[:4]
    # the best seed on all eight devices (meshes (8,) and (4, 2)); seeds name their mesh
    everyone = min(v for k, v in plan.search.seeds.items() if "(data=8)" in k or "(data=4,model=2)" in k)
    assert plan.cost.step_time_s < everyone
    got = step(state, batch)
    want = jax.jit(ex.step)(state, batch)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _scaled_sgd(state, batch, lr, train):
    """An SGD step whose learning rate and mode are static Python values."""
    def loss(w):
        return ((batch["x"] @ w - batch["y"]) ** 2).mean()

    value, grad = jax.value_and_grad(loss)(state)
    return (state - lr * grad if train else state), value


def test_static_argnums_plan_per_value_and_equal_the_unsharded_step():
    state = jax.random.normal(jax.random.key(0), (16, 4))
    batch = {"x": jax.random.normal(jax.random.key(1), (32, 16)),
             "y": jax.random.normal(jax.random.key(2), (32, 4))}
    step = tag_jax.auto_shard(_scaled_sgd, _mesh(), topology=TOPO, time_budget_s=0.5,
                              static_argnums=(2, 3), policy=None)
    for lr, train in ((0.1, True), (0.5, True), (0.1, False)):
        got = step(state, batch, lr, train)
        want = jax.jit(_scaled_sgd, static_argnums=(2, 3))(state, batch, lr, train)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # one plan per static value; the plan's arguments are the arrays only
    assert repr(step) == "ShardedFunction(_scaled_sgd, 3 plan(s))"
    assert [a.path for a in step.plan(state, batch, 0.1, True).arguments][0] == "state"
    assert step.lower(state, batch, 0.1, True).compile() is not None
    with pytest.raises(TypeError, match="static argument 2 is a list, which is not hashable"):
        step(state, batch, [0.1], True)
    with pytest.raises(ValueError, match=r"static_argnums \[3\] out of range for a call with 3"):
        step(state, batch, 0.1)
    # keywords bind to their positions, as jax.jit's do: the same plan and result
    by_name = step(state, batch=batch, train=True, lr=0.1)
    np.testing.assert_array_equal(np.asarray(by_name[0]), np.asarray(step(state, batch, 0.1, True)[0]))
    assert repr(step) == "ShardedFunction(_scaled_sgd, 3 plan(s))"
    with pytest.raises(TypeError, match="cannot bind keyword argument"):
        step(state, batch, 0.1, True, momentum=0.9)


def test_roles_override_the_guess_from_paths():
    state = jax.ShapeDtypeStruct((16, 4), np.float32)
    batch = {"x": jax.ShapeDtypeStruct((32, 16), np.float32),
             "y": jax.ShapeDtypeStruct((32, 4), np.float32)}
    guessed = tag_jax.auto_shard(_scaled_sgd, _mesh(), topology=TOPO, time_budget_s=0.2,
                                 static_argnums=(2, 3), policy=None)
    told = tag_jax.auto_shard(_scaled_sgd, _mesh(), topology=TOPO, time_budget_s=0.2,
                              static_argnums=(2, 3), policy=None, roles={"state": "state"})
    role = lambda f: {a.path: a.role for a in f.plan(state, batch, 0.1, True).arguments}["state"]
    # `state` comes back made from its gradient: the dataflow says parameter; told otherwise, state
    assert (role(guessed), role(told)) == ("parameter", "state")


def test_search_reports_the_seeds_over_the_memory_limit():
    """`SearchResult.over_memory` names the seeds whose plans do not fit (plan_quality.py's
    baselines to beat are the fitting ones): with a limit between FSDP's peak and data
    parallel's, DP is over and FSDP is not, and the result fits."""
    from tag_jax import rules
    from tag_jax.baselines import baseline_strategy
    from tag_jax.cost import Simulator
    from tag_jax.search.planner import search
    from tag_jax.search.propagate import carried_outputs
    from tag_jax.strategy import MeshSpec

    ex = models.get("mlp", "toy", width=512, in_features=512)
    graph = tag_jax.trace(ex.step, ex.state, ex.batch)
    mesh = MeshSpec((8,), ("data",), tuple(range(8)))
    ops = rules.for_graph(graph, mesh.axes)
    sim = Simulator(graph, ops, TOPO, mesh, carried=carried_outputs(graph))
    peak = {k: sim.cost(baseline_strategy(k, graph, ops, mesh, simulator=sim)).peak_memory_bytes
            for k in ("data_parallel", "fsdp")}
    assert peak["fsdp"] < peak["data_parallel"]
    limit = (peak["fsdp"] + peak["data_parallel"]) / 2
    r = search(graph, TOPO, list(range(8)), mesh_shape=(8,), axis_names=("data",),
               time_budget_s=1.0, memory_limit=limit, permute=False)
    assert "data_parallel (data=8)" in r.over_memory and "fsdp (data=8)" not in r.over_memory
    assert set(r.over_memory) <= set(r.seeds) and r.cost.peak_memory_bytes <= limit


def test_a_step_with_spectral_features_equals_the_unsharded_step():
    # jnp.fft runs under the fft rule: batch dims split, the transformed dims whole
    def step(w, x):
        def loss(w):
            spectrum = jnp.abs(jnp.fft.rfft(x, axis=-1))  # (batch, 33) features
            return jnp.mean((spectrum @ w) ** 2)
        value, g = jax.value_and_grad(loss)(w)
        return w - 0.01 * g, value

    w = jax.random.normal(jax.random.key(0), (33, 16)) / 8
    x = jax.random.normal(jax.random.key(1), (32, 64))
    sharded = tag_jax.auto_shard(step, _mesh(), topology=TOPO, time_budget_s=0.5)
    got, want = sharded(w, x), jax.jit(step)(w, x)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    graph = tag_jax.trace(step, w, x)
    assert "fft" in {op.primitive for op in graph.ops} and not rules.unknown_primitives(graph)


def test_a_step_called_inside_an_explicit_mesh_context_equals_jit():
    # users of JAX's explicit sharding mode call steps inside jax.set_mesh(mesh): the planned
    # program still places its own (Auto) shardings, and takes explicitly sharded arrays
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)

    def step(w, x):
        value, g = jax.value_and_grad(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2))(w)
        return w - 0.1 * g, value

    w = jax.random.normal(jax.random.key(0), (64, 16)) / 8
    x = jax.random.normal(jax.random.key(1), (32, 64))
    with jax.set_mesh(mesh):
        x = jax.device_put(x, NamedSharding(mesh, P("data", None)))
        sharded = tag_jax.auto_shard(step, mesh, topology=TOPO, time_budget_s=0.5)
        got, want = sharded(w, x), jax.jit(step)(w, x)
        again, want_again = sharded(got[0], x), jax.jit(step)(want[0], x)
    for a, b in zip(got + again, want + want_again):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_a_users_sharding_constraint_is_a_hint_the_plan_replaces():
    # with_sharding_constraint in the step names a layout for the user's mesh; the plan chooses
    # every layout, so the constraint runs as the identity in any of them (it used to have no
    # rule: replicated only, while the emitted program re-imposed the user's layout)
    from jax.sharding import NamedSharding, PartitionSpec as P
    from tag_jax.hlo import collective_bytes_by_kind, collectives

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def step(w, x):
        def loss(w):
            h = jax.lax.with_sharding_constraint(x @ w, NamedSharding(mesh, P(None, "model")))
            return jnp.mean(jnp.tanh(h) ** 2)
        value, g = jax.value_and_grad(loss)(w)
        return w - 0.1 * g, value

    w = jax.random.normal(jax.random.key(0), (64, 32)) / 8
    x = jax.random.normal(jax.random.key(1), (32, 64))
    graph = tag_jax.trace(step, w, x)
    marked = [op for op in graph.ops if op.primitive == "sharding_constraint"]
    assert len(marked) == 2  # the forward's, and its transpose in the backward pass
    for op in marked:
        options = rules.for_graph(graph, {"data": 2, "model": 4})[op.id]
        assert {str(s.outputs[0]) for s in options} >= {"P(None, None)", "P(data, model)", "P(model, data)"}
    sharded = tag_jax.auto_shard(step, mesh, topology=TOPO, time_budget_s=1.0)
    for a, b in zip(sharded(w, x), jax.jit(step)(w, x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    plan = sharded.plan(w, x)
    compiled = collective_bytes_by_kind(collectives(sharded.lower(w, x).compile()))
    assert {k: v for k, v in plan.cost.comm_bytes_by_kind.items() if v} == {k: v for k, v in compiled.items() if v}


def test_explicit_sharding_calls_inside_the_step_are_refused_saying_what_to_drop():
    from jax.sharding import AxisType, PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)

    def step(w, x):
        return jnp.dot(x, w, out_sharding=P("data", None))

    with jax.set_mesh(mesh):
        sharded = tag_jax.auto_shard(step, mesh, topology=TOPO, time_budget_s=0.5)
        with pytest.raises(tag_jax.TraceError, match=r"explicit-sharding calls inside it .*cannot run"):
            sharded.plan(jax.ShapeDtypeStruct((64, 16), jnp.float32), jax.ShapeDtypeStruct((32, 64), jnp.float32))


def test_a_non_array_argument_is_named_with_what_to_do():
    step = tag_jax.auto_shard(lambda x, tag: x * 2, _mesh(), topology=TOPO, time_budget_s=0.5)
    with pytest.raises(TypeError, match=r"argument \[1\] is a str \('hello'\), not an array.*static_argnums"):
        step(jnp.ones(8), "hello")
