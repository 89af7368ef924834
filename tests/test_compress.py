"""Compressed psums: exact methods equal lax.psum, lossy ones stay in their bounds, costs match the HLO.

Exactness is checked two ways: on integer-valued float32 inputs every summation order gives the same
bits (so results must be identical), and on Gaussian inputs to rtol 1e-6 (atol 1e-6 of the largest
element, for entries that cancel to near zero).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from tag_jax import hlo
from tag_jax.compress import (
    costs, dot_weight_shape, lossy_psum_bf16, lossy_psum_int8, row_sparse_embed, row_sparse_psum, sfb_conv,
    sfb_conv_grad, sfb_dense, sfb_dot_grad)

M = 8
MESH = jax.make_mesh((M,), ("d",), axis_types=(AxisType.Auto,))
RNG = np.random.default_rng(0)


def smap(fn, in_specs, out_specs, mesh=MESH):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs))


def gauss(*shape):
    return jnp.asarray(RNG.normal(size=shape), jnp.float32)


def ints(*shape):
    return jnp.asarray(RNG.integers(-3, 4, size=shape), jnp.float32)


def close(a, b):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * max(np.abs(b).max(), 1e-30))


# ----------------------------------------------------------------------------- SFB


DOTS = [  # (local x shape, w shape, dimension numbers, x_axis): dy = dot_general(x, w, dn)
    ((4, 6), (6, 5), (((1,), (0,)), ((), ())), 0),
    ((3, 4, 6), (6, 5), (((2,), (0,)), ((), ())), 0),          # tokens: dW sums batch and sequence
    ((2, 3, 6), (3, 6, 5), (((2,), (1,)), ((1,), (0,))), 0),   # per-head weights (a batch dim)
    ((6, 4), (6, 5), (((0,), (0,)), ((), ())), 1),             # batch on x's dim 1
]


def local_grad(fwd, w_shape, dy):
    """This device's weight gradient of ``dy = fwd(w)`` (w typed varying, so JAX adds no psum of its own)."""
    w = lax.pcast(jnp.zeros(w_shape, dy.dtype), "d", to="varying")
    return jax.linear_transpose(fwd, w)(dy)[0]


def local_dot_grad(x, dy, w_shape, dn):
    return local_grad(lambda w: lax.dot_general(x, w, dn), w_shape, dy)


@pytest.mark.parametrize("x_shape, w_shape, dn, x_axis", DOTS)
def test_sfb_dot_grad_equals_psum(x_shape, w_shape, dn, x_axis):
    dy_shape = jax.eval_shape(lambda x, w: lax.dot_general(x, w, dn), jax.ShapeDtypeStruct(x_shape, jnp.float32),
                              jax.ShapeDtypeStruct(w_shape, jnp.float32)).shape
    assert dot_weight_shape(x_shape, dy_shape, dn) == w_shape
    dy_axis = len(dn[1][0]) + [d for d in range(len(x_shape)) if d not in dn[0][0] + dn[1][0]].index(x_axis)
    glob = lambda shape, ax: tuple(s * M if i == ax else s for i, s in enumerate(shape))
    xs, dys = [None] * len(x_shape), [None] * len(dy_shape)
    xs[x_axis], dys[dy_axis] = "d", "d"
    f = smap(lambda x, dy: (sfb_dot_grad(x, dy, "d", dimension_numbers=dn, x_axis=x_axis),
                            lax.psum(local_dot_grad(x, dy, w_shape, dn), "d")),
             (P(*xs), P(*dys)), (P(), P()))
    for make in (ints, gauss):
        got, want = f(make(*glob(x_shape, x_axis)), make(*glob(dy_shape, dy_axis)))
        assert got.shape == w_shape
        (np.testing.assert_array_equal if make is ints else close)(got, want)


CONVS = [  # (local x, kernel, conv kwargs)
    ((2, 3, 9, 9), (4, 3, 3, 3), dict(window_strides=(2, 1), padding="SAME")),
    ((2, 7, 8, 4), (3, 2, 2, 6), dict(window_strides=(1, 1), padding=((1, 0), (0, 2)), rhs_dilation=(2, 1),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)),
]


@pytest.mark.parametrize("x_shape, k_shape, kw", CONVS)
def test_sfb_conv_grad_equals_psum(x_shape, k_shape, kw):
    conv = functools.partial(lax.conv_general_dilated, **kw)
    dy_shape = jax.eval_shape(conv, jax.ShapeDtypeStruct(x_shape, jnp.float32),
                              jax.ShapeDtypeStruct(k_shape, jnp.float32)).shape
    batch = lambda s: (s[0] * M, *s[1:])

    def both(x, dy):
        local = local_grad(lambda w: conv(x, w), k_shape, dy)
        return sfb_conv_grad(x, dy, "d", kernel_shape=k_shape, **kw), lax.psum(local, "d")

    f = smap(both, (P("d"), P("d")), (P(), P()))
    for make in (ints, gauss):
        got, want = f(make(*batch(x_shape)), make(*batch(dy_shape)))
        (np.testing.assert_array_equal if make is ints else close)(got, want)


def grads(loss, w, x):
    return smap(jax.grad(loss, argnums=(0, 1)), (P(), P("d")), (P(), P("d")))(w, x)


def test_sfb_layers_give_the_plain_gradients_under_grad():
    w, x = gauss(6, 5), gauss(M * 3, 4, 6)
    plain = grads(lambda w, x: jnp.sum(jnp.sin(x @ w)), w, x)
    sfb = grads(lambda w, x: jnp.sum(jnp.sin(sfb_dense(x, w, "d"))), w, x)
    for a, b in zip(sfb, plain):
        close(a, b)
    x_shape, k_shape, kw = CONVS[1]
    k, x = gauss(*k_shape), gauss(M * x_shape[0], *x_shape[1:])
    plain = grads(lambda k, x: jnp.sum(jnp.tanh(lax.conv_general_dilated(x, k, **kw))), k, x)
    sfb = grads(lambda k, x: jnp.sum(jnp.tanh(sfb_conv(x, k, "d", **kw))), k, x)
    for a, b in zip(sfb, plain):
        close(a, b)


def test_sfb_dot_grad_differentiates_and_batches():
    x, dy, c = gauss(M * 4, 6), gauss(M * 4, 5), gauss(6, 5)
    sfb = lambda x, dy: jnp.sum(c * sfb_dot_grad(x, dy, "d"))
    ref = lambda x, dy: jnp.sum(c * lax.psum(x.T @ dy, "d"))
    f = lambda L: smap(jax.grad(L, argnums=(0, 1)), (P("d"), P("d")), (P("d"), P("d")))(x, dy)
    for a, b in zip(f(sfb), f(ref)):
        close(a, b)
    xv, dyv = gauss(3, M * 4, 6), gauss(3, M * 4, 5)  # vmap over a leading, unsharded dim
    got, want = smap(lambda x, dy: (jax.vmap(lambda a, b: sfb_dot_grad(a, b, "d"))(x, dy),
                                    lax.psum(jnp.einsum("vbi,vbo->vio", x, dy), "d")),
                     (P(None, "d"), P(None, "d")), (P(), P()))(xv, dyv)
    close(got, want)


def test_sfb_works_on_an_explicit_mesh():
    mesh = jax.make_mesh((M,), ("d",))  # Explicit axes, jax.make_mesh's default
    x = jax.device_put(ints(M * 2, 6), NamedSharding(mesh, P("d")))
    dy = jax.device_put(ints(M * 2, 5), NamedSharding(mesh, P("d")))
    got, want = smap(lambda x, dy: (sfb_dot_grad(x, dy, "d"), lax.psum(x.T @ dy, "d")),
                     (P("d"), P("d")), (P(), P()), mesh)(x, dy)
    np.testing.assert_array_equal(got, want)


def test_without_vma_checks_the_exact_methods_still_equal_psum():
    """Under ``check_vma=False`` (as tag_jax.rules.validate runs) the primitives keep their values."""
    x, dy, idx = ints(M * 2, 6), ints(M * 2, 5), jnp.asarray(RNG.integers(0, 9, (M * 2,)), jnp.int32)

    def both(x, dy, i):
        dense = jnp.zeros((9, 5)).at[i].add(dy)
        return (sfb_dot_grad(x, dy, "d"), lax.psum(x.T @ dy, "d"),
                row_sparse_psum(i, dy, "d", num_rows=9, capacity=1), lax.psum(dense, "d"))

    f = jax.jit(jax.shard_map(both, mesh=MESH, in_specs=(P("d"),) * 3, out_specs=(P(),) * 4, check_vma=False))
    a, b, c, d = f(x, dy, idx)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(c, d)


def test_sfb_errors_name_the_argument():
    x, dy = jnp.ones((M * 2, 6)), jnp.ones((M * 2, 5))
    with pytest.raises(ValueError, match="x_axis=1"):
        smap(lambda x, dy: sfb_dot_grad(x, dy, "d", x_axis=1), (P("d"), P("d")), P())(x, dy)
    with pytest.raises(ValueError, match=r"dy must start with"):
        smap(lambda x, dy: sfb_dot_grad(x, dy.T, "d"), (P("d"), P("d")), P())(x, dy)
    with pytest.raises(ValueError, match="mesh axis"):
        sfb_dot_grad(x, dy, "nope")
    with pytest.raises(ValueError, match=r"w \(6, 5\) varies over mesh axes \['d'\]"):
        smap(jax.grad(lambda w, x: jnp.sum(sfb_dense(x, w, "d"))), (P("d"), P("d")), P("d"))(
            jnp.ones((M * 6, 5)), x)
    with pytest.raises(ValueError, match="kernel_shape"):
        smap(lambda x: sfb_conv_grad(x, x, "d", kernel_shape=(4, 3, 3, 3), window_strides=(1, 1), padding="SAME"),
             P("d"), P())(jnp.ones((M, 3, 5, 5)))


# ----------------------------------------------------------------------------- row-sparse


def dense_reference(idx, rows, num_rows):
    idx, rows = np.asarray(idx).ravel(), np.asarray(rows).reshape(idx.size, -1)
    out = np.zeros((num_rows, rows.shape[1]), np.float64)
    for i, r in zip(idx, rows):
        if 0 <= i < num_rows:
            out[i] += r
    return out


def row_sparse_pair(num_rows, capacity):
    """(row-sparse result, plain psum of the dense local gradients)."""
    def both(i, r):
        valid = (i >= 0) & (i < num_rows)
        dense = jnp.zeros((num_rows, r.shape[-1]), r.dtype).at[jnp.where(valid, i, num_rows)].add(r, mode="drop")
        return row_sparse_psum(i, r, "d", num_rows=num_rows, capacity=capacity), lax.psum(dense, "d")
    return smap(both, (P("d"), P("d")), (P(), P()))


CASES = {  # name: (per-device indices (M, n), num_rows, capacity)
    "random_with_padding_and_out_of_range": (RNG.integers(-3, 45, (M, 6)), 40, None),
    "all_rows_touched": (np.tile(RNG.permutation(6), (M, 1)), 6, None),
    "repeated": (np.full((M, 6), 3), 40, 1),
    "empty_shards": (np.where(np.arange(M)[:, None] < 5, -1, RNG.integers(0, 40, (M, 6))), 40, None),
    "capacity_exceeded_everywhere": (np.tile(np.arange(6), (M, 1)) + 6 * np.arange(M)[:, None], 48, 2),
    "capacity_exceeded_on_one_device": (np.concatenate([np.arange(6)[None], np.full((M - 1, 6), 7)]), 40, 2),
}


@pytest.mark.parametrize("case", CASES)
def test_row_sparse_psum_equals_psum(case):
    idx, num_rows, capacity = CASES[case]
    idx = jnp.asarray(idx.reshape(-1), jnp.int32)
    f = row_sparse_pair(num_rows, capacity)
    for make in (ints, gauss):
        rows = make(idx.size, 3)
        got, want = f(idx, rows)
        np.testing.assert_allclose(want, dense_reference(idx, rows, num_rows), rtol=1e-6, atol=1e-5)
        (np.testing.assert_array_equal if make is ints else close)(got, want)
    # With capacity 2 and more distinct rows than that, the sparse branch would drop rows: only the dense
    # fallback can be exact, so exactness above shows every device took it (the psum would hang otherwise).


def test_row_sparse_psum_differentiates_batches_and_keeps_row_shape():
    idx = jnp.asarray(RNG.integers(-1, 12, (M * 5,)), jnp.int32)
    rows, c = gauss(M * 5, 2, 3), gauss(12, 2, 3)
    dense = lambda i, r: jnp.zeros((12, 2, 3)).at[jnp.where(i >= 0, i, 12)].add(r, mode="drop")
    sparse = lambda r, i: jnp.sum(c * row_sparse_psum(i, r, "d", num_rows=12, capacity=3))
    plain = lambda r, i: jnp.sum(c * lax.psum(dense(i, r), "d"))
    f = lambda L: smap(jax.grad(L), (P("d"), P("d")), P("d"))(rows, idx)
    close(f(sparse), f(plain))
    iv, rv = idx.reshape(1, -1).repeat(3, 0).at[1].set(0), gauss(3, M * 5, 2, 3)
    got, want = smap(lambda i, r: (jax.vmap(lambda a, b: row_sparse_psum(a, b, "d", num_rows=12, capacity=2))(i, r),
                                   lax.psum(jax.vmap(dense)(i, r), "d")),
                     (P(None, "d"), P(None, "d")), (P(), P()))(iv, rv)
    close(got, want)


def test_row_sparse_embed_gives_the_plain_table_gradient():
    table, ids = gauss(30, 4), jnp.asarray(RNG.integers(-1, 30, (M * 3, 5)), jnp.int32)

    def plain(t, i):
        valid = (i >= 0) & (i < t.shape[0])
        return jnp.where(valid[..., None], jnp.take(t, jnp.where(valid, i, 0), axis=0), 0)

    g = lambda emb: smap(jax.grad(lambda t, i: jnp.sum(jnp.sin(emb(t, i)))), (P(), P("d")), P())(table, ids)
    close(g(lambda t, i: row_sparse_embed(t, i, "d", capacity=4)), g(plain))
    close(g(lambda t, i: row_sparse_embed(t, i, "d")), g(plain))
    out = smap(lambda t, i: row_sparse_embed(t, i, "d"), (P(), P("d")), P("d"))(table, ids)
    np.testing.assert_array_equal(out, plain(table, ids))


def test_row_sparse_errors():
    with pytest.raises(ValueError, match="must start with the indices' shape"):
        smap(lambda i, r: row_sparse_psum(i, r, "d", num_rows=4), (P("d"), P("d")), P())(
            jnp.zeros((M * 2,), jnp.int32), jnp.zeros((M * 3, 2)))
    with pytest.raises(ValueError, match="capacity=0"):
        smap(lambda i, r: row_sparse_psum(i, r, "d", num_rows=4, capacity=0), (P("d"), P("d")), P())(
            jnp.zeros((M,), jnp.int32), jnp.zeros((M, 2)))
    with pytest.raises(ValueError, match="indices must be integers"):
        smap(lambda i, r: row_sparse_psum(i, r, "d", num_rows=4), (P("d"), P("d")), P())(
            jnp.zeros((M,)), jnp.zeros((M, 2)))


# ----------------------------------------------------------------------------- lossy


def test_lossy_psums_stay_in_their_stated_bounds_and_are_not_exact():
    # rows of very different magnitudes (what per-row scales are for), drawn here: the module's
    # RNG depends on which tests ran first in this worker
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(M * 5, 7)) * np.exp(2 * rng.normal(size=(M * 5, 1))), jnp.float32)
    blocks = np.asarray(x, np.float64).reshape(M, 5, 7)
    exact = blocks.sum(0)
    f = smap(lambda v: (lossy_psum_bf16(v, "d"), lossy_psum_int8(v, "d"), lossy_psum_int8(v, "d", per_row=True)),
             P("d"), (P(), P(), P()))
    bf16, int8, int8_row = (np.asarray(a, np.float64) for a in f(x))
    slack = 1 + 1e-5  # float32 arithmetic around the quantization
    assert np.all(np.abs(bf16 - exact) <= M * 2.0 ** -8 * np.abs(blocks).sum(0) * slack)
    s = np.abs(blocks).max(axis=(1, 2)) / 127                      # per-tensor sender scales
    t = (np.abs(exact).max() + s.sum() / 2) / 127                  # bound on the re-quantization scale
    assert np.abs(int8 - exact).max() <= (s.sum() / 2 + t / 2) * slack
    s_row = np.abs(blocks).max(axis=2) / 127                       # (M, rows)
    t_row = (np.abs(exact).max(axis=1) + s_row.sum(0) / 2) / 127
    assert np.all(np.abs(int8_row - exact).max(axis=1) <= (s_row.sum(0) / 2 + t_row / 2) * slack)
    for a in (bf16, int8, int8_row):
        assert not np.allclose(a, exact, rtol=1e-6, atol=0)      # lossy indeed
    # per-row scales help the rows far below the largest (the largest row's own scale is the
    # per-tensor one, so the maximum over all rows need not shrink)
    small = int(np.argmin(np.abs(exact).max(axis=1)))
    assert np.abs(int8_row - exact)[small].max() < np.abs(int8 - exact)[small].max()
    assert not any(c.exact for c in (costs.lossy_bf16_cost((5, 7), "float32", M),
                                     costs.lossy_int8_cost((5, 7), "float32", M)))


def test_lossy_psums_pass_gradients_through_and_batch():
    x, c = gauss(M * 3, 4), gauss(3, 4)
    exact_grad = smap(jax.grad(lambda v: jnp.sum(c * lax.psum(v, "d"))), P("d"), P("d"))(x)
    for fn in (lambda v: lossy_psum_int8(v, "d"), lambda v: lossy_psum_int8(v, "d", per_row=True)):
        got = smap(jax.grad(lambda v: jnp.sum(c * fn(v))), P("d"), P("d"))(x)
        np.testing.assert_array_equal(got, exact_grad)  # straight-through: the exact psum's transpose
    got = smap(jax.grad(lambda v: jnp.sum(c * lossy_psum_bf16(v, "d"))), P("d"), P("d"))(x)
    np.testing.assert_allclose(got, exact_grad, rtol=2.0 ** -8)
    xv = gauss(2, M * 3, 4)
    got, want = smap(lambda v: (jax.vmap(lambda a: lossy_psum_int8(a, "d"))(v),
                                jnp.stack([lossy_psum_int8(v[0], "d"), lossy_psum_int8(v[1], "d")])),
                     P(None, "d"), (P(), P()))(xv)
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- costs vs compiled HLO


def compiled_collectives(fn, in_specs, out_specs, *args, mesh=MESH):
    return hlo.collectives(smap(fn, in_specs, out_specs, mesh).lower(*args).compile())


def assert_matches(colls, cost, group_size):
    assert sorted((c.kind, c.bytes) for c in colls) == sorted(cost.collectives)
    assert all(len(g) == group_size for c in colls for g in c.groups)


def test_sfb_costs_match_the_compiled_collectives():
    x, dy = jnp.ones((M * 16, 32)), jnp.ones((M * 16, 24))
    colls = compiled_collectives(lambda x, dy: sfb_dot_grad(x, dy, "d"), (P("d"), P("d")), P(), x, dy)
    cost = costs.sfb_dot_cost((16, 32), (16, 24), M)
    assert_matches(colls, cost, M)
    assert cost.sent_bytes == (M - 1) * (16 * 32 + 16 * 24) * 4
    assert cost.sent_bytes == sum(c.bytes for c in colls) * (M - 1) / M
    assert cost.extra_flops == (M - 1) * 2 * 32 * 24 * 16
    plain = compiled_collectives(lambda x, dy: lax.psum(x.T @ dy, "d"), (P("d"), P("d")), P(), x, dy)
    assert_matches(plain, costs.psum_cost((32, 24), "float32", M), M)
    assert costs.psum_cost((32, 24), "float32", M).sent_bytes == 2 * (M - 1) / M * 32 * 24 * 4

    x_shape, k_shape, kw = CONVS[1]
    dy_shape = (2, 4, 9, 6)
    x, dy = jnp.ones((M * 2, *x_shape[1:])), jnp.ones((M * 2, *dy_shape[1:]))
    colls = compiled_collectives(lambda x, dy: sfb_conv_grad(x, dy, "d", kernel_shape=k_shape, **kw),
                                 (P("d"), P("d")), P(), x, dy)
    cost = costs.sfb_conv_cost(x_shape, dy_shape, k_shape, M, dimension_numbers=kw["dimension_numbers"])
    assert_matches(colls, cost, M)
    assert cost.extra_flops == (M - 1) * 2 * np.prod(dy_shape) * np.prod(k_shape) // 6

    mesh = jax.make_mesh((2, 4), ("r", "d"), axis_types=(AxisType.Auto,) * 2)  # groups of 4, not 8
    x, dy = jnp.ones((8, 32)), jnp.ones((8, 24))
    colls = compiled_collectives(lambda x, dy: sfb_dot_grad(x, dy, "d"), (P("d"), P("d")), P(), x, dy, mesh=mesh)
    assert_matches(colls, costs.sfb_dot_cost((2, 32), (8 // 4, 24), 4), 4)


def test_row_sparse_costs_match_the_compiled_collectives():
    idx, rows = jnp.zeros((M * 10,), jnp.int32), jnp.ones((M * 10, 16))
    colls = compiled_collectives(lambda i, r: row_sparse_psum(i, r, "d", num_rows=1000, capacity=4),
                                 (P("d"), P("d")), P(), idx, rows)
    sparse = costs.row_sparse_cost(1000, (16,), "float32", M, 4)
    fallback = costs.row_sparse_cost(1000, (16,), "float32", M, 4, overflow=True)
    assert sparse.collectives == (("all-gather", M * 5 * 4), ("all-gather", M * 4 * 16 * 4))
    # The compiled module holds both branches: the shared index gather, the rows, the dense fallback.
    want = sorted(set(sparse.collectives) | set(fallback.collectives))
    assert sorted((c.kind, c.bytes) for c in colls) == want
    assert all(len(g) == M for c in colls for g in c.groups)
    assert sparse.sent_bytes == 4 * (16 * 4 + 4) * (M - 1) + 4 * (M - 1)  # capacity (row + index) + count
    assert fallback.sent_bytes == 5 * 4 * (M - 1) + 2 * (M - 1) / M * 1000 * 16 * 4
    assert sparse.sent_bytes < costs.psum_cost((1000, 16), "float32", M).sent_bytes


def test_int8_costs_match_the_compiled_collectives():
    x = jnp.ones((M * 5, 7))
    for per_row in (False, True):
        colls = compiled_collectives(lambda v: lossy_psum_int8(v, "d", per_row=per_row), P("d"), P(), x)
        assert_matches(colls, costs.lossy_int8_cost((5, 7), "float32", M, per_row=per_row), M)


# ----------------------------------------------------------------------------- names in jaxprs


def test_names_show_in_the_jaxpr():
    x, dy, w = jnp.ones((M * 2, 6)), jnp.ones((M * 2, 5)), jnp.ones((6, 5))
    ids, table = jnp.zeros((M * 2,), jnp.int32), jnp.ones((9, 5))
    text = lambda f, specs, *a: str(jax.make_jaxpr(jax.shard_map(f, mesh=MESH, in_specs=specs, out_specs=P()))(*a))
    assert "name=sfb_dot_grad" in text(lambda x, dy: sfb_dot_grad(x, dy, "d"), (P("d"), P("d")), x, dy)
    assert "name=sfb_dot_grad" in text(jax.grad(lambda w, x: jnp.sum(sfb_dense(x, w, "d"))), (P(), P("d")), w, x)
    k, xc = jnp.ones((4, 3, 3, 3)), jnp.ones((M, 3, 5, 5))
    conv_loss = lambda k, x: jnp.sum(sfb_conv(x, k, "d", window_strides=(1, 1), padding="SAME"))
    assert "name=sfb_conv_grad" in text(jax.grad(conv_loss), (P(), P("d")), k, xc)
    sparse = lambda i, r: row_sparse_psum(i, r, "d", num_rows=9)
    assert "name=row_sparse_psum" in text(sparse, (P("d"), P("d")), ids, dy)
    assert "name=row_sparse_psum" in text(jax.grad(lambda t, i: jnp.sum(row_sparse_embed(t, i, "d"))),
                                          (P(), P("d")), table, ids)
    assert "name=lossy_psum_bf16" in text(lambda v: lossy_psum_bf16(v, "d"), P("d"), x)
    assert "name=lossy_psum_int8" in text(lambda v: lossy_psum_int8(v, "d"), P("d"), x)
