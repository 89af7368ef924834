"""Sufficient-factor broadcasting (SFB): exact weight gradients without all-reducing them.

In data parallelism a weight gradient is ``psum(dW_local)`` with ``dW_local = X^T dY`` contracting
the (sharded) batch. SFB all-gathers the two factors ``X`` and ``dY`` over the data-parallel axis and
contracts the whole batch locally: the same sum, up to summation order, for ``(M-1)(|X|+|dY|)`` bytes
sent per device instead of ``2(M-1)/M |dW|`` and ``M`` times the local weight-gradient FLOPs.

``sfb_dot_grad`` / ``sfb_conv_grad`` compute such a gradient from its factors; ``sfb_dense`` /
``sfb_conv`` are layers (``custom_vjp``) whose backward pass uses them, so ``jax.grad`` of a loss
inside ``jax.shard_map`` gets the weight gradient by SFB. All run inside ``jax.shard_map`` and show in
jaxprs as ``jit[name=sfb_dot_grad]`` / ``jit[name=sfb_conv_grad]``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from tag_jax.compress._common import AxisName, axis_tuple, freeze, gather_invariant, group_size, named, varying


# ----------------------------------------------------------------------------- dot_general


def default_dense_dimension_numbers(x_ndim: int) -> tuple:
    """``x @ w`` for a 2-D ``w``: contract the last dim of ``x`` with dim 0 of ``w``, no batch dims."""
    return (((x_ndim - 1,), (0,)), ((), ()))


def dot_weight_shape(x_shape, dy_shape, dimension_numbers) -> tuple[int, ...]:
    """Shape of ``w`` in ``dy = dot_general(x, w, dimension_numbers)``, from the shapes of ``x`` and ``dy``.

    ``w``'s contracting and batch dims take their sizes from ``x``; its remaining (free) dims, in
    order, take the trailing dims of ``dy`` (``dot_general`` puts batch, then ``x``'s free, then
    ``w``'s free dims in its result). Raises ValueError when the shapes do not fit.
    """
    (cx, cw), (bx, bw) = dimension_numbers
    x_free = [d for d in range(len(x_shape)) if d not in cx and d not in bx]
    n_w_free = len(dy_shape) - len(bx) - len(x_free)
    rank = len(cw) + len(bw) + n_w_free
    where = f"dot_general(x{tuple(x_shape)}, w) = dy{tuple(dy_shape)} with dimension_numbers={dimension_numbers}"
    if len(cx) != len(cw) or len(bx) != len(bw) or n_w_free < 0 or \
            sorted(set(cw) | set(bw)) != sorted(list(cw) + list(bw)) or any(not 0 <= d < rank for d in (*cw, *bw)):
        raise ValueError(f"{where}: the dimension numbers do not fit these shapes")
    expect = [x_shape[d] for d in bx] + [x_shape[d] for d in x_free]
    if list(dy_shape[:len(expect)]) != expect:
        raise ValueError(f"{where}: dy must start with x's batch then free dims {tuple(expect)}")
    shape = [0] * rank
    for dx, dw in zip((*cx, *bx), (*cw, *bw)):
        shape[dw] = x_shape[dx]
    free = iter(dy_shape[len(expect):])
    return tuple(s if i in (*cw, *bw) else next(free) for i, s in enumerate(shape))


def _dot_gather_dims(x_ndim: int, dimension_numbers, x_axis: int) -> int:
    """The dim of ``dy`` that carries ``x``'s dim ``x_axis``; that dim must be free (summed in dW)."""
    (cx, _), (bx, _) = dimension_numbers
    x_free = [d for d in range(x_ndim) if d not in cx and d not in bx]
    if x_axis not in x_free:
        raise ValueError(f"x_axis={x_axis} is a contracting or batch dim of x (dimension_numbers="
                         f"{dimension_numbers}); SFB gathers a dim that the weight gradient sums over, "
                         f"one of x's free dims {x_free}")
    return len(bx) + x_free.index(x_axis)


def _common_dtype(x, dy):
    return jnp.result_type(x.dtype, dy.dtype)


@named("sfb_dot_grad", ("axes", "dimension_numbers", "x_axis", "dy_axis", "w_shape"))
def _sfb_dot_grad(x, dy, *, axes, dimension_numbers, x_axis, dy_axis, w_shape):
    dtype = _common_dtype(x, dy)
    xa = gather_invariant(x.astype(dtype), axes, x_axis)
    dya = gather_invariant(dy.astype(dtype), axes, dy_axis)
    # dW is the transpose of w -> dot_general(x, w) at dy: exactly what the uncompressed backward does.
    fwd = functools.partial(lax.dot_general, xa, dimension_numbers=dimension_numbers)
    return jax.linear_transpose(fwd, jax.ShapeDtypeStruct(w_shape, dtype))(dya)[0]


def sfb_dot_grad(x, dy, axis_name: AxisName, *, dimension_numbers=None, x_axis: int = 0):
    """Weight gradient of ``dy = dot_general(x, w, dimension_numbers)`` summed over ``axis_name``, by SFB.

    Call inside ``jax.shard_map`` with ``x`` and ``dy`` sharded over ``axis_name`` along ``x``'s free
    dim ``x_axis`` (the data-parallel batch) and the matching dim of ``dy``. Equals
    ``lax.psum(local weight gradient, axis_name)`` up to summation order (exact), typed replicated over
    ``axis_name``, in ``result_type(x, dy)``. ``dimension_numbers`` defaults to ``x @ w`` with a 2-D
    ``w``. Differentiable and batchable (its pieces are all-gathers and a dot_general).
    """
    axes = axis_tuple(axis_name, "sfb_dot_grad")
    dn = freeze(dimension_numbers or default_dense_dimension_numbers(jnp.ndim(x)))
    x_axis = x_axis % max(jnp.ndim(x), 1)
    dy_axis = _dot_gather_dims(jnp.ndim(x), dn, x_axis)
    w_shape = dot_weight_shape(jnp.shape(x), jnp.shape(dy), dn)
    group_size(axes, "sfb_dot_grad")
    return _sfb_dot_grad(x, dy, axes=axes, dimension_numbers=dn, x_axis=x_axis, dy_axis=dy_axis,
                         w_shape=w_shape)


def _check_layer_operands(where: str, x, w, axes) -> None:
    """SFB's sum is the gradient only of a weight replicated over ``axes`` fed data sharded over them."""
    missing = set(axes) - varying(x)
    if missing:
        raise ValueError(f"{where}: x {jnp.shape(x)} does not vary over mesh axes {sorted(missing)}; pass x "
                         f"sharded over {axes} inside jax.shard_map(..., check_vma=True) (the default)")
    if set(axes) & varying(w):
        raise ValueError(f"{where}: w {jnp.shape(w)} varies over mesh axes {sorted(set(axes) & varying(w))}; "
                         f"SFB is for a weight replicated over {axes} (in_specs P() on those axes)")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _sfb_dense(x, w, axes, dimension_numbers, x_axis):
    return lax.dot_general(x, w, dimension_numbers)


def _sfb_dense_fwd(x, w, axes, dimension_numbers, x_axis):
    _check_layer_operands("sfb_dense", x, w, axes)
    return lax.dot_general(x, w, dimension_numbers), (x, w)


def _sfb_dense_bwd(axes, dimension_numbers, x_axis, res, dy):
    x, w = res
    dx = jax.linear_transpose(lambda v: lax.dot_general(v, w, dimension_numbers), x)(dy)[0]
    dw = sfb_dot_grad(x, dy, axes, dimension_numbers=dimension_numbers, x_axis=x_axis)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_sfb_dense.defvjp(_sfb_dense_fwd, _sfb_dense_bwd)


def sfb_dense(x, w, axis_name: AxisName, *, dimension_numbers=None, x_axis: int = 0):
    """``lax.dot_general(x, w, dimension_numbers)`` whose weight gradient is computed by SFB.

    Inside ``jax.shard_map`` (``check_vma=True``) with ``w`` replicated and ``x`` sharded over
    ``axis_name`` (along ``x_axis``), ``jax.grad`` gives ``w`` the same gradient as a plain
    ``dot_general`` (JAX's own psum of the local gradients) up to summation order, but computed from
    all-gathered ``x`` and ``dy``. ``x``'s gradient is the ordinary local one. Forward is unchanged.
    """
    axes = axis_tuple(axis_name, "sfb_dense")
    dn = freeze(dimension_numbers or default_dense_dimension_numbers(jnp.ndim(x)))
    return _sfb_dense(x, w, axes, dn, x_axis % max(jnp.ndim(x), 1))


# ----------------------------------------------------------------------------- convolution


def _conv_spec(x_shape, kernel_shape, dimension_numbers):
    return lax.conv_dimension_numbers(tuple(x_shape), tuple(kernel_shape), dimension_numbers)


@named("sfb_conv_grad", ("axes", "kernel_shape", "conv_kw"))
def _sfb_conv_grad(x, dy, *, axes, kernel_shape, conv_kw):
    kw = dict(conv_kw)
    spec = _conv_spec(x.shape, kernel_shape, kw["dimension_numbers"])
    dtype = _common_dtype(x, dy)
    xa = gather_invariant(x.astype(dtype), axes, spec.lhs_spec[0])   # batch dim of the input
    dya = gather_invariant(dy.astype(dtype), axes, spec.out_spec[0])  # batch dim of the output
    fwd = functools.partial(lax.conv_general_dilated, xa, **kw)
    return jax.linear_transpose(fwd, jax.ShapeDtypeStruct(tuple(kernel_shape), dtype))(dya)[0]


def _conv_kw(window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count):
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        dimension_numbers = lax.ConvDimensionNumbers(*(tuple(s) for s in dimension_numbers))
    return (("window_strides", freeze(window_strides)), ("padding", freeze(padding)),
            ("lhs_dilation", freeze(lhs_dilation)), ("rhs_dilation", freeze(rhs_dilation)),
            ("dimension_numbers", freeze(dimension_numbers)), ("feature_group_count", int(feature_group_count)))


def sfb_conv_grad(x, dy, axis_name: AxisName, *, kernel_shape, window_strides, padding, lhs_dilation=None,
                  rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1):
    """Kernel gradient of ``dy = lax.conv_general_dilated(x, w, ...)`` summed over ``axis_name``, by SFB.

    The convolution arguments are those of ``lax.conv_general_dilated`` (``batch_group_count`` 1);
    ``kernel_shape`` is ``w.shape``. Call inside ``jax.shard_map`` with ``x`` and ``dy`` sharded over
    ``axis_name`` along their batch dims. Equals ``lax.psum(local kernel gradient, axis_name)`` up to
    summation order, typed replicated over ``axis_name``, in ``result_type(x, dy)``.
    """
    axes = axis_tuple(axis_name, "sfb_conv_grad")
    kw = _conv_kw(window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count)
    kernel_shape = tuple(int(d) for d in kernel_shape)
    expect = jax.eval_shape(lambda a, b: lax.conv_general_dilated(a, b, **dict(kw)),
                            jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
                            jax.ShapeDtypeStruct(kernel_shape, jnp.result_type(x))).shape
    if tuple(expect) != tuple(jnp.shape(dy)):
        raise ValueError(f"sfb_conv_grad: conv of x{tuple(jnp.shape(x))} with kernel_shape={kernel_shape} gives "
                         f"{tuple(expect)}, but dy is {tuple(jnp.shape(dy))}; pass the forward conv's arguments")
    group_size(axes, "sfb_conv_grad")
    return _sfb_conv_grad(x, dy, axes=axes, kernel_shape=kernel_shape, conv_kw=kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _sfb_conv(x, w, axes, conv_kw):
    return lax.conv_general_dilated(x, w, **dict(conv_kw))


def _sfb_conv_fwd(x, w, axes, conv_kw):
    _check_layer_operands("sfb_conv", x, w, axes)
    return lax.conv_general_dilated(x, w, **dict(conv_kw)), (x, w)


def _sfb_conv_bwd(axes, conv_kw, res, dy):
    x, w = res
    kw = dict(conv_kw)
    dx = jax.linear_transpose(lambda v: lax.conv_general_dilated(v, w, **kw), x)(dy)[0]
    dw = _sfb_conv_grad(x, dy, axes=axes, kernel_shape=tuple(w.shape), conv_kw=conv_kw)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_sfb_conv.defvjp(_sfb_conv_fwd, _sfb_conv_bwd)


def sfb_conv(x, w, axis_name: AxisName, *, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count: int = 1):
    """``lax.conv_general_dilated(x, w, ...)`` whose kernel gradient is computed by SFB.

    Same contract as :func:`sfb_dense`: inside ``jax.shard_map`` (``check_vma=True``), ``w`` replicated
    and ``x`` sharded over ``axis_name`` along its batch dim; ``jax.grad`` gives ``w`` the plain
    gradient (psum of the local ones) up to summation order.
    """
    axes = axis_tuple(axis_name, "sfb_conv")
    kw = _conv_kw(window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count)
    return _sfb_conv(x, w, axes, kw)

