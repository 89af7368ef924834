"""Per-device breakdown of a predicted step (tag_jax.cost.breakdown) and its table in Plan.summary()."""
import dataclasses
import re

import jax
import pytest

import tag_jax
from tag_jax import models, rules
from tag_jax.baselines import baseline_strategy
from tag_jax.cost import Simulator, breakdown, group_rows
from tag_jax.plan import Plan, _bytes, simulate
from tag_jax.search.propagate import carried_outputs
from tag_jax.strategy import MeshSpec


@pytest.fixture(scope="module")
def gpt2():
    ex = models.get("gpt2", "toy")
    return ex, tag_jax.trace(ex.step, ex.state, ex.batch)


def _plan(ex, preset, kind="data_parallel"):
    topo = tag_jax.Topology.preset(preset)
    mesh = jax.make_mesh((8,), ("devices",))
    fn = {"data_parallel": tag_jax.baselines.data_parallel, "fsdp": tag_jax.baselines.fsdp}[kind]
    return fn(ex.step, mesh, topology=topo).plan(ex.state, ex.batch), topo


def test_slowest_device_sets_the_pace(gpt2):
    ex, _ = gpt2
    plan, topo = _plan(ex, "4xa100-4xv100")  # V100 is slowest in every figure
    rows = plan.device_breakdown()
    c = plan.cost
    assert [r.device for r in rows] == list(plan.strategy.mesh.device_ids)
    v100 = [r for r in rows if r.kind == "v100"]
    a100 = [r for r in rows if r.kind == "a100"]
    assert len(v100) == len(a100) == 4
    for r in v100:  # the slowest device's busy time is the Cost's compute time
        assert r.compute_s == pytest.approx(c.compute_s, rel=1e-9)
        assert r.idle_s == pytest.approx(0.0, abs=1e-12)
    # faster devices: the same work at their own figures, the rest waiting
    a, v = topo.device(a100[0].device), topo.device(v100[0].device)
    ratios = (v.flops / a.flops, v.flops_fp32 / a.flops_fp32, v.memory_bandwidth / a.memory_bandwidth)
    for r in a100:
        assert min(ratios) * c.compute_s <= r.compute_s * (1 + 1e-9)
        assert r.compute_s <= max(ratios) * c.compute_s * (1 + 1e-9)
        assert r.idle_s > 0
        assert r.compute_s + r.idle_s == pytest.approx(c.compute_s, rel=1e-9)
    # the A100 figure is exactly what the Simulator says on an all-A100 cluster of the same mesh
    same = Simulator(plan.graph, plan.op_strategies, tag_jax.Topology.preset("1x8-a100-nvlink"),
                     plan.strategy.mesh, carried=carried_outputs(plan.graph))
    assert a100[0].compute_s == pytest.approx(same.cost(plan.strategy).compute_s, rel=1e-9)


def test_memory_and_communication_rows(gpt2):
    ex, _ = gpt2
    plan, topo = _plan(ex, "tag-hetero")
    rows = plan.device_breakdown()
    c = plan.cost
    for r in rows:
        assert r.peak_memory_bytes == c.peak_memory_bytes
        assert r.memory_bytes == topo.device_memory(r.device)
        assert r.memory_fraction == pytest.approx(c.peak_memory_bytes / topo.device_memory(r.device))
        assert r.comm_bytes == c.comm_bytes
        # a 1-D mesh: every collective has one group, all devices wait for all of it
        assert r.comm_s == pytest.approx(c.comm_s, rel=1e-9)
        assert r.node == topo.device(r.device).node
        # no device is slowest in all figures (P100 fp32, 1080Ti 16-bit and bandwidth): the pace
        # the Simulator charges is below none of them
        assert 0 < r.compute_s <= c.compute_s * (1 + 1e-9) and r.idle_s >= 0
    by_kind = {r.kind: r.compute_s for r in rows}
    assert by_kind["v100"] < by_kind["p100"] and by_kind["v100"] < by_kind["1080ti"]
    # equal when one device is slowest for every op (the toy model is memory bound: the 1080Ti)
    assert max(by_kind.values()) <= c.compute_s * (1 + 1e-9)
    assert rows[0].memory_fraction > 0


def test_per_group_communication_on_two_nodes(gpt2):
    ex, graph = gpt2
    topo = tag_jax.Topology.preset("2x4-v100-25gbe")
    # a (4, 2) mesh whose second axis pairs devices across the two nodes, first axis inside one
    spec = MeshSpec((4, 2), ("a", "b"), (0, 4, 1, 5, 2, 6, 3, 7))
    strats = rules.for_graph(graph, spec.axes)
    strategy = baseline_strategy("fsdp", graph, strats, spec)
    carried = carried_outputs(graph)
    cost = Simulator(graph, strats, topo, spec, carried=carried).cost(strategy, per_op=True)
    rows = breakdown(graph, strats, strategy, topo, cost, carried=carried)
    assert all(0 < r.comm_s <= cost.comm_s * (1 + 1e-9) for r in rows)
    # priced by hand: each device's groups
    want = {i: 0.0 for i in spec.device_ids}
    for *_, comms, _secs in cost.reshards:
        for cm in comms:
            for g in spec.groups(cm.axes):
                for i in g:
                    want[i] += topo.collective_time(cm.kind, cm.bytes, g)
    assert {r.device: r.comm_s for r in rows} == pytest.approx(want, rel=1e-9)
    # the Cost sums the slowest group of each collective: at least any one device's total
    assert max(want.values()) <= cost.comm_s * (1 + 1e-9)
    assert all(r.compute_s == cost.compute_s and r.idle_s == 0 for r in rows)  # homogeneous


def test_summary_lists_every_device(gpt2):
    ex, _ = gpt2
    plan, topo = _plan(ex, "tag-hetero")
    text = plan.summary()
    lines = text.splitlines()
    head = next(k for k, l in enumerate(lines) if l.startswith("  per device (busy"))
    assert lines[head + 1].split() == ["device", "kind", "node", "busy", "idle", "communication",
                                       "comm", "bytes", "peak", "memory", "of", "memory"]
    table = lines[head + 2: head + 2 + 8]
    for r, line in zip(plan.device_breakdown(), table):
        f = line.split()
        assert f[:3] == [str(r.device), r.kind, str(r.node)]
        pct = float(re.search(r"\(([0-9.e-]+)%\)", line).group(1))
        assert pct == pytest.approx(100 * r.memory_fraction, rel=0.05)
        assert _bytes(r.memory_bytes) in line and _bytes(r.peak_memory_bytes) in line
    assert "compression" in lines[head + 10]
    rows = {r.device: r for r in plan.device_breakdown()}
    assert rows[2].memory_fraction > rows[0].memory_fraction  # an 11 GB 1080Ti, a 16 GB V100


def test_summary_groups_many_devices(gpt2):
    """64 devices (half A100, half V100 nodes): one row per kind, ids as ranges."""
    ex, graph = gpt2
    topo = tag_jax.Topology.preset("8x8-a100-ib")
    v100 = tag_jax.Topology.preset("2x4-v100-25gbe").device(0)
    topo = dataclasses.replace(topo, devices=tuple(
        d if d.node < 4 else dataclasses.replace(d, kind="v100", flops=v100.flops,
                                                 flops_fp32=v100.flops_fp32, memory=v100.memory,
                                                 memory_bandwidth=v100.memory_bandwidth)
        for d in topo.devices))
    spec = MeshSpec((64,), ("devices",), tuple(range(64)))
    strats = rules.for_graph(graph, spec.axes)
    strategy = baseline_strategy("data_parallel", graph, strats, spec)
    cost = simulate(graph, strats, topo, strategy)
    plan = Plan(mesh=None, strategy=strategy, in_shardings=None, out_shardings=None, cost=cost,
                arguments=(), function=graph.name, fingerprint="", graph=graph,
                op_strategies=strats, topology=topo)
    rows = plan.device_breakdown()
    assert len(rows) == 64
    grouped = group_rows(rows)
    assert [(g.kind, g.devices) for g in grouped] == [("a100-80gb", tuple(range(32))),
                                                           ("v100", tuple(range(32, 64)))]
    assert grouped[1].compute_s == pytest.approx(cost.compute_s) and grouped[0].idle_s > 0
    text = plan.summary()
    assert "64 devices, like devices merged" in text
    table = [l for l in text.splitlines() if l.startswith(("    0-31 (32)", "    32-63 (32)"))]
    assert len(table) == 2
    assert table[0].split()[2:4] == ["a100-80gb", "0-3"] and table[1].split()[2:4] == ["v100", "4-7"]
