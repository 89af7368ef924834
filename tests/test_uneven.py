"""Uneven plans: groups, the shares MILP, exactness of the split step, fidelity, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tag_jax
from tag_jax import uneven
from tag_jax.hlo import collective_bytes_by_kind, collectives
from tag_jax.uneven import GroupModel, SharesError, solve_shares
from tag_jax.uneven.plan import GroupShare, UnevenPlan


def _loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    logits = h @ params["w2"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, {"accuracy": (logits.argmax(-1) == batch["y"]).mean()}


def _problem(n=40):
    k = jax.random.split(jax.random.key(0), 4)
    params = {"w1": jax.random.normal(k[0], (16, 32)) * 0.3, "b1": jnp.zeros(32),
              "w2": jax.random.normal(k[1], (32, 8)) * 0.3}
    batch = {"x": np.asarray(jax.random.normal(k[2], (n, 16))),
             "y": np.asarray(jax.random.randint(k[3], (n,), 0, 8))}
    tx = optax.sgd(0.1)
    return uneven.split_step(_loss, tx, has_aux=True), uneven.init_state(params, tx), batch


def _plan(groups, shares, n, local=1):
    return UnevenPlan(tuple(GroupShare(g, k, 0.0, 0.0, 0) for g, k in zip(groups, shares)), n,
                      0.0, 0, 0.0, local=local)


CPU_GROUPS = {"6+2": ((0, 1, 2, 3, 4, 5), (6, 7), (24, 16)),
              "4+4": ((0, 1, 2, 3), (4, 5, 6, 7), (32, 8))}


@pytest.mark.parametrize("case,local", [("6+2", 1), ("4+4", 1), ("6+2", 2), ("4+4", 4)])
def test_split_step_equals_unsplit_step(case, local):
    a, b, shares = CPU_GROUPS[case]
    step, state, batch = _problem(sum(shares))
    groups = (uneven.Group("a", "cpu", a), uneven.Group("b", "cpu", b))
    program = uneven.UnevenProgram(step, _plan(groups, shares, sum(shares), local))
    assert_two_steps_match(program, step, state, batch)


def assert_two_steps_match(program, step, state, batch):
    """Two steps of `program` equal two unsplit steps (float32, rtol 1e-5)."""
    new, metrics = program(program.shard_state(state), batch)
    ref, ref_metrics = jax.jit(step.reference)(state, batch)
    for x, y in zip(jax.tree_util.tree_leaves((new, metrics)), jax.tree_util.tree_leaves((ref, ref_metrics))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    assert int(new["step"]) == 1
    # the parameters did move: the test compares an update, not two copies of the input
    assert not np.allclose(np.asarray(new["params"]["w1"]), np.asarray(state["params"]["w1"]))
    # a second step from the program's own state stays equal too (the state is reused in place)
    new2, _ = program(new, batch)
    ref2, _ = jax.jit(step.reference)(ref, batch)
    np.testing.assert_allclose(np.asarray(new2["params"]["w2"]), np.asarray(ref2["params"]["w2"]),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("local", [1, 2])
def test_compiled_collectives_match_prediction_per_program(local):
    step, state, batch = _problem(40)
    topo = tag_jax.Topology.detect()
    groups = (uneven.Group("a", "cpu", (0, 1, 2, 3, 4, 5)), uneven.Group("b", "cpu", (6, 7)))
    plan = uneven.plan_uneven(step, state, batch, topo, groups=groups, local=local, group_program="rows")
    assert plan.shares[0] % 6 == 0 and plan.shares[1] % 2 == 0 and sum(plan.shares) == 40
    assert plan.local == local and plan.group_program == "rows"
    program = uneven.UnevenProgram(step, plan)
    predicted = program.predicted_collectives()
    compiled = program.compiled(state, batch)
    assert set(compiled) == set(predicted) == {"group a", "group b", "combine", "apply"}
    grads_bytes = 4 * (16 * 32 + 32 + 32 * 8 + 2)  # gradients and the two metrics, float32
    if local == 1:
        assert predicted["combine"] == {"all-reduce": grads_bytes}
        assert predicted["group a"] == {}
    else:  # every weight has an even dimension: reduce-scatter within pairs, all-reduce of halves
        assert predicted["combine"] == {"reduce-scatter": (grads_bytes - 8) // 2,
                                        "all-reduce": (grads_bytes - 8) // 2 + 8}
        assert predicted["group a"] == {"all-gather": grads_bytes - 8}  # the parameters, whole
    for name, c in compiled.items():
        real = {k: v for k, v in collective_bytes_by_kind(collectives(c)).items() if v}
        assert real == predicted[name], name


@pytest.mark.parametrize("groups,local", [(((0, 1, 2, 3, 4, 5), (6, 7)), 2), (((0, 1, 2, 3), (4, 5, 6, 7)), 4),
                                          (((0, 1, 2, 3), (4, 5, 6, 7)), 1)])
def test_spmd_group_programs_exact_and_faithful(groups, local):
    """Each group one SPMD program of its own (gradients reduced inside the group), the combine
    only across sub-groups: the same update as the unsplit step, and every program's compiled
    collectives as predicted (the group programs' by the simulator)."""
    step, state, batch = _problem(48)
    topo = tag_jax.Topology.detect()
    gs = tuple(uneven.Group(n, "cpu", ids) for n, ids in zip("ab", groups))
    plan = uneven.plan_uneven(step, state, batch, topo, groups=gs, local=local, group_program="spmd")
    assert plan.group_program == "spmd" and plan.local == local and sum(plan.shares) == 48
    program = uneven.UnevenProgram(step, plan)
    new, metrics = program(program.shard_state(state), batch)
    ref, ref_metrics = jax.jit(step.reference)(state, batch)
    for x, y in zip(jax.tree_util.tree_leaves((new, metrics)), jax.tree_util.tree_leaves((ref, ref_metrics))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    predicted = program.predicted_collectives()
    compiled = program.compiled(state, batch)
    assert set(compiled) == set(predicted) == {"group a", "group b", "combine", "apply"}
    grads_bytes = 4 * (16 * 32 + 32 + 32 * 8 + 2)
    if local > 1:  # only the chunks cross between sub-groups
        assert predicted["combine"] == {"all-reduce": (grads_bytes - 8) // local + 8}
    for name, c in compiled.items():
        real = {k: v for k, v in collective_bytes_by_kind(collectives(c)).items() if v}
        assert real == predicted[name], name
    assert "SPMD program per group" in plan.summary()


def _tied_problem(n=64, V=512, D=64, T=32):
    """A token embedding used twice (gathered, and tied as the output layer), the zoo's step shape
    (inputs {"params": ...}): at this size the data-parallel strategy reduce-scatters the
    embedding's gradient (its scatter-add half comes sharded on the hidden dimension), as it does
    gpt2's at real size (benchmarks/UNEVEN_FIDELITY.md)."""
    def loss(params, batch):
        h = jnp.tanh((params["emb"][batch["tok"]] + params["pos"]) @ params["w"])
        logits = h @ params["emb"].T
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), {}

    k = jax.random.split(jax.random.key(0), 5)
    params = {"emb": jax.random.normal(k[0], (V, D)) * 0.3, "pos": jax.random.normal(k[1], (T, D)) * 0.3,
              "w": jax.random.normal(k[2], (D, D)) * 0.3}
    batch = {"tok": np.asarray(jax.random.randint(k[3], (n, T), 0, V)),
             "y": np.asarray(jax.random.randint(k[4], (n, T), 0, V))}
    tx = optax.sgd(0.1)

    def grad_fn(inputs, batch):
        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(inputs["params"], batch)
        return grads, {"loss": value, **metrics}

    def apply_fn(state, grads):
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {**state, "params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                "step": state["step"] + 1}

    step = uneven.UnevenStep(grad_fn, apply_fn, inputs=lambda s: {"params": s["params"]}, name="tied")
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    return step, state, batch


@pytest.mark.parametrize("local", [4, 2])
def test_spmd_group_program_with_reduce_scattered_gradient_faithful(local):
    """The group strategy leaves the tied embedding's gradient reduce-scattered; the group program
    returns it whole, so XLA gathers it back (priced), and with one sub-group per group (local =
    |g|) only the leaves the strategy all-reduces become reduce-scatters (the embedding's was no
    all-reduce: the prediction went negative)."""
    step, state, batch = _tied_problem()
    topo = tag_jax.Topology.detect()
    gs = (uneven.Group("a", "cpu", (0, 1, 2, 3)), uneven.Group("b", "cpu", (4, 5, 6, 7)))
    plan = uneven.plan_uneven(step, state, batch, topo, groups=gs, local=local, group_program="spmd")
    program = uneven.UnevenProgram(step, plan)
    predicted = program.predicted_collectives()
    compiled = program.compiled(state, batch)
    emb = 4 * 512 * 64
    params_gather = 4 * (512 * 64 + 32 * 64 + 64 * 64)  # every weight sharded in the layout
    assert predicted["group a"]["reduce-scatter"] > 0
    assert predicted["group a"]["all-gather"] >= params_gather + emb  # the embedding gathered back
    for name, c in compiled.items():
        real = {k: v for k, v in collective_bytes_by_kind(collectives(c)).items() if v}
        assert real == predicted[name], name


def test_shares_two_groups_closed_form():
    # t_1 = n_1 * 1 ms, t_2 = n_2 * 3 ms, n_1 + n_2 = 64: balanced at n_1 = 48, n_2 = 16 (T = 48 ms)
    sol = solve_shares([GroupModel("fast", 0.0, 1e-3), GroupModel("slow", 0.0, 3e-3)], 64)
    assert sol.shares == (48, 16)
    assert sol.step_s == pytest.approx(0.048)
    np.testing.assert_allclose(sol.relaxed, (48, 16))
    # with fixed costs a_g: n_1 = (N b_2 + a_2 - a_1) / (b_1 + b_2); shares multiples of 4 and 2
    sol = solve_shares([GroupModel("a", 0.004, 1e-3, 4), GroupModel("b", 0.0, 1e-3, 2)], 40)
    assert sol.relaxed[0] == pytest.approx(18.0)  # (40 * 1 + 0 - 4) / 2
    assert sol.shares in ((16, 24), (20, 20))
    assert sol.step_s == pytest.approx(0.024)
    # the integral optimum: no other split into these multiples is faster
    best = min(max(0.004 + 1e-3 * a, 1e-3 * (40 - a)) for a in range(4, 40, 4))
    assert sol.step_s == pytest.approx(best)


def test_shares_tie_break_is_the_most_even_split():
    # times that do not grow with the share tie every split: the most even per-device load wins
    sol = solve_shares([GroupModel("a", 0.002, 0.0, 4), GroupModel("b", 0.002, 0.0, 4)], 48)
    assert sol.shares == (24, 24)
    # among equally fast splits, the even one (a: 5 per device, b: 10) over (16, 24) (a: 4, b: 12)
    sol = solve_shares([GroupModel("a", 0.004, 1e-3, 4), GroupModel("b", 0.0, 1e-3, 2)], 40)
    assert sol.shares == (20, 20)


def test_shares_respect_memory_bound():
    sol = solve_shares([GroupModel("fast", 0.0, 1e-3, 1, max_share=10), GroupModel("slow", 0.0, 3e-3)], 64)
    assert sol.shares == (10, 54)


@pytest.mark.parametrize("preset,expected", [
    ("tag-hetero", [("v100@node0", (0, 1)), ("1080ti@node1", (2, 3, 4, 5)), ("p100@node2", (6, 7))]),
    ("4xa100-4xv100", [("a100@node0", (0, 1, 2, 3)), ("v100@node1", (4, 5, 6, 7))]),
    ("2x4-v100-25gbe", [("v100@node0", (0, 1, 2, 3)), ("v100@node1", (4, 5, 6, 7))]),
])
def test_groups_on_presets(preset, expected):
    topo = tag_jax.Topology.preset(preset)
    got = [(g.name, g.device_ids) for g in uneven.device_groups(topo)]
    assert got == expected
    if preset == "2x4-v100-25gbe":
        (one,) = uneven.device_groups(topo, by="kind")
        assert one.device_ids == tuple(range(8))


def test_uneven_plan_on_hetero_gives_fast_devices_more():
    step, state, batch = _problem(64)
    topo = tag_jax.Topology.preset("4xa100-4xv100")
    plan = uneven.plan_uneven(step, state, batch, topo, leave_out=False)
    (a100, v100) = plan.groups
    assert a100.group.kind == "a100" and a100.share >= v100.share and sum(plan.shares) == 64
    assert plan.step_time_s == pytest.approx(plan.groups_s + plan.combine_s + plan.apply_s)
    assert min(g.idle_s for g in plan.groups) == 0.0
    text = plan.summary()
    assert "a100@node0" in text and "idle" in text and str(a100.share) in text


def test_errors_name_the_problem():
    with pytest.raises(SharesError, match=r"global batch 3 is smaller .*\(2 \+ 2 = 4\)"):
        solve_shares([GroupModel("a", 0, 1e-3, 2), GroupModel("b", 0, 1e-3, 2)], 3)
    with pytest.raises(SharesError, match="no integral split of the global batch 7"):
        solve_shares([GroupModel("a", 0, 1e-3, 2), GroupModel("b", 0, 1e-3, 4)], 7)
    step, state, batch = _problem(1)
    topo = tag_jax.Topology.preset("4xa100-4xv100")
    with pytest.raises(SharesError, match="global batch 1 is smaller"):
        uneven.plan_uneven(step, state, batch, topo, leave_out=False)
    with pytest.raises(ValueError, match="device 3 is in groups 'a' and 'b'"):
        uneven.check_groups([uneven.Group("a", "cpu", (0, 3)), uneven.Group("b", "cpu", (3,))])
    with pytest.raises(uneven.UnevenError, match="disagree on the number of examples"):
        uneven.plan_uneven(step, state, {"x": np.zeros((4, 16)), "y": np.zeros((2,), np.int32)}, topo)
    step, state, batch = _problem(40)
    groups = (uneven.Group("a", "cpu", (0, 1, 2, 3, 4, 5)), uneven.Group("b", "cpu", (6, 7)))
    program = uneven.UnevenProgram(step, _plan(groups, (24, 16), 40))
    with pytest.raises(uneven.UnevenError, match="splits a batch of 40 examples"):
        program(state, {"x": batch["x"][:20], "y": batch["y"][:20]})


# ---- through the main API: tag_jax.auto_shard(step, ..., uneven=...) ----

def _hetero_cpu_topology():
    """4 fast + 4 slow devices on two nodes, slowed 10^5-fold so that the toy problem's compute,
    not link latency, decides the shares (the 8 CPU devices stand for them)."""
    d = tag_jax.Topology.preset("4xa100-4xv100").to_dict()
    for dev in d["devices"]:
        for k in ("flops", "flops_fp32", "memory_bandwidth"):
            dev[k] /= 1e5
    d["name"] = "slow-4xa100-4xv100"
    return tag_jax.Topology.from_json(d)


def test_auto_shard_uneven_equals_unsplit_step():
    step, state, batch = _problem(64)
    topo = _hetero_cpu_topology()  # 8 CPU devices described as 4 A100 + 4 V100
    fn = tag_jax.auto_shard(step, jax.devices(), topology=topo, uneven=True, time_budget_s=0.5)
    plan = fn.plan(state, batch)
    assert isinstance(plan, UnevenPlan)
    assert [g.group.name for g in plan.groups] == ["a100@node0", "v100@node1"]
    assert sum(plan.shares) == 64 and plan.shares[0] >= plan.shares[1]
    text = plan.summary()
    assert "a100@node0" in text and "v100@node1" in text and "idle" in text
    new, metrics = fn(state, batch)
    ref, ref_metrics = jax.jit(step)(state, batch)  # an UnevenStep is also the whole step
    for x, y in zip(jax.tree_util.tree_leaves((new, metrics)), jax.tree_util.tree_leaves((ref, ref_metrics))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    assert not np.allclose(np.asarray(new["params"]["w1"]), np.asarray(state["params"]["w1"]))
    new2, _ = fn(new, batch)  # the next step starts from the uneven program's own layout
    ref2, _ = jax.jit(step)(ref, batch)
    np.testing.assert_allclose(np.asarray(new2["params"]["w2"]), np.asarray(ref2["params"]["w2"]),
                               rtol=1e-5, atol=1e-7)


def test_auto_shard_uneven_false_and_auto_choices():
    step, state, batch = _problem(64)
    topo = _hetero_cpu_topology()
    spmd = tag_jax.auto_shard(step, jax.devices(), topology=topo, uneven=False, time_budget_s=0.5)
    assert isinstance(spmd.plan(state, batch), tag_jax.Plan)
    auto = tag_jax.auto_shard(step, jax.devices(), topology=topo, time_budget_s=0.5)  # "auto"
    chosen = auto.plan(state, batch)
    spmd_s = auto.spmd.plan(state, batch).cost.step_time_s
    if isinstance(chosen, UnevenPlan):
        assert chosen.step_time_s < spmd_s and chosen.spmd_step_time_s == pytest.approx(spmd_s)
        assert "one SPMD program would take" in chosen.summary()
    else:
        assert isinstance(chosen, tag_jax.Plan)
    assert auto.why(state, batch).startswith("uneven plan" if isinstance(chosen, UnevenPlan) else "one SPMD")
    new, _ = auto(state, batch)
    ref, _ = jax.jit(step)(state, batch)
    np.testing.assert_allclose(np.asarray(new["params"]["w1"]), np.asarray(ref["params"]["w1"]),
                               rtol=1e-5, atol=1e-6)
    # one kind of device: "auto" keeps one SPMD program without planning uneven work
    same = tag_jax.auto_shard(step, jax.devices(), topology=tag_jax.Topology.preset("2x4-v100-25gbe"),
                              time_budget_s=0.5)
    assert isinstance(same.plan(state, batch), tag_jax.Plan)
    assert "one kind" in same.why(state, batch)


def test_auto_shard_uneven_flax_train_state():
    from flax import linen as nn
    from flax.training import train_state

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, name="fc2")(jnp.tanh(nn.Dense(32, name="fc1")(x)))

    def loss_fn(apply_fn, params, batch):
        logits = apply_fn({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    _, _, batch = _problem(64)
    model = MLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, 16)))["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1))
    step = uneven.split_train_state(loss_fn)
    fn = tag_jax.auto_shard(step, jax.devices(), topology=_hetero_cpu_topology(), uneven=True,
                            time_budget_s=0.5)
    assert isinstance(fn.plan(state, batch), UnevenPlan)
    new, metrics = fn(state, batch)
    ref, ref_metrics = jax.jit(step)(state, batch)
    for x, y in zip(jax.tree_util.tree_leaves((new, metrics)), jax.tree_util.tree_leaves((ref, ref_metrics))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    assert int(new.step) == 1


def test_auto_shard_uneven_errors():
    with pytest.raises(uneven.UnevenError, match=r"split_step\(loss_fn, optimizer\)"):
        tag_jax.auto_shard(lambda state, batch: state, jax.devices(), uneven=True)
    with pytest.raises(ValueError, match="pass 'auto'"):
        tag_jax.auto_shard(lambda state, batch: state, jax.devices(), uneven="yes")
    # a plain function with the default "auto" is an ordinary ShardedFunction
    from tag_jax.plan import ShardedFunction
    assert isinstance(tag_jax.auto_shard(lambda s, b: s, jax.devices()), ShardedFunction)


# ---- the same plan under jax.distributed: 2 processes x 4 CPU devices, a group spanning both ----

def test_split_step_under_jax_distributed(tmp_path):
    from multihost_job import run_job

    run_job(__file__, 2, tmp_path, timeout_s=120, what="uneven job")
    step, state, batch = _problem(40)
    ref, _ = jax.jit(step.reference)(state, batch)
    for i in range(2):
        got = np.load(tmp_path / f"params_{i}.npz")
        for name, value in ref["params"].items():
            np.testing.assert_allclose(got[name], np.asarray(value), rtol=1e-5, atol=1e-7)


def _worker(process_id: str, processes: str, port: str, out: str) -> None:
    import os

    from multihost_job import joined

    with joined(process_id, processes, port):
        step, state, batch = _problem(40)
        groups = (uneven.Group("a", "cpu", (0, 1, 2, 3, 4, 5)), uneven.Group("b", "cpu", (6, 7)))
        program = uneven.UnevenProgram(step, _plan(groups, (24, 16), 40))
        new, _ = program(program.shard_state(state), batch)
        local = {k: np.asarray(v.addressable_shards[0].data) for k, v in new["params"].items()}
        np.savez(os.path.join(out, f"params_{process_id}.npz"), **local)


if __name__ == "__main__":
    import sys

    _worker(*sys.argv[1:])
