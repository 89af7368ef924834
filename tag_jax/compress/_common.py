"""Helpers the compressed-psum primitives share: naming, mesh-axis checks, invariant all-gathers."""
from __future__ import annotations

from typing import Callable, Sequence

import jax
from jax import lax

try:  # Varying -> Invariant gather: the result is typed replicated, like a psum's, so it can replace one.
    from jax._src.lax.parallel import all_gather_invariant as _all_gather_invariant
except ImportError:  # pragma: no cover - only if a later JAX moves it
    _all_gather_invariant = None

AxisName = str | tuple[str, ...]


def axis_tuple(axis_name: AxisName, where: str) -> tuple[str, ...]:
    """``axis_name`` as a non-empty tuple of mesh axis names, or a ValueError naming ``where``."""
    axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    if not axes or not all(isinstance(a, str) for a in axes):
        raise ValueError(f"{where}: axis_name must be a mesh axis name or a tuple of them, got {axis_name!r}")
    return axes


def group_size(axes: tuple[str, ...], where: str) -> int:
    """Number of devices in the group spanned by ``axes``; must be called inside ``jax.shard_map``."""
    try:
        return int(lax.axis_size(axes))
    except NameError as e:
        raise ValueError(f"{where}: mesh axis {axes} is not bound here; call it inside jax.shard_map over a "
                         f"mesh that has these axes ({e})") from None


def varying(x) -> frozenset:
    """Mesh axes ``x`` is typed as varying over (empty outside shard_map or with check_vma=False)."""
    return jax.typeof(x).mat.varying


def gather_invariant(x, axes: tuple[str, ...], axis: int, tiled: bool = True):
    """All-gather ``x`` over ``axes`` along ``axis``, typed invariant (replicated) like a psum result."""
    if _all_gather_invariant is None:  # pragma: no cover
        raise NotImplementedError("this JAX has no all_gather_invariant; tag_jax.compress needs jax 0.10")
    return _all_gather_invariant(x, axes, axis=axis, tiled=tiled)


def named(name: str, static_argnames: Sequence[str] = ()) -> Callable:
    """Jit ``fn`` under ``name`` so it shows as ``jit[name=<name>]`` in jaxprs, including grad's.

    ``jax.named_scope``/``named_call`` only touch the name stack, which ``make_jaxpr`` does not print;
    a named jit is visible, costs nothing once inlined by XLA, and composes with grad/vmap/shard_map.
    """
    def wrap(fn):
        fn.__name__ = fn.__qualname__ = name
        return jax.jit(fn, static_argnames=tuple(static_argnames))
    return wrap


def freeze(value):
    """Lists (and nested lists) as tuples, so they can be static jit arguments."""
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return tuple(freeze(v) for v in value)
    return value
