"""Mode "one" of uneven plans: one program over all devices, per-device microbatch counts, the
all-reduce of the peeled last microbatch overlapped with its backward pass."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec as P

import tag_jax
from tag_jax import uneven
from tag_jax.hlo import collective_bytes_by_kind, collectives
from tag_jax.uneven import one
from tag_jax.uneven.plan import GroupShare, UnevenPlan

from test_uneven import _hetero_cpu_topology, _problem, _tied_problem, assert_two_steps_match

GRADS_BYTES = 4 * (16 * 32 + 32 + 32 * 8 + 2)  # the toy's gradients and two metrics, float32


def _one_plan(groups, counts, m):
    shares = [g.size * c * m for g, c in zip(groups, counts)]
    return UnevenPlan(tuple(GroupShare(g, k, 0.0, 0.0, 0) for g, k in zip(groups, shares)), sum(shares),
                      0.0, 0, 0.0, group_program="one", microbatch=m)


def _trip_program(counts, C, m, psum_inside=False):
    mesh = Mesh(np.array(jax.devices()), ("d",), axis_types=(AxisType.Auto,))

    def local(w, x, c):
        x = x.reshape(C, m, -1)

        def grad(i):
            xb = jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)
            g = jax.grad(lambda w: jnp.mean(jnp.tanh(xb @ w) ** 2))(jax.lax.pcast(w, ("d",), to="varying"))
            return jax.lax.psum(g, "d") if psum_inside else g

        zero = jax.lax.pcast(jnp.zeros_like(w), ("d",), to="varying")
        acc = jax.lax.fori_loop(0, c[0] - 1, lambda i, a: a + grad(i), zero)
        return jax.lax.psum(acc + grad(c[0] - 1), "d")

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("d"), P("d")), out_specs=P()))


def test_device_dependent_trip_count_under_shard_map():
    """Each of 8 CPU devices loops its own number of times (read from its row of an int array),
    no collective inside the loop, one psum after it: right values, and the compiled module has
    its only all-reduce outside the while loop (which `loop_collectives` would report)."""
    counts = np.array([4, 4, 3, 3, 1, 1, 2, 2], np.int32)
    C, m = int(counts.max()), 2
    w = jnp.full((3, 5), 0.1) + jnp.arange(15.0).reshape(3, 5) * 0.01
    x = np.random.RandomState(0).randn(8 * C * m, 3).astype(np.float32)
    f = _trip_program(counts, C, m)
    got = np.asarray(f(w, x, counts))
    xs = x.reshape(8, C, m, 3)
    ref = sum(np.asarray(jax.grad(lambda w: jnp.mean(jnp.tanh(xs[d, i] @ w) ** 2))(w))
              for d in range(8) for i in range(counts[d]))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    # a device's padding blocks are never read: changing them changes nothing
    x2 = xs.copy()
    for d in range(8):
        x2[d, counts[d]:] = 1e3
    np.testing.assert_array_equal(np.asarray(f(w, x2.reshape(x.shape), counts)), got)
    compiled = f.lower(w, x, counts).compile()
    assert uneven.loop_collectives(compiled) == []
    assert collective_bytes_by_kind(collectives(compiled))["all-reduce"] == 4 * 15
    # the checker is not vacuous: a psum inside the loop (compiled only; it would not run with
    # per-device trip counts) is reported
    bad = _trip_program(counts, C, m, psum_inside=True).lower(w, x, counts).compile()
    assert [c.kind for c in uneven.loop_collectives(bad)] == ["all-reduce"]


@pytest.mark.parametrize("sizes,counts,m", [((6, 2), (3, 1), 2), ((4, 4), (1, 4), 2), ((4, 4), (3, 2), 4)])
def test_one_program_equals_unsplit_step(sizes, counts, m):
    ids = np.split(np.arange(8), [sizes[0]])
    groups = tuple(uneven.Group(n, "cpu", tuple(int(i) for i in g)) for n, g in zip("ab", ids))
    plan = _one_plan(groups, counts, m)
    step, state, batch = _problem(plan.batch)
    program = uneven.UnevenProgram(step, plan)
    assert isinstance(program, uneven.OneProgram)
    assert program.device_counts == tuple(c for g, c in zip(groups, counts) for _ in g.device_ids)
    assert_two_steps_match(program, step, state, batch)
    compiled = program.compiled(state, batch)["one program"]
    assert uneven.loop_collectives(compiled) == []


def _fixed_groups():
    return (uneven.Group("a100@node0", "a100", (0, 1, 2, 3)), uneven.Group("v100@node1", "v100", (4, 5, 6, 7)))


def test_one_mode_plan_priced_and_faithful():
    """The planned counts: faster devices do more microbatches; each device's time is
    (count - 1) x the loop body + the last microbatch (data parallel over all devices, the
    all-reduce overlapped) as the simulator prices them; the counts are the best integral ones;
    the compiled program's collectives are the predicted ones, kind by kind."""
    n = 1024  # large enough that a microbatch's time grows with its examples (not only its weights)
    step, state, batch = _problem(n)
    topo = _hetero_cpu_topology()
    pricer = uneven.Pricer(step, state, batch, topo)
    plan = uneven.plan_uneven(step, state, batch, topo, groups=_fixed_groups(), group_program="one",
                              pricer=pricer)
    assert plan.group_program == "one" and plan.local == 1 and sum(plan.shares) == n
    m = plan.microbatch
    assert m in one.microbatch_sizes(n, 8)
    ca, cv = plan.counts
    assert ca > cv >= 1, plan.summary()
    assert plan.shares == (4 * ca * m, 4 * cv * m)
    ids = plan.device_ids
    body = [one.body_probe(pricer, m, i).time_s for i in (0, 4)]
    extra = [b - pricer.probe(m, i).time_s for b, i in zip(body, (0, 4))]
    last = [one.last_cost(pricer, m, ids, i).step_time_s + e for i, e in zip((0, 4), extra)]
    want = [(c - 1) * b + ls for c, b, ls in zip(plan.counts, body, last)]
    np.testing.assert_allclose([g.time_s for g in plan.groups], want, rtol=1e-9)
    assert plan.step_time_s == pytest.approx(max(want) + max(pricer.apply_probe(i).time_s for i in (0, 4)))
    assert min(g.idle_s for g in plan.groups) == 0.0
    # the last microbatch's all-reduce is overlapped with its backward pass, not added to it
    for i in (0, 4):
        c = one.last_cost(pricer, m, ids, i)
        assert c.comm_s > 0 and c.step_time_s < c.compute_s + c.comm_s
    assert plan.overlapped_comm_s == pytest.approx(max(one.last_cost(pricer, m, ids, i).comm_s for i in (0, 4)))
    # no other count split at this microbatch size is faster
    best = min(max((x - 1) * body[0] + last[0], (y - 1) * body[1] + last[1])
               for x, y in itertools.product(range(1, n + 1), repeat=2) if 4 * m * (x + y) == n)
    assert max(want) == pytest.approx(best)
    # the last microbatch's all-reduce is the simulator's, and what XLA compiles
    assert plan.combine_kinds == {"all-reduce": GRADS_BYTES}
    program = uneven.UnevenProgram(step, plan)
    compiled = program.compiled(state, batch)
    assert set(compiled) == set(program.predicted_collectives()) == {"one program"}
    real = {k: v for k, v in collective_bytes_by_kind(collectives(compiled["one program"])).items() if v}
    assert real == program.predicted_collectives()["one program"]
    text = plan.summary()
    assert f"microbatches of {m} example(s)" in text and f"a100@node0: {ca}" in text and "idle" in text
    new, _ = program(state, batch)
    ref, _ = jax.jit(step.reference)(state, batch)
    np.testing.assert_allclose(np.asarray(new["params"]["w1"]), np.asarray(ref["params"]["w1"]),
                               rtol=1e-5, atol=1e-7)


def test_one_mode_predicts_its_single_all_reduce():
    """The one program's only collectives are the psums of every gradient and metric leaf: on a
    model whose data-parallel GSPMD strategy reduce-scatters and gathers a tied embedding's
    gradient (and moves activations by all-to-all), the prediction is still that one all-reduce."""
    step, state, batch = _tied_problem(256)
    topo = _hetero_cpu_topology()
    pricer = uneven.Pricer(step, state, batch, topo)
    # microbatches of 8: the strategy at which the old prediction (its collectives) was wrong
    plan = uneven.plan_uneven(step, state, batch, topo, groups=_fixed_groups(), group_program="one",
                              pricer=pricer, microbatch=8)
    assert plan.combine_kinds == {"all-reduce": sum(pricer.combined_bytes)}
    program = uneven.UnevenProgram(step, plan)
    real = {k: v for k, v in collective_bytes_by_kind(collectives(program.compiled(state, batch)["one program"])).items()
            if v}
    assert real == program.predicted_collectives()["one program"]
    # priced as those all-reduces, overlapped with the backward pass
    c = one.last_cost(pricer, plan.microbatch, plan.device_ids, 0)
    assert c.comm_bytes_by_kind == {"all-reduce": sum(pricer.combined_bytes)}
    assert c.comm_s > 0 and c.step_time_s < c.compute_s + c.comm_s


def test_search_considers_one_mode_and_picks_fastest():
    step, state, batch = _problem(64)
    topo = _hetero_cpu_topology()
    pricer = uneven.Pricer(step, state, batch, topo)
    kw = dict(groups=_fixed_groups(), pricer=pricer)
    by_mode = {mode: uneven.plan_uneven(step, state, batch, topo, group_program=mode, **kw).step_time_s
               for mode in ("rows", "spmd", "one")}
    best = uneven.plan_uneven(step, state, batch, topo, **kw)
    assert best.step_time_s == pytest.approx(min(by_mode.values()))
    assert best.group_program == min(by_mode, key=by_mode.get)


def test_one_mode_errors_name_what_to_change():
    groups = (uneven.Group("a", "cpu", (0, 1, 2, 3, 4, 5)), uneven.Group("b", "cpu", (6, 7)))
    topo = tag_jax.Topology.detect()
    step, state, batch = _problem(41)  # 41 = m x (6 c_a + 2 c_b) has no solution: odd
    with pytest.raises(uneven.UnevenError, match=r"no split of the global batch 41 .*multiple of 2"):
        uneven.plan_uneven(step, state, batch, topo, groups=groups, group_program="one")
    step, state, batch = _problem(5)
    with pytest.raises(uneven.UnevenError, match="batch of 5 example.* too small for 8 devices"):
        uneven.plan_uneven(step, state, batch, topo, groups=groups, group_program="one")
    step, state, batch = _problem(40)
    with pytest.raises(uneven.UnevenError, match="microbatches of 3 example.* cannot serve a global batch of 40"):
        uneven.plan_uneven(step, state, batch, topo, groups=groups, group_program="one", microbatch=3)
    with pytest.raises(uneven.UnevenError, match="keeps the state replicated"):
        uneven.plan_uneven(step, state, batch, topo, groups=groups, group_program="one", local=2)
    program = uneven.UnevenProgram(step, _one_plan(groups, (3, 1), 2))
    with pytest.raises(uneven.UnevenError, match="splits a batch of 40 examples into microbatches of 2"):
        program(state, {"x": batch["x"][:20], "y": batch["y"][:20]})
    with pytest.raises(uneven.UnevenError, match="not a positive multiple of 2 device"):
        uneven.UnevenProgram(step, _with_share(_one_plan(groups, (3, 1), 2), 1, 3))


def _with_share(plan, k, share):
    import dataclasses

    groups = list(plan.groups)
    groups[k] = dataclasses.replace(groups[k], share=share)
    return dataclasses.replace(plan, groups=tuple(groups))
