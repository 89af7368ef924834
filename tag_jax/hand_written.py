"""A hand-written plan priced like the others: the user's `PartitionSpec`s for the arguments, the
ops in between chosen by `propagate` as the baselines' are (`tag_jax.baselines.hand_written`).

`in_specs` is what `jax.jit(in_shardings=...)` takes, in PartitionSpecs: one entry per positional
argument, each a PartitionSpec (or None: replicated) for the whole argument or a pytree of them
matching it. A spec is checked against its argument: an axis the mesh lacks, an axis used twice,
more entries than dimensions, or a dimension the axes do not divide is refused naming the argument.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from tag_jax.hlo.graph import OpGraph
from tag_jax.strategy import MeshSpec, Strategy, TensorSharding


class SpecError(ValueError):
    """A hand-written spec that does not fit its argument or the mesh."""


def _is_spec(x: Any) -> bool:
    return x is None or isinstance(x, (PartitionSpec, NamedSharding))


def input_shardings(graph: OpGraph, mesh: MeshSpec, in_specs: Sequence[Any]) -> tuple[TensorSharding, ...]:
    """One TensorSharding per graph input from per-argument specs (prefix trees allowed)."""
    arg_trees = graph.in_tree.children()[0].children()  # traced as (positional args, kwargs)
    specs = tuple(in_specs) if isinstance(in_specs, (tuple, list)) else (in_specs,)
    if len(specs) != len(arg_trees):
        raise SpecError(f"{len(specs)} in_specs for the {len(arg_trees)} positional argument(s) of "
                        f"{graph.name}: give one per argument (None replicates it)")
    by_leaf: dict[int, Any] = {}
    offset = 0
    for i, (spec_tree, tree) in enumerate(zip(specs, arg_trees)):
        index = jax.tree_util.tree_unflatten(tree, list(range(offset, offset + tree.num_leaves)))
        offset += tree.num_leaves

        def assign(spec, sub):
            for k in jax.tree_util.tree_leaves(sub):
                by_leaf[k] = spec.spec if isinstance(spec, NamedSharding) else spec

        try:  # a spec for the whole argument, or a prefix tree of specs
            jax.tree_util.tree_map(assign, spec_tree, index, is_leaf=_is_spec)
        except ValueError as exc:
            raise SpecError(f"in_specs[{i}] does not match argument {i}'s structure: {exc}") from None
    axes = mesh.axes
    out = []
    for k, tid in enumerate(graph.inputs):
        t = graph.tensors[tid]
        spec = by_leaf.get(k)
        where = f"argument {t.describe()}"
        entries = tuple(spec) if spec is not None else ()
        if len(entries) > len(t.shape):
            raise SpecError(f"{where}: spec {spec} has {len(entries)} entries for {len(t.shape)} dims")
        ts = TensorSharding.from_partition_spec(PartitionSpec(*entries), len(t.shape))
        missing = [a for a in ts.axes if a not in axes]
        if missing:
            raise SpecError(f"{where}: spec {spec} names axes {missing} the mesh {dict(axes)} lacks")
        for n, d in zip(t.shape, ts.dims):
            size = math.prod(axes[a] for a in d)
            if n % size:
                raise SpecError(f"{where}: spec {spec} splits a dimension of {n} over {size} devices")
        if len(set(ts.axes)) != len(ts.axes):
            raise SpecError(f"{where}: spec {spec} uses a mesh axis twice")
        out.append(ts)
    return tuple(out)


def hand_written_strategy(graph: OpGraph, op_strategies, mesh: MeshSpec, in_specs) -> Strategy:
    """The user's argument shardings, the rest propagated as the baselines' are."""
    from tag_jax.baselines import propagated_strategy

    return propagated_strategy(graph, op_strategies, mesh, input_shardings(graph, mesh, in_specs),
                               "hand-written")
