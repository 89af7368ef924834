"""The zoo: toy steps train, real sizes trace abstractly, parameter counts match the papers."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tag_jax import models
from tag_jax.models import gpt2, moe, t5

# Same values, several times faster to compile on XLA:CPU (these tests are compile-bound).
FAST = models.fast_compile_options()
KEY = jax.random.key(0)


def shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


@functools.cache
def example(name, size="toy", **options):
    return models.get(name, size, **options)


@functools.cache
def trained(name, size="toy", steps=3, **options):
    """(example, [state_0 ... state_steps], batch, losses), computed once per session."""
    ex = example(name, size, **options)
    state, batch = ex.init(KEY)
    step = jax.jit(ex.step, compiler_options=FAST)
    states, losses = [state], []
    for _ in range(steps):
        state, metrics = step(state, batch)
        assert metrics["loss"].dtype == jnp.float32 and metrics["loss"].shape == ()
        states.append(state)
        losses.append(float(metrics["loss"]))
    return ex, states, batch, losses


TOYS = [(name, {}) for name in models.names()] + [
    ("gpt2", {"scan_layers": True, "remat": True}),
]


@pytest.mark.parametrize("name,options", TOYS,
                         ids=[n + "".join(f"-{k}" for k in o) for n, o in TOYS])
def test_toy_step_trains(name, options):
    ex, states, batch, losses = trained(name, **options)
    # The abstract state/batch describe exactly what init produces.
    assert shapes(states[0]) == shapes(ex.state)
    assert shapes(batch) == shapes(ex.batch)
    assert states[0]["step"].dtype == jnp.int32 and states[0]["step"].shape == ()
    for before, after in zip(states, states[1:]):
        # Same tree, shapes and dtypes in and out: the step can be iterated and donated.
        assert jax.tree.structure(after) == jax.tree.structure(before)
        assert shapes(after) == shapes(before)
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[0] != losses[1] and losses[2] < losses[0], losses  # same batch: it must fit
    assert int(states[-1]["step"]) == len(losses)
    if "batch_stats" in ex.state:  # BatchNorm's running statistics move with training
        moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                             states[0]["batch_stats"], states[1]["batch_stats"])
        assert all(jax.tree.leaves(moved))


@pytest.mark.parametrize("name", models.names())
def test_step_is_deterministic(name):
    """No dropout and no RNG inside a step: the planner may re-run and re-order it freely."""
    ex = example(name)
    text = str(jax.make_jaxpr(ex.step)(ex.state, ex.batch))
    assert not [w for w in ("random_", "rng_", "threefry") if w in text]


# Exact counts derived from the layer shapes here, and the published figures (each within 2%).
EXACT = {
    ("gpt2", "small"): 124_439_808, ("gpt2", "medium"): 354_823_168,
    ("gpt2", "large"): 774_030_080, ("gpt2", "xl"): 1_557_611_200,
    ("bert", "base"): 109_514_298,    # MLM head, no pooler
    ("bert", "large"): 335_174_458,
    ("vit", "b16"): 86_567_656,
    ("resnet", "50"): 25_557_032,
    ("vgg", "19"): 143_667_240, ("vgg", "19-b12"): 143_667_240,
    ("t5", "base"): 222_903_552,
}
PUBLISHED = {
    ("gpt2", "small"): 124.4e6, ("gpt2", "medium"): 354.8e6, ("gpt2", "large"): 774.0e6,
    ("gpt2", "xl"): 1.5576e9, ("bert", "base"): 110e6, ("bert", "large"): 340e6,
    ("vit", "b16"): 86.6e6, ("resnet", "50"): 25.6e6, ("vgg", "19"): 143.7e6,
    ("vgg", "19-b12"): 143.7e6, ("t5", "base"): 222.9e6,
}
REAL = [(n, s) for n in models.names() for s in models.sizes(n) if s != "toy"]


@pytest.mark.parametrize("name,size", REAL, ids=[f"{n}-{s}" for n, s in REAL])
def test_real_size_traces_abstractly(name, size):
    ex = example(name, size)
    for leaf in jax.tree.leaves((ex.state, ex.batch)):
        assert isinstance(leaf, jax.ShapeDtypeStruct)  # nothing was allocated
    new_state, metrics = jax.eval_shape(ex.step, ex.state, ex.batch)
    assert shapes(new_state) == shapes(ex.state)
    assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32
    if (name, size) in EXACT:
        assert ex.param_count == EXACT[name, size]
        assert abs(ex.param_count / PUBLISHED[name, size] - 1) < 0.02


def test_real_batch_shapes():
    assert example("gpt2", "small").batch["input_ids"].shape == (16, 1024)
    assert example("bert", "base").batch["labels"].shape == (32, 512)
    assert example("vit", "b16").batch["images"].shape == (64, 224, 224, 3)
    assert example("vgg", "19-b12").batch["images"].shape == (12, 224, 224, 3)
    assert example("mlp", "wide").batch["x"].shape[0] == 12
    assert example("t5", "base").batch["targets"].shape == (32, 128)
    rec = example("recommender", "real")
    assert rec.batch["ids"].shape == (4096, 8, 4)
    assert rec.state["params"]["table_7"].shape == (10_000_000, 64)


def test_gpt2_paths_are_readable():
    ex = example("gpt2", "small")
    paths = {jax.tree_util.keystr(p, simple=True, separator="/")
             for p, _ in jax.tree_util.tree_leaves_with_path(ex.state["params"])}
    assert "h_3/attn/c_attn/kernel" in paths and "h_11/mlp/c_proj/bias" in paths
    assert {"wte/embedding", "wpe/embedding", "ln_f/scale"} <= paths
    assert ex.state["params"]["h_0"]["attn"]["c_attn"]["kernel"].shape == (768, 2304)
    scanned = example("gpt2", "small", scan_layers=True).state["params"]["h"]
    assert scanned["attn"]["c_attn"]["kernel"].shape == (12, 768, 2304)


def test_scan_and_remat_match_unrolled():
    """Same weights, stacked for nn.scan (with remat): same loss and same SGD update."""
    flat, (state, new_flat), batch, (loss_flat,) = trained("gpt2", steps=1, optimizer="sgd")
    scan = example("gpt2", "toy", optimizer="sgd", scan_layers=True, remat=True)
    n = flat.config.n_layer
    params = dict(state["params"])
    layers = [params.pop(f"h_{i}") for i in range(n)]
    stacked = {**params, "h": jax.tree.map(lambda *xs: np.stack(xs), *layers)}
    scan_state = {**state, "params": stacked}
    assert shapes(scan_state) == shapes(scan.state)

    new_scan, m_scan = jax.jit(scan.step, compiler_options=FAST)(scan_state, batch)
    np.testing.assert_allclose(loss_flat, m_scan["loss"], rtol=1e-6)
    for i in range(n):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b[i], rtol=1e-5, atol=1e-6),
                     new_flat["params"][f"h_{i}"], new_scan["params"]["h"])
    np.testing.assert_allclose(new_flat["params"]["wte"]["embedding"],
                               new_scan["params"]["wte"]["embedding"], rtol=1e-5, atol=1e-6)


def test_gpt2_is_causal_and_starts_near_uniform():
    ex, states, batch, losses = trained("gpt2")
    model = gpt2.GPT2(ex.config)
    ids = np.asarray(batch["input_ids"])
    changed = ids.copy()
    changed[:, 10:] = (ids[:, 10:] + 1) % ex.config.vocab
    apply = jax.jit(lambda i: model.apply({"params": states[0]["params"]}, i),
                    compiler_options=FAST)
    a, b = np.asarray(apply(ids)), np.asarray(apply(changed))
    np.testing.assert_array_equal(a[:, :10], b[:, :10])  # the past never sees the future
    assert not np.allclose(a[:, 10:], b[:, 10:])
    # Small init: the first loss is close to that of a uniform guess over the vocabulary.
    assert abs(losses[0] - math.log(ex.config.vocab)) < 0.1


def test_moe_routing_respects_capacity():
    g, s, e, k, c = 3, 40, 4, 2, 12
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(1), (g, s, e)) * 3, axis=-1)
    route = jax.jit(moe.route, static_argnums=(1, 2), compiler_options=FAST)
    combine, dispatch = route(probs, k, c)
    combine, dispatch = np.asarray(combine), np.asarray(dispatch)
    assert set(np.unique(dispatch)) <= {0.0, 1.0}
    assert dispatch.sum(axis=(1,)).max() <= 1          # one token per slot
    assert dispatch.sum(axis=(1, 3)).max() <= c        # no expert over capacity
    assert dispatch.sum(axis=(2, 3)).max() <= k        # a token goes to at most k experts
    assert np.all(combine <= dispatch + 1e-7)          # weights only where dispatched
    # 2*40 picks into 4 experts x 12 slots: some tokens must have been dropped.
    assert dispatch.sum() < g * s * k
    # First choices queue ahead of second choices: every token's top-1 pick is kept unless that
    # expert is already full with other top-1 picks.
    top1 = np.argmax(np.asarray(probs), -1)
    for gi in range(g):
        for ei in range(e):
            first = np.flatnonzero(top1[gi] == ei)
            kept = dispatch[gi, first, ei].sum()
            assert kept == min(len(first), c)
    # With room for everyone, each token's gates are kept in full and sum to one.
    combine, dispatch = route(probs, k, s)
    np.testing.assert_allclose(np.asarray(combine).sum(axis=(2, 3)), 1.0, rtol=1e-6)
    assert float(np.asarray(dispatch).sum()) == g * s * k


def test_t5_relative_buckets():
    buckets = jax.jit(t5.relative_buckets, static_argnums=(0, 1),
                      static_argnames=("bidirectional", "num_buckets", "max_distance"))
    b = lambda tq, tk, bi: np.asarray(buckets(tq, tk, bidirectional=bi, num_buckets=32,
                                              max_distance=128))
    bi = b(300, 300, True)
    q = 150
    assert bi[q, q] == 0
    assert bi[q, q - 1] == 1 and bi[q, q - 7] == 7           # exact for near keys in the past
    assert bi[q, q + 1] == 17 and bi[q, q + 7] == 23         # keys after the query: other half
    assert bi[q, q - 20] == 10                               # 8 + int(8 * log(20/8) / log(16))
    assert bi[q, q - 149] == 15 and bi[q, q + 149] == 31     # beyond max_distance: last bucket
    assert np.all(np.diff(bi[q, : q + 1][::-1]) >= 0)        # monotone in distance
    uni = b(300, 300, False)
    assert uni[q, q - 1] == 1 and uni[q, q - 20] == 17      # 16 + int(16 * log(20/16) / log(8))
    assert np.all(uni[q, q:] == 0)                           # the future is one bucket (masked)
    assert uni.max() == 31


def test_recommender_gradient_is_row_sparse():
    """SGD moves exactly the table rows the batch looked up; the rest of each table is untouched."""
    ex, (state, new_state), batch, _ = trained("recommender", steps=1, optimizer="sgd")
    ids = np.asarray(batch["ids"])
    for t in range(len(ex.config.rows)):
        old, new = (np.asarray(s["params"][f"table_{t}"]) for s in (state, new_state))
        moved = np.flatnonzero(np.any(old != new, axis=1))
        np.testing.assert_array_equal(moved, np.unique(ids[:, t, :]))


def test_options_and_errors():
    assert set(models.names()) == {"mlp", "gpt2", "bert", "vit", "resnet", "vgg", "moe", "t5",
                                   "recommender"}
    assert models.sizes("gpt2") == ("toy", "small", "medium", "large", "xl")
    assert models.sizes("vgg") == ("toy", "19", "19-b12")
    ex = example("gpt2", "small", batch=2, seq=128)
    assert ex.batch["input_ids"].shape == (2, 128) and ex.param_count == EXACT["gpt2", "small"]
    assert ex.name == "gpt2" and ex.size == "small" and "n_layer=12" in ex.description
    # SGD keeps no per-parameter state; AdamW keeps two moments.
    sgd = example("mlp", "toy", optimizer="sgd")
    adam = example("mlp", "toy")
    n = len(jax.tree.leaves(adam.state["params"]))
    assert len(jax.tree.leaves(sgd.state["opt_state"])) == 0
    assert len(jax.tree.leaves(adam.state["opt_state"])) == 2 * n + 1
    with pytest.raises(KeyError, match="models:"):
        models.get("gpt3")
    with pytest.raises(KeyError, match="sizes:"):
        models.get("gpt2", "huge")
    with pytest.raises(TypeError, match="n_layer"):
        models.get("gpt2", "toy", layers=3)
    with pytest.raises(ValueError, match="sgd"):
        models.get("mlp", "toy", optimizer="lion")


@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_mixed_precision_step(name):
    """compute_dtype="bfloat16": matmuls/convolutions run in bf16 on cast copies; the state
    (params, optimizer, BatchNorm statistics) stays float32 in and out; the loss is float32 and
    close to the float32 step's."""
    import tag_jax

    ex = models.get(name, "toy", compute_dtype="bfloat16", optimizer="sgd")
    ref = models.get(name, "toy", optimizer="sgd")
    state, batch = ex.init(jax.random.key(0))
    new, metrics = jax.jit(ex.step)(state, batch)
    assert jax.tree_util.tree_map(lambda x: x.dtype, new) == jax.tree_util.tree_map(lambda x: x.dtype, state)
    assert metrics["loss"].dtype == jnp.float32
    _, ref_metrics = jax.jit(ref.step)(state, batch)
    assert float(metrics["loss"]) == pytest.approx(float(ref_metrics["loss"]), rel=2e-2)
    graph = tag_jax.trace(ex.step, ex.state, ex.batch)
    heavy = [op for op in graph.ops if op.primitive in ("dot_general", "conv_general_dilated")]
    assert heavy and all(graph.tensors[op.inputs[0]].dtype == jnp.bfloat16 for op in heavy)
    assert "compute_dtype=bfloat16" in ex.description
    with pytest.raises(ValueError, match="compute_dtype='int8'"):
        models.get(name, "toy", compute_dtype="int8")
