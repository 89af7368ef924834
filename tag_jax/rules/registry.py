"""The registry of per-primitive rules, and the queries the planner makes of it.

A rule is a function ``(in_avals, out_avals, params) -> Factors`` registered under one or more
primitive names. Primitives without a rule run replicated only and are reported by
`unknown_primitives`, so the planner can tell the user which ops it could not split.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

from tag_jax.rules.factors import Factors, enumerate_strategies, replicated_only
from tag_jax.strategy import OpStrategy

Rule = Callable[[Sequence[Any], Sequence[Any], Mapping[str, Any]], Factors]

_RULES: dict[str, Rule] = {}
_PARAMS_IGNORED: set[str] = set()  # rules whose factors do not depend on params (keyed by shapes only)
_CACHE: dict[Any, tuple[OpStrategy, ...]] = {}


class RuleError(ValueError):
    """A rule failed on an op, or one of its strategies is malformed or computes the wrong values."""


def register(*names: str, uses_params: bool = True) -> Callable[[Rule], Rule]:
    """Register `rule` for each primitive in `names` (a later registration replaces an earlier one)."""

    def deco(rule: Rule) -> Rule:
        for n in names:
            _RULES[n] = rule
            _CACHE.clear()
            (_PARAMS_IGNORED.discard if uses_params else _PARAMS_IGNORED.add)(n)
        return rule

    return deco


def registered() -> set[str]:
    """Names of the primitives that have a real rule."""
    return set(_RULES)


def rule_for(primitive: str) -> Rule | None:
    return _RULES.get(primitive)


def _shape(aval: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in getattr(aval, "shape", ()))


def _summable(dtype: Any) -> bool:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):  # typed PRNG keys (`jax.random.key`)
        return False
    return np.dtype(dtype) != np.bool_


def factors(primitive: str, in_avals: Sequence[Any], out_avals: Sequence[Any],
            params: Mapping[str, Any]) -> Factors:
    """The rule's factors for one op; replicated-only factors for an unknown primitive."""
    rule = _RULES.get(primitive)
    if rule is None:
        return replicated_only([len(_shape(a)) for a in in_avals], [len(_shape(a)) for a in out_avals])
    try:
        f = rule(in_avals, out_avals, params)
    except Exception as exc:
        shapes = ", ".join(str(_shape(a)) for a in in_avals)
        raise RuleError(f"the sharding rule for `{primitive}` failed on inputs of shapes {shapes} with "
                        f"params {sorted(params)}: {type(exc).__name__}: {exc}. This is a bug in "
                        f"tag_jax.rules; until it is fixed, `tag_jax.rules.register('{primitive}')` a "
                        f"rule returning `replicated_only(...)` to run the op replicated") from exc
    if f.linear and not all(_summable(getattr(a, "dtype", np.float32)) for a in out_avals):
        f = dataclasses.replace(f, linear=())  # booleans and PRNG keys are never partial sums
    return f


def strategies(primitive: str, in_avals: Sequence[Any], out_avals: Sequence[Any],
               params: Mapping[str, Any], mesh_axes: Mapping[str, int]) -> tuple[OpStrategy, ...]:
    """Every communication-free way to run the op on the mesh; index 0 is full replication.

    `mesh_axes` maps axis names to sizes (a `jax.sharding.Mesh` or `tag_jax.strategy.MeshSpec` works too).
    """
    mesh_axes = mesh_axes_of(mesh_axes)
    if primitive == "shard_map":  # written by hand: its one option (`tag_jax.rules.manual`)
        from tag_jax.rules.manual import shard_map_strategies

        return tuple(_interned(s) for s in shard_map_strategies(in_avals, out_avals, params, mesh_axes))
    if primitive == "scan" and "jaxpr" in params:  # the body's communication-free splits
        from tag_jax.rules.loops import scan_strategies

        plain = strategies("<replicated>", in_avals, out_avals, {}, mesh_axes)
        return tuple(_interned(s) for s in scan_strategies(in_avals, out_avals, params, mesh_axes, plain))
    key = _key(primitive, in_avals, out_avals, params, mesh_axes)
    hit = _CACHE.get(key)
    if hit is None:
        f = factors(primitive, in_avals, out_avals, params)
        hit = enumerate_strategies(f, [_shape(a) for a in in_avals], [_shape(a) for a in out_avals],
                                   mesh_axes)
        _CACHE[key] = hit = tuple(_interned(s) for s in hit)
    return hit


_SHARDINGS: dict = {}  # every sharding the rules have made, by value -> one object


def _interned(s: OpStrategy) -> OpStrategy:
    """`s` with each sharding replaced by the one object of its value: equal shardings of
    different ops are then identical, so the planner's caches keyed by identity hit across
    ops (propagation's resharding factors: resnet-50 made 430,000 equal-but-new pairs)."""
    ins = tuple(_SHARDINGS.setdefault(t, t) for t in s.inputs)
    outs = tuple(_SHARDINGS.setdefault(t, t) for t in s.outputs)
    if all(a is b for a, b in zip(ins + outs, s.inputs + s.outputs)):
        return s
    return dataclasses.replace(s, inputs=ins, outputs=outs)


def for_graph(graph: Any, mesh_axes: Mapping[str, int]) -> tuple[tuple[OpStrategy, ...], ...]:
    """One strategy list per op of `graph`, in op order (op i -> result[i])."""
    mesh_axes = mesh_axes_of(mesh_axes)
    out = []
    for op in graph.ops:
        eqn = op.eqn
        if eqn is None:
            in_avals = [_Aval(graph.tensors[t].shape) for t in op.inputs]
            out_avals = [_Aval(graph.tensors[t].shape) for t in op.outputs]
            out.append(strategies("<no equation>", in_avals, out_avals, {}, mesh_axes))
            continue
        try:
            out.append(strategies(op.primitive, [v.aval for v in eqn.invars],
                                  [v.aval for v in eqn.outvars], eqn.params, mesh_axes))
        except RuleError as exc:
            if op.primitive != "shard_map":
                raise
            raise RuleError(f"{op.where()}: {exc}") from None
    return tuple(out)


def mesh_axes_of(mesh: Any) -> dict[str, int]:
    """Axis sizes of a mapping, a `jax.sharding.Mesh` or a `MeshSpec`."""
    if isinstance(mesh, Mapping):
        return dict(mesh)
    if hasattr(mesh, "axis_names") and hasattr(mesh, "shape"):
        shape = mesh.shape
        return dict(shape) if isinstance(shape, Mapping) else dict(zip(mesh.axis_names, shape))
    raise TypeError(f"expected a mapping of mesh axis names to sizes, a Mesh or a MeshSpec; got "
                    f"{type(mesh).__name__}")


def unknown_primitives(graph_or_names: Any) -> tuple[str, ...]:
    """Primitives (of a graph's top-level ops, or of an iterable of names) that have no rule."""
    if hasattr(graph_or_names, "ops"):
        names: Iterable[str] = (op.primitive for op in graph_or_names.ops)
    else:
        names = graph_or_names
    return tuple(sorted({n for n in names if n not in _RULES and n != "shard_map"}))


class _Aval:
    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.dtype = np.dtype(np.float32)


def _freeze(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str, np.dtype, enum.Enum)):
        return v
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (tuple, list)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, np.ndarray):
        return (v.shape, v.tobytes())
    return (type(v).__name__, str(v))


def _key(primitive: str, in_avals: Sequence[Any], out_avals: Sequence[Any],
         params: Mapping[str, Any], mesh_axes: Mapping[str, int]) -> Any:
    # (dtype objects, not their names: str(dtype) is slow and this runs per op and mesh)
    shapes = tuple((_shape(a), getattr(a, "dtype", None)) for a in in_avals) + \
        tuple((_shape(a), getattr(a, "dtype", None)) for a in out_avals)
    if primitive in _PARAMS_IGNORED or primitive not in _RULES:
        p: Any = ()
    else:
        p = tuple(sorted((k, _freeze(v)) for k, v in params.items()))
    return primitive, shapes, p, tuple(mesh_axes.items())
