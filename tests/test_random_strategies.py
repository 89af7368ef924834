"""Random valid strategies (`tag_jax.search.random_strategy`) emit programs equal to the unsharded step.

A CI-sized, seeded sample of `benchmarks/equivalence.py`: SGD steps (see DESIGN.md) of toy models on
1-D and 2-D meshes of 8 CPU devices, compared leaf by leaf (float32, rtol 1e-5, atol 1e-6).
"""
import jax
import numpy as np
import pytest

import tag_jax
from tag_jax import emit, models, rules
from tag_jax.plan import Plan
from tag_jax.search.random_strategy import input_sharding_options, random_strategy
from tag_jax.strategy import MeshSpec

FAST = models.fast_compile_options()
MESHES = {"1d": MeshSpec((8,), ("d",), tuple(range(8))), "2x4": MeshSpec((2, 4), ("x", "y"), tuple(range(8)))}
SMALLER = {"recommender": {"rows": (64, 128, 256, 512)}}
MODELS = ("mlp", "vgg", "recommender", "gpt2")
_CACHE = {}


def example(name):
    if name not in _CACHE:
        ex = models.get(name, "toy", optimizer="sgd", **SMALLER.get(name, {}))
        state, batch = ex.init(jax.random.key(0))
        ref = jax.jit(ex.step, compiler_options=FAST)(state, batch)
        _CACHE[name] = (ex, state, batch, ref, tag_jax.trace(ex.step, ex.state, ex.batch))
    return _CACHE[name]


def test_input_sharding_options_are_valid_and_complete():
    mesh = MESHES["2x4"]
    opts = input_sharding_options((8, 6), mesh)
    assert all(not o.partial for o in opts)
    assert {str(o) for o in opts} == {"P(None, None)", "P(x, None)", "P(y, None)", "P((x,y), None)",
                                      "P(None, x)", "P(y, x)"}


@pytest.mark.parametrize("name,mesh_kind", [
    (n, m) for n in MODELS for m in ("1d", "2x4")])
def test_random_strategies_match_unsharded(name, mesh_kind):
    ex, state, batch, ref, graph = example(name)
    mesh = MESHES[mesh_kind]
    ops = rules.for_graph(graph, mesh.axes)
    names = set()
    for k in range(3):
        rng = np.random.default_rng([7, k, MODELS.index(name), sorted(MESHES).index(mesh_kind)])
        strategy = random_strategy(graph, ops, mesh, rng, mode=("uniform", "mix")[k % 2])
        names.add(strategy.name.split("(")[0].split("-shuffled")[0])
        emit.check(graph, strategy, ops, mesh.axes)
        fn = Plan.build(graph, strategy, ops, cost=None).jit(compiler_options=FAST)
        jax.tree_util.tree_map(
            lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6,
                                                    err_msg=f"{name} {mesh_kind} {strategy.name} #{k}"),
            fn(state, batch), ref)
    assert names == {"random-uniform", "random-mix"}
