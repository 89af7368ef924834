"""Layers under nn.scan plan like unrolled ones where the split runs through the loop: a scan's
options carry a split (the batch) through its body with no communication inside it."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import tag_jax
from tag_jax import rules
from tag_jax.hlo import collective_bytes_by_kind, collectives

TOPO = tag_jax.Topology.preset("2x4-v100-25gbe")


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(64)(nn.gelu(nn.Dense(256)(x))), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()(x, None)
        return jnp.mean(x ** 2)


def _example():
    model = Scanned()
    x = jax.random.normal(jax.random.key(1), (16, 8, 64))
    params = model.init(jax.random.key(0), x)

    def step(p, x):
        value, g = jax.value_and_grad(lambda p: model.apply(p, x))(p)
        return jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, p, g), value

    return step, params, x


def test_forward_and_backward_scans_have_a_batch_split_option():
    step, params, x = _example()
    graph = tag_jax.trace(step, params, x)
    scans = [op for op in graph.ops if op.primitive == "scan"]
    assert len(scans) == 2  # the forward loop, and its transpose in the backward pass
    for op in scans:
        names = [s.name for s in rules.for_graph(graph, {"devices": 8})[op.id]]
        assert names[0] == "R" and "carry 0@devices" in names
    forward = rules.for_graph(graph, {"devices": 8})[scans[0].id]
    split = next(s for s in forward if s.name == "carry 0@devices")
    assert str(split.inputs[0]) == "P(devices, None, None)"  # the carried activations
    assert all(str(t) == "P(None, devices, None, None)" for t in split.outputs[1:])  # saved per layer


def test_data_parallel_through_a_scan_equals_the_unsharded_step_and_its_collectives():
    step, params, x = _example()
    dp = tag_jax.baselines.data_parallel(step, jax.make_mesh((8,), ("devices",)), topology=TOPO)
    plan = dp.plan(params, x)
    chosen = [plan.op_strategies[op.id][plan.strategy.choices[op.id]].name
              for op in plan.graph.ops if op.primitive == "scan"]
    assert chosen == ["carry 0@devices"] * 2
    for a, b in zip(jax.tree_util.tree_leaves(dp(params, x)), jax.tree_util.tree_leaves(jax.jit(step)(params, x))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    compiled = collective_bytes_by_kind(collectives(dp.lower(params, x).compile()))
    assert {k: v for k, v in plan.cost.comm_bytes_by_kind.items() if v} == {k: v for k, v in compiled.items() if v}
