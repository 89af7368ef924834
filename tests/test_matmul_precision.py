"""float32 matmuls at JAX's default precision: TF32 on Ampere+, one bf16 pass on TPU, true fp32 else."""
import dataclasses

import jax
import jax.numpy as jnp
import pytest

import tag_jax
from tag_jax import rules
from tag_jax.cost import Simulator
from tag_jax.cost.simulate import COMPUTE_EFFICIENCY
from tag_jax.strategy import MeshSpec, Strategy, TensorSharding
from tag_jax.topology import TopologyError

LINK = {"bandwidth": 1.5e11, "latency": 2e-6}
N = 2048  # large enough that the matmul is compute-bound on every device kind below


def _compute_s(fn, topo_name: str, dtype=jnp.float32) -> float:
    x = jax.ShapeDtypeStruct((N, N), dtype)
    graph = tag_jax.trace(fn, x, x)
    topo = tag_jax.Topology.preset(topo_name)
    mesh = MeshSpec((1,), ("data",), (0,))
    ops = rules.for_graph(graph, mesh.axes)
    strategy = Strategy(mesh, (0,) * len(graph.ops),
                        tuple(TensorSharding.replicated(2) for _ in graph.inputs))
    return Simulator(graph, ops, topo, mesh).cost(strategy).compute_s


def _at(flops: float) -> float:
    return 2 * N ** 3 / (flops * COMPUTE_EFFICIENCY)


def test_a100_runs_float32_matmuls_at_tf32():
    assert _compute_s(jnp.matmul, "1x8-a100-nvlink") == pytest.approx(_at(156e12), rel=1e-6)


def test_precision_highest_runs_at_true_fp32():
    def highest(a, b):
        return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)

    assert _compute_s(highest, "1x8-a100-nvlink") == pytest.approx(_at(19.5e12), rel=1e-6)
    with jax.default_matmul_precision("float32"):
        assert _compute_s(jnp.matmul, "1x8-a100-nvlink") == pytest.approx(_at(19.5e12), rel=1e-6)


def test_volta_has_no_fast_fp32_path_and_tpu_takes_one_bf16_pass():
    assert _compute_s(jnp.matmul, "2x4-v100-25gbe") == pytest.approx(_at(15.7e12), rel=1e-6)
    assert _compute_s(jnp.matmul, "tpu-v4-2x2x2") == pytest.approx(_at(275e12), rel=1e-6)
    # 16-bit operands keep the 16-bit peak everywhere
    assert _compute_s(jnp.matmul, "1x8-a100-nvlink", jnp.bfloat16) == pytest.approx(_at(312e12), rel=1e-6)


def test_json_round_trip_and_own_figures():
    topo = tag_jax.Topology.preset("4xa100-4xv100")
    back = tag_jax.Topology.from_json(topo.to_json())
    assert back.device(0).flops_fp32_matmul == 156e12 and back.device(4).flops_fp32_matmul is None
    assert back.fingerprint() == topo.fingerprint()
    # a device given its own fp32 peak is not silently given the known kind's TF32 figure
    def one(**device):
        return tag_jax.Topology.from_json({"devices": [{"kind": "a100", **device}], "intra_node": LINK})

    own = one(flops_fp32=10e12)
    assert own.device(0).matmul_flops_fp32 == 10e12
    told = one(flops_fp32_matmul=100e12)
    assert told.device(0).matmul_flops_fp32 == 100e12
    with pytest.raises(TopologyError, match=r"devices\[0\]\.flops_fp32_matmul"):
        one(flops_fp32_matmul=-1)
    assert dataclasses.replace(topo.device(0), flops_fp32_matmul=None).matmul_flops_fp32 == 19.5e12
