"""The op graph: what one call of a JAX function computes, as immutable data.

An `OpGraph` is the planner's view of a program: ops in a topological order, each reading and
writing `Tensor`s. Tensors know their shape, dtype, role in training and, for arguments and results,
the pytree path they come from. The graph keeps each op's jaxpr equation so that later stages can
re-evaluate the program (with sharding constraints) without tracing the user's function again.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from collections import Counter
from typing import Any, Mapping

import numpy as np


class Role(str, enum.Enum):
    """What a tensor is for in a training step."""

    PARAMETER = "parameter"
    OPTIMIZER_STATE = "optimizer_state"
    STATE = "state"  # other carried state: step counters, batch-norm statistics
    BATCH = "batch"
    CONSTANT = "constant"  # literals and closed-over constants
    ACTIVATION = "activation"  # forward-pass intermediates
    GRADIENT = "gradient"  # backward-pass intermediates (weight and activation gradients)
    UPDATE = "update"  # optimizer arithmetic after the backward pass
    OUTPUT = "output"  # results of the function

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class Tensor:
    id: int
    shape: tuple[int, ...]
    dtype: np.dtype
    role: Role
    path: str | None = None  # pytree path of the argument or result it is, if any
    producer: int | None = None  # op id; None for graph inputs and constants
    consumers: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def describe(self) -> str:
        dims = ",".join(map(str, self.shape))
        name = self.path or f"t{self.id}"
        return f"{name}:{self.dtype.name}[{dims}]"


@dataclasses.dataclass(frozen=True)
class Op:
    id: int
    primitive: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    flops: float  # for one call of the function, trip counts included
    bytes: float  # bytes read and written, trip counts included
    trips: int = 1  # how many times the op runs per call (enclosing scan/while loops)
    scope: str = ""  # name stack: "transpose(jvp(...))" marks the backward pass
    subgraphs: tuple["OpGraph", ...] = ()  # bodies of cond / while / scan, for costing
    trips_known: bool = True  # False for a while loop whose trip count is data-dependent
    eqn: Any = dataclasses.field(default=None, compare=False, repr=False, hash=False)

    @property
    def source(self) -> str:
        """User source location (file:line (function)), for error messages; computed on demand."""
        return "" if self.eqn is None else source_of(self.eqn)

    @property
    def params(self) -> Mapping[str, Any]:
        return {} if self.eqn is None else self.eqn.params

    def where(self) -> str:
        return f"`{self.primitive}` (op {self.id}{', at ' + self.source if self.source else ''})"


@dataclasses.dataclass(frozen=True)
class OpGraph:
    """Ops in a topological order and the tensors they read and write.

    `inputs` and `outputs` are tensor ids in the order of the flattened arguments and results;
    `in_tree` / `out_tree` are the pytree structures needed to rebuild them.
    """

    ops: tuple[Op, ...]
    tensors: tuple[Tensor, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    in_tree: Any = None
    out_tree: Any = None
    name: str = "fn"
    constants: Mapping[int, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def flops(self) -> float:
        return float(sum(op.flops for op in self.ops))

    @property
    def bytes(self) -> float:
        return float(sum(op.bytes for op in self.ops))

    def tensor(self, tid: int) -> Tensor:
        return self.tensors[tid]

    def by_role(self, role: Role | str) -> tuple[Tensor, ...]:
        role = Role(role)
        return tuple(t for t in self.tensors if t.role == role)

    def by_path(self, path: str) -> Tensor:
        for tid in self.inputs + self.outputs:
            if self.tensors[tid].path == path:
                return self.tensors[tid]
        raise KeyError(f"no argument or result with path {path!r} in the graph of {self.name}")

    def primitives(self) -> Counter:
        """How many ops of each primitive, nested bodies included."""
        counts: Counter = Counter()
        for op in self.ops:
            counts[op.primitive] += 1
            for sub in op.subgraphs:
                counts.update(sub.primitives())
        return counts

    def bytes_by_role(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for tid in self.inputs:
            t = self.tensors[tid]
            out[str(t.role)] = out.get(str(t.role), 0) + t.nbytes
        return out

    def summary(self, top: int = 10) -> str:
        """A readable overview: sizes, FLOPs, the heaviest ops and primitive mix."""
        lines = [
            f"OpGraph of {self.name}: {len(self.ops)} ops, {len(self.tensors)} tensors, "
            f"{_si(self.flops)}FLOP per call, {_si(self.bytes)}B moved",
        ]
        for role, nbytes in sorted(self.bytes_by_role().items()):
            n = sum(1 for tid in self.inputs if str(self.tensors[tid].role) == role)
            lines.append(f"  inputs  {role:<16} {n:>6} tensors {_si(nbytes):>9}B")
        lines.append(f"  outputs {'':<16} {len(self.outputs):>6} tensors "
                     f"{_si(sum(self.tensors[t].nbytes for t in self.outputs)):>9}B")
        loops = [op for op in self.ops if not op.trips_known]
        if loops:
            lines.append(f"  note: {len(loops)} while loop(s) with unknown trip count priced as one trip")
        heavy = sorted(self.ops, key=lambda op: -op.flops)[:top]
        if heavy and heavy[0].flops > 0:
            lines.append("  heaviest ops:")
            for op in heavy:
                if op.flops <= 0:
                    break
                out = self.tensors[op.outputs[0]]
                shape = f"{out.dtype.name}[{','.join(map(str, out.shape))}]"
                share = 100.0 * op.flops / max(self.flops, 1.0)
                lines.append(f"    {op.primitive:<14} {_si(op.flops):>9}FLOP {share:5.1f}%  {shape:<24} "
                             f"{out.path or op.scope or '-'}")
        mix = ", ".join(f"{p} {n}" for p, n in self.primitives().most_common(12))
        lines.append(f"  primitives: {mix}")
        return "\n".join(lines)


def source_of(eqn: Any) -> str:
    """The user source line of a jaxpr equation, e.g. `model.py:12 (Block.__call__)`."""
    try:
        from jax._src import source_info_util  # private, but the only way to a user frame
        return source_info_util.summarize(eqn.source_info)
    except Exception:
        return ""


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} "
