"""The per-gradient compression selector (tag_jax.search.compression) and its emission.

Values, not that code ran: the MILP's optimum equals brute force over its own model; compressed
steps equal uncompressed ones on 8 CPU devices (SGD, toy sizes); compiled collective bytes equal
the prediction; compression never makes a plan slower; compression="none" leaves the plan alone.
"""
import itertools

import jax
import numpy as np
import pytest

import tag_jax
from tag_jax import hlo, models, rules
from tag_jax.baselines import baseline_strategy
from tag_jax.cost import Simulator
from tag_jax.plan import Plan
from tag_jax.search import compression as C
from tag_jax.search.propagate import carried_outputs
from tag_jax.strategy import MeshSpec

MESH = MeshSpec((8,), ("data",), tuple(range(8)))
# 2 nodes x 4 V100 with a slow (100 MB/s) link between them: compression clearly pays
SLOW = tag_jax.Topology.from_json({
    "name": "slow", "devices": [{"kind": "v100", "node": i // 4} for i in range(8)],
    "intra_node": {"bandwidth": 1.5e11, "latency": 2e-6}, "inter_node": {"bandwidth": 1e8, "latency": 1e-5}})


def setup(name, size, topology=SLOW, mesh=MESH, kind="data_parallel", **kw):
    ex = models.get(name, size, optimizer="sgd", **kw)
    g = tag_jax.trace(ex.step, ex.state, ex.batch)
    ops = rules.for_graph(g, mesh.axes)
    st = baseline_strategy(kind, g, ops, mesh)
    sim = Simulator(g, ops, topology, mesh, carried=carried_outputs(g))
    return ex, g, ops, st, sim


def taken(colls):
    """Collectives a no-overflow step runs: row_sparse_psum's dense fallback is an all-reduce in a
    conditional branch (a non-entry computation), never taken with the default capacity."""
    entry = {c.computation for c in colls if c.computation.startswith("main")}
    return [c for c in colls if c.computation in entry or c.kind != "all-reduce"]


def compiled_bytes(plan, state, batch):
    compiled = plan.jit().lower(*plan.shard_args(state, batch)).compile()
    return sum(hlo.collective_bytes_by_kind(taken(hlo.collectives(compiled))).values())


def test_milp_is_optimal_for_its_model_vs_brute_force():
    _, g, ops, st, sim = setup("mlp", "toy")
    base = sim.cost(st, per_op=True)
    cands = C.candidates(g, ops, st, base, "lossy")
    assert len(cands) == 6 and all(c.methods == ("lossless",) + C.LOSSY for c in cands)
    prob, _ = C.build_problem(g, ops, st, sim, cands, base)
    x, info = C.solve(prob)
    best = math_inf = float("inf")
    for pick in itertools.product(range(4), repeat=len(cands)):  # none / lossless / bf16 / int8
        assign = [0] * len(prob.names)
        for k, m in enumerate(pick):
            if m:
                assign[prob.groups[k][m - 1]] = 1
        best = min(best, prob.objective(assign))
    assert best < math_inf
    assert info["objective"] == pytest.approx(best, rel=1e-9)
    assert prob.objective(x) < prob.objective([0] * len(prob.names))


@pytest.mark.parametrize("name,size,kw,methods", [
    ("mlp", "toy", {}, {"sfb"}),
    ("recommender", "toy", {"rows": (4096,) * 8}, {"sfb", "row_sparse"}),
])
def test_compressed_step_equals_uncompressed_and_compiled_bytes_equal_predicted(name, size, kw, methods):
    ex, g, ops, st, sim = setup(name, size, **kw)
    sel = C.select_compression(g, ops, st, sim, "lossless")
    assert {c.method for c in sel.choices} == methods
    assert sel.cost.step_time_s < sel.base_cost.step_time_s
    p0 = Plan.build(g, st, ops, SLOW)
    p1 = Plan.build(g, sel.strategy, ops, SLOW, compression=sel.choices, uncompressed_cost=sel.base_cost)
    assert p1.cost.step_time_s == pytest.approx(sel.cost.step_time_s, rel=1e-12)
    state, batch = ex.init(jax.random.key(0))
    want = p0.jit()(*p0.shard_args(state, batch))
    got = p1.jit()(*p1.shard_args(state, batch))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    assert compiled_bytes(p0, state, batch) == p0.cost.comm_bytes
    assert compiled_bytes(p1, state, batch) == p1.cost.comm_bytes
    # per-gradient savings come from one simulation per gradient; together they add up (a gather
    # shared between gradients can be attributed twice, hence the tolerance)
    saved = sum(c.bytes_saved for c in sel.choices)
    assert p0.cost.comm_bytes - p1.cost.comm_bytes == pytest.approx(saved, rel=0.01)
    text = p1.summary()
    assert "compression: " in text and all(c.gradient in text for c in sel.choices)


def test_plan_json_keeps_the_compression(tmp_path):
    ex, g, ops, st, sim = setup("recommender", "toy", rows=(4096,) * 8)
    sel = C.select_compression(g, ops, st, sim, "lossless")
    p1 = Plan.build(g, sel.strategy, ops, SLOW, compression=sel.choices, uncompressed_cost=sel.base_cost)
    path = str(tmp_path / "plan.json")
    p1.save(path)
    back = Plan.load(path, ex.step, ex.state, ex.batch, topology=SLOW)
    assert back.compression == sel.choices
    assert back.cost.step_time_s == pytest.approx(p1.cost.step_time_s, rel=1e-9)
    assert back.uncompressed_cost.step_time_s == pytest.approx(sel.base_cost.step_time_s)


@pytest.mark.parametrize("name", ["mlp", "gpt2", "vgg", "recommender"])
@pytest.mark.parametrize("preset", ["2x4-v100-25gbe", "1x8-a100-nvlink"])
def test_never_worse_than_without(name, preset):
    topo = tag_jax.Topology.preset(preset)
    for kind in ("data_parallel", "fsdp"):
        _, g, ops, st, sim = setup(name, "toy", topology=topo, kind=kind)
        for mode in ("lossless", "lossy"):
            sel = C.select_compression(g, ops, st, sim, mode, memory_limit=1e12)
            assert sel.cost.step_time_s <= sel.base_cost.step_time_s
            assert sel.base_cost.step_time_s == sim.cost(st).step_time_s


def test_none_gives_the_uncompressed_plan(monkeypatch):
    _, g, ops, st, sim = setup("mlp", "toy")
    sel = C.select_compression(g, ops, st, sim, "none")
    assert sel.strategy == st and sel.choices == () and sel.cost.step_time_s == sim.cost(st).step_time_s
    # auto_shard's plumbing, independent of what a wall-clock search finds on a busy machine (an
    # annealed row-sharded plan may beat every compressed one): the search is made to return the
    # data-parallel plan, whose table gradients row-sparse exchange shrinks on the slow link.
    from tag_jax.search import planner
    from tag_jax.search.anneal import SearchResult

    def data_parallel_search(graph, topology, device_ids, **_):
        mesh = MeshSpec((len(device_ids),), ("data",), tuple(device_ids))
        ops = rules.for_graph(graph, mesh.axes)
        dp = baseline_strategy("data_parallel", graph, ops, mesh)
        cost = Simulator(graph, ops, topology, mesh, carried=carried_outputs(graph)).cost(dp)
        return SearchResult(dp, cost, 1, 0.0, {dp.name: cost.step_time_s}, {}, ())

    monkeypatch.setattr(planner, "search", data_parallel_search)
    ex = models.get("recommender", "toy", optimizer="sgd", rows=(4096,) * 8)
    plans = {m: tag_jax.auto_shard(ex.step, jax.devices(), topology=SLOW, time_budget_s=0.5,
                                   compression=m, policy=None, uneven=False).plan(ex.state, ex.batch)
             for m in ("none", "lossless")}
    assert plans["none"].compression == () and plans["none"].uncompressed_cost is None
    assert "compression: none" in plans["none"].summary()
    lossless = plans["lossless"]
    assert lossless.compression, lossless.summary()
    assert {c.method for c in lossless.compression} <= {"sfb", "row_sparse", "sfb+row_sparse"}
    assert lossless.cost.step_time_s < lossless.uncompressed_cost.step_time_s
    assert lossless.uncompressed_cost.step_time_s == pytest.approx(plans["none"].cost.step_time_s)
    with pytest.raises(C.CompressionError, match="compression='fast'"):
        tag_jax.auto_shard(ex.step, jax.devices(), topology=SLOW, compression="fast")
