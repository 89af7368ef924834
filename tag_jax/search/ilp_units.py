"""The decisions of the ILP baseline: which ops and arguments share one one-hot choice.

A *unit* is one one-hot choice vector of the ILP. Units are

- op classes (`anneal.op_classes`: the same op in every repeated layer shares one choice);
- argument groups (`anneal.param_groups`: a weight in every layer plus its optimizer state), and
  one unit per other argument (batch, state), over `random_strategy.input_sharding_options`;
- nothing for ops with one option (fixed at 0) and for merged trivial ops (below).

Merging (Alpa's trivial-op merge): a class of elementwise or shape-only ops whose largest operand is
made by one unit becomes a *follower*: each option of that unit fixes the follower's option (the
one that takes the operand as it comes, most parallel first), so it adds no variables. Chains of
followers resolve to their first leader.

Every op then has an *indicator* per option: which of its unit's options select it
(`OpChoice.of_unit[k]` = the op's option when its unit takes option k). Pure data, no solver here.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from tag_jax.hlo.graph import OpGraph, Role
from tag_jax.rules.elementwise import ELEMENTWISE
from tag_jax.search.anneal import op_classes, param_groups
from tag_jax.search.propagate import parallelism
from tag_jax.search.random_strategy import input_sharding_options
from tag_jax.strategy import MeshSpec, OpStrategy, TensorSharding

# ops cheap enough that following their operand loses little (Alpa merges the same kind)
# (not broadcasts: splitting the dimension they add is a real decision)
TRIVIAL = frozenset(ELEMENTWISE) | {"reshape", "squeeze", "expand_dims", "convert_element_type",
                                    "transpose"}


@dataclasses.dataclass(frozen=True)
class Unit:
    """One one-hot choice: `size` options; `ops` / `inputs` (tensor ids) decided by it."""

    name: str
    size: int
    ops: tuple[int, ...] = ()
    inputs: tuple[int, ...] = ()
    input_options: tuple[TensorSharding, ...] = ()  # for argument units
    allowed: tuple[bool, ...] = ()  # options an op unit may take (graph results split evenly)


@dataclasses.dataclass(frozen=True)
class OpChoice:
    """How an op's option follows from a unit (`unit` None: fixed at option 0)."""

    unit: int | None
    of_unit: tuple[int, ...] = (0,)  # op option when the unit takes option k


@dataclasses.dataclass(frozen=True)
class Units:
    units: tuple[Unit, ...]
    op_choice: tuple[OpChoice, ...]  # per op
    input_unit: dict  # argument tensor id -> (unit index, its options are unit.input_options)
    merged: int  # ops merged into their operand's unit


def _evenly_split(s: OpStrategy, op, graph: OpGraph, mesh_axes, results: frozenset) -> bool:
    """jit results must split evenly (emit.check); options of result-making ops are limited.
    `results`: the graph's result tensor ids."""
    for t, ts in zip(op.outputs, s.outputs):
        if t in results and any(n % math.prod(mesh_axes[a] for a in d)
                                for n, d in zip(graph.tensors[t].shape, ts.dims)):
            return False
    return True


def _input_units(graph: OpGraph, mesh: MeshSpec) -> list[Unit]:
    grouped: set[int] = set()
    units = []
    for g in param_groups(graph, mesh):
        opts = input_sharding_options(g.shape, mesh)
        units.append(Unit(f"args {g.key}", len(opts), inputs=g.tensors, input_options=opts))
        grouped.update(g.tensors)
    for tid in graph.inputs:
        if tid in grouped:
            continue
        t = graph.tensors[tid]
        opts = input_sharding_options(t.shape, mesh)
        units.append(Unit(f"arg {t.path or tid}", len(opts), inputs=(tid,), input_options=opts))
    return units


def _follow_map(op, pos: int, leader_give: Sequence[TensorSharding],
                options: Sequence[OpStrategy], mesh_axes) -> tuple[int, ...] | None:
    """For each sharding the leader may give operand `pos`, the option taking it as is (least
    parallel, then first: a trivial op adds no split of its own); None when some has no match."""
    out = []
    for ts in leader_give:
        best = None
        for j, s in enumerate(options):
            if s.inputs[pos] == ts:
                key = (parallelism(s, mesh_axes), j)
                if best is None or key < best[0]:
                    best = (key, j)
        if best is None:
            return None
        out.append(best[1])
    return tuple(out)


def decision_units(graph: OpGraph, op_strategies, mesh: MeshSpec, *, merge: bool = True) -> Units:
    """The ILP's units (see the module docstring)."""
    axes = mesh.axes
    units = _input_units(graph, mesh)
    input_unit = {t: i for i, u in enumerate(units) for t in u.inputs}
    choice: list[OpChoice | None] = [None] * len(graph.ops)
    for op in graph.ops:
        if len(op_strategies[op.id]) < 2:
            choice[op.id] = OpChoice(None)
    merged = 0
    results = frozenset(graph.outputs)
    for members in op_classes(graph, op_strategies):  # classes come in op order: leaders first
        ops0 = graph.ops[members[0]]
        options = op_strategies[members[0]]
        follow = _leader(graph, op_strategies, members, choice, axes) if merge else None
        if follow is not None:
            for i in members:
                choice[i] = follow
            merged += len(members)
            continue
        makes = [graph.ops[i] for i in members if results.intersection(graph.ops[i].outputs)]
        allowed = tuple(all(_evenly_split(s, op, graph, axes, results) for op in makes)
                        for s in options)
        if not any(allowed):
            allowed = (True,) + (False,) * (len(options) - 1)
        units.append(Unit(f"{ops0.primitive} {ops0.scope or ops0.id} x{len(members)}", len(options),
                          ops=tuple(members), allowed=allowed))
        for i in members:
            choice[i] = OpChoice(len(units) - 1, tuple(range(len(options))))
    return Units(tuple(units), tuple(choice), input_unit, merged)


def _leader(graph: OpGraph, op_strategies, members: Sequence[int], choice, axes) -> OpChoice | None:
    """The follower choice of a class of trivial ops, or None when it must decide for itself."""
    op0 = graph.ops[members[0]]
    if op0.primitive not in TRIVIAL or not op0.inputs:
        return None
    if any(graph.tensors[t].role == Role.OUTPUT or t in graph.outputs for t in op0.outputs):
        return None  # results are constrained to split evenly: let them choose
    pos = max(range(len(op0.inputs)), key=lambda p: graph.tensors[op0.inputs[p]].nbytes)
    found = None
    for i in members:
        t = graph.tensors[graph.ops[i].inputs[pos]]
        if t.producer is None:
            return None
        c = choice[t.producer]
        if c is None or c.unit is None:
            return None
        key = (c, id(op_strategies[t.producer]), graph.ops[t.producer].outputs.index(t.id))
        if found is not None and key != found:
            return None
        found = key
    c, _, out_pos = found
    producer_options = op_strategies[graph.tensors[op0.inputs[pos]].producer]
    give = [producer_options[c.of_unit[k]].outputs[out_pos] for k in range(len(c.of_unit))]
    f = _follow_map(op0, pos, give, op_strategies[members[0]], axes)
    return None if f is None else OpChoice(c.unit, f)
