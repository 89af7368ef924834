"""shard_map: code that partitions itself runs as written.

A `shard_map` region has one option: its inputs in its `in_specs`, its outputs in its
`out_specs`, over the mesh it names (which the plan must then use as it is). Its body (local
shapes, collectives over the named axes) is priced through the op's sub-graph and
`tag_jax.cost.manual`. It is the one op whose option 0 is not full replication.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from tag_jax.rules.registry import RuleError
from tag_jax.strategy import OpStrategy, TensorSharding


def _sharding(spec: Any, ndim: int, sizes: Mapping[str, int]) -> TensorSharding:
    dims = []
    for entry in tuple(spec) + (None,) * (ndim - len(spec)):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        dims.append(tuple(a for a in names if sizes[a] > 1))  # a size-1 axis splits nothing
    return TensorSharding(tuple(dims))


def shard_map_strategies(in_avals: Sequence[Any], out_avals: Sequence[Any], params: Mapping[str, Any],
                         mesh_axes: Mapping[str, int]) -> tuple[OpStrategy, ...]:
    mesh = params["mesh"]
    own = dict(zip(mesh.axis_names, (int(n) for n in mesh.axis_sizes)))
    if {a: n for a, n in own.items() if n > 1} != {a: n for a, n in mesh_axes.items() if n > 1}:
        raise RuleError(f"shard_map is written for mesh {own}, but this plan's mesh is "
                        f"{dict(mesh_axes)}: plan on the shard_map's own mesh (pass that "
                        "jax.sharding.Mesh to auto_shard; its axes and device order are kept)")
    ins = tuple(_sharding(s, len(a.shape), own) for s, a in zip(params["in_specs"], in_avals))
    outs = tuple(_sharding(s, len(a.shape), own) for s, a in zip(params["out_specs"], out_avals))
    return (OpStrategy("shard_map", ins, outs),)
