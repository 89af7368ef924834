"""The Alpa-style ILP baseline: optimal for its model, runnable, time-limited, memory-aware."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tag_jax
from tag_jax import baselines, models, rules
from tag_jax.cost import Simulator
from tag_jax.search.ilp import _Builder, ilp_strategy
from tag_jax.search.ilp_units import decision_units
from tag_jax.search.planner import PlanningError
from tag_jax.search.propagate import carried_outputs
from tag_jax.strategy import MeshSpec

TOPO = tag_jax.Topology.preset("2x4-v100-25gbe")
MESH8 = MeshSpec((8,), ("data",), tuple(range(8)))
FAST = models.fast_compile_options()


def _matmul_graph():
    # h feeds two consumers: exercises the deduped (several-consumer) edge form
    def f(w, x):
        h = x @ w
        return jnp.sum(jnp.tanh(h)) + jnp.sum(h * 3.0)

    return tag_jax.trace(f, jax.ShapeDtypeStruct((4096, 2048), jnp.float32),
                         jax.ShapeDtypeStruct((512, 4096), jnp.float32))


def test_ilp_is_optimal_against_brute_force():
    graph = _matmul_graph()
    ops = rules.for_graph(graph, MESH8.axes)
    strategy, info = ilp_strategy(graph, ops, TOPO, MESH8, time_limit_s=20, merge=False)
    assert info["status"] == "optimal"
    # every assignment of the units, priced by the simulator without overlap (the ILP's objective)
    sim = Simulator(graph, ops, TOPO, MESH8)
    units = decision_units(graph, ops, MESH8, merge=False)
    b = _Builder(graph, ops, TOPO, MESH8, units, sim)
    best, n = math.inf, 0
    for pick in itertools.product(*[range(u.size) for u in units.units]):
        if any(u.allowed and not u.allowed[k] for u, k in zip(units.units, pick)):
            continue
        x = np.zeros(int(b.base[-1]))
        x[[int(b.base[i]) + k for i, k in enumerate(pick)]] = 1
        best = min(best, sim.cost(b.decode(x, "bf"), overlap=False).step_time_s)
        n += 1
    assert n > 1000
    np.testing.assert_allclose(info["objective_s"], best, rtol=1e-9)
    np.testing.assert_allclose(info["no_overlap_s"], best, rtol=1e-9)
    # the answer is not the trivial one: the big matmul is split
    replicated = sim.cost(b.decode(_replicated(b), "r"), overlap=False).step_time_s
    assert info["objective_s"] < 0.5 * replicated


def _replicated(b):
    x = np.zeros(int(b.base[-1]))
    x[b.base[:-1].astype(int)] = 1  # option 0 of every unit
    return x


def test_ilp_plan_runs_and_matches_unsharded():
    ex = models.get("mlp", "toy", optimizer="sgd")
    state, batch = ex.init(jax.random.key(0))
    ref = jax.jit(ex.step, compiler_options=FAST)(state, batch)
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    # a memory limit below the replicated arguments forces a sharded plan
    limit = 20_000
    step = baselines.ilp(ex.step, mesh, TOPO, time_limit_s=20, memory_limit=limit,
                         compiler_options=FAST)
    plan = step.plan(ex.state, ex.batch)
    assert plan.strategy.name == "ilp"
    assert plan.cost.peak_memory_bytes <= limit
    assert any(not a.sharding.is_replicated() for a in plan.arguments if "/params/" in a.path)
    got = step(state, batch)
    jax.tree_util.tree_map(
        lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6),
        got, ref)


def test_ilp_time_limit_is_respected(monkeypatch):
    ex = models.get("mlp", "real")
    graph = tag_jax.trace(ex.step, ex.state, ex.batch)
    mesh = MeshSpec((4, 2), ("data", "model"), tuple(range(8)))
    ops = rules.for_graph(graph, mesh.axes)
    import tag_jax.search.ilp as ilp_module

    limits = []  # what HiGHS is told, per solve (the wall clock is the machine's load, not ours)

    def milp(*args, options, **kw):
        limits.append(options["time_limit"])
        return real_milp(*args, options=options, **kw)

    real_milp = ilp_module.milp
    monkeypatch.setattr(ilp_module, "milp", milp)
    strategy, info = ilp_strategy(graph, ops, TOPO, mesh, time_limit_s=1.0)
    assert limits and all(x <= 1.0 for x in limits)
    assert info["solve_s"] < 10.0  # (a solver ignoring its limit would take minutes here)
    assert info["status"] in ("time-limited", "no solution in time limit: data_parallel")
    assert info["variables"] > 1000 and info["constraints"] > 1000
    # what is reported is the simulator's price of the returned strategy
    sim = Simulator(graph, ops, TOPO, mesh, carried=carried_outputs(graph))
    assert info["step_time_s"] == sim.cost(strategy).step_time_s


def test_ilp_infeasible_memory_names_the_limit():
    graph = _matmul_graph()
    ops = rules.for_graph(graph, MESH8.axes)
    with pytest.raises(PlanningError, match=r"memory limit of 1000 B per device"):
        ilp_strategy(graph, ops, TOPO, MESH8, time_limit_s=5, memory_limit=1000)


def test_ilp_reuses_a_simulator_and_prices_carried_partial_sums_as_reduced():
    graph = _matmul_graph()
    ops = rules.for_graph(graph, MESH8.axes)
    sim = Simulator(graph, ops, TOPO, MESH8, carried=carried_outputs(graph))
    a, info_a = ilp_strategy(graph, ops, TOPO, MESH8, time_limit_s=20)
    b, info_b = ilp_strategy(graph, ops, TOPO, MESH8, time_limit_s=20, simulator=sim)
    assert a == b and info_a["objective_s"] == info_b["objective_s"]
    # the objective is the simulator's no-overlap time of the plan: two partial sums added into
    # a third are two all-reduces (XLA reduces where they are made), not one of the sum
    np.testing.assert_allclose(info_b["objective_s"], info_b["no_overlap_s"], rtol=1e-9)
    units = decision_units(graph, ops, MESH8)
    builder = _Builder(graph, ops, TOPO, MESH8, units, sim)
    from tag_jax.strategy import TensorSharding

    part = TensorSharding((), partial=("data",))
    t = next(i for i, x in enumerate(graph.tensors) if x.shape == ())  # a reduce_sum's result
    reduce_cost = builder.price(t, part, part.without_partial())
    assert reduce_cost > 0
    assert builder.price(t, part, part) == reduce_cost  # carrying it on pays the reduction


def test_ilp_limit_can_bound_the_whole_call(monkeypatch):
    ex = models.get("mlp", "real")
    graph = tag_jax.trace(ex.step, ex.state, ex.batch)
    mesh = MeshSpec((4, 2), ("data", "model"), tuple(range(8)))
    ops = rules.for_graph(graph, mesh.axes)
    sim = Simulator(graph, ops, TOPO, mesh, carried=carried_outputs(graph))
    import tag_jax.search.ilp as ilp_module

    limits = []  # what HiGHS is told (its wall clock overshoots on a loaded machine: 2.1 s of 0.9)

    def milp(*args, options, **kw):
        limits.append(options["time_limit"])
        return real_milp(*args, options=options, **kw)

    real_milp = ilp_module.milp
    monkeypatch.setattr(ilp_module, "milp", milp)
    _, info = ilp_strategy(graph, ops, TOPO, mesh, time_limit_s=1.5, simulator=sim,
                           limit_includes_build=True)
    # the build counts: the solver is told what is left, if anything; without time left it is
    # not started and data parallel stands in
    if info["build_s"] > 1.5:
        assert not limits and info["status"] == "no solution in time limit: data_parallel"
    else:
        assert limits and max(limits) <= 1.5 - info["build_s"] + 1e-6, (limits, info)
    assert info["solve_s"] < 10.0  # (a solver ignoring its limit would take minutes here)


def test_ilp_is_feasible_with_a_fixed_carried_target():
    # regression: a vocab of 126 does not split over 8 devices, so the optimizer state of the
    # MLM bias has one (replicated) option; its carried result is then a constant target beside
    # an op consumer, and the several-consumer edge rows once put that constant on the wrong side
    # (sum_k e_kl = -1), making the whole ILP infeasible with no memory limit
    ex = models.get("bert", "toy", vocab=126, n_layer=1)
    graph = tag_jax.trace(ex.step, ex.state, ex.batch)
    ops = rules.for_graph(graph, MESH8.axes)
    sim = Simulator(graph, ops, TOPO, MESH8, carried=carried_outputs(graph))
    strategy, info = ilp_strategy(graph, ops, TOPO, MESH8, time_limit_s=20, simulator=sim)
    assert info["status"] == "optimal"
    assert strategy.name == "ilp"
    np.testing.assert_allclose(info["objective_s"], info["no_overlap_s"], rtol=1e-9)
    assert info["step_time_s"] == sim.cost(strategy).step_time_s
    # no worse than replicating everything (option 0 of every unit), which is always feasible
    units = decision_units(graph, ops, MESH8)
    b = _Builder(graph, ops, TOPO, MESH8, units, sim)
    replicated = sim.cost(b.decode(_replicated(b), "r"), overlap=False).step_time_s
    assert info["objective_s"] <= replicated * (1 + 1e-9)


def test_relax_and_fix_keeps_the_bounds_and_names_what_it_proved(monkeypatch):
    # mlp-real on 8 devices over 25 GbE: the LP relaxation leaves some units fractional, so the
    # MIP over the rest is optimal only over them; with time left the whole MIP is solved too
    from types import SimpleNamespace

    from tag_jax.search import ilp as ilp_module

    ex = models.get("mlp", "real")
    graph = tag_jax.trace(ex.step, ex.state, ex.batch)
    ops = rules.for_graph(graph, MESH8.axes)
    sim = Simulator(graph, ops, TOPO, MESH8, carried=carried_outputs(graph))
    _, full = ilp_strategy(graph, ops, TOPO, MESH8, time_limit_s=20, simulator=sim)
    assert full["status"] == "optimal"
    _, polished = ilp_strategy(graph, ops, TOPO, MESH8, time_limit_s=20, simulator=sim,
                               relax_and_fix=True)
    # (the whole MIP proves the optimum; the plan kept, of the two, is the simulator's faster)
    assert polished["status"] == "optimal"
    np.testing.assert_allclose(polished["objective_s"], full["objective_s"], rtol=1e-9)
    assert polished["step_time_s"] <= full["step_time_s"] * (1 + 1e-9)

    # the whole MIP out of time: the fixed units' plan stands, and says what it proved
    real_solve = ilp_module._solve

    def no_whole_mip(pb, limit, relaxed=False, fixed=None):
        if relaxed or fixed is not None:
            return real_solve(pb, limit, relaxed=relaxed, fixed=fixed)
        return SimpleNamespace(x=None, status=1, fun=None)

    monkeypatch.setattr(ilp_module, "_solve", no_whole_mip)
    strategy, fixed = ilp_strategy(graph, ops, TOPO, MESH8, time_limit_s=20, simulator=sim,
                                   relax_and_fix=True)
    assert 0 < fixed["fixed_units"] < fixed["units"]
    assert fixed["status"] == "optimal over the LP's free units" and fixed["lp_gap"] > 1e-4
    bound = fixed["objective_s"] / (1 + fixed["lp_gap"])  # (constant terms are tiny here)
    assert bound <= full["objective_s"] * (1 + 1e-6)
    assert full["objective_s"] <= fixed["objective_s"] * (1 + 1e-9)
    assert fixed["step_time_s"] == sim.cost(strategy).step_time_s


def test_without_fallback_no_solution_in_time_returns_none():
    ex = models.get("mlp", "real")
    graph = tag_jax.trace(ex.step, ex.state, ex.batch)
    ops = rules.for_graph(graph, MESH8.axes)
    strategy, info = ilp_strategy(graph, ops, TOPO, MESH8, time_limit_s=1e-3,
                                  limit_includes_build=True, relax_and_fix=True, fallback=False)
    assert strategy is None and info["status"] == "no solution in time limit"
