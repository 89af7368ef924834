"""The data a plan is made of: mesh, tensor shardings, per-op strategies, whole strategies.

Shared vocabulary of `rules` (which per-op strategies exist), `cost` (what a strategy costs),
`search` (which strategy to pick) and `emit` (how a strategy becomes a program). Plain frozen data.

A tensor sharding names, per dimension, the mesh axes that split it (major to minor), and the axes
over which the tensor is still an unreduced partial sum (e.g. the output of a matmul whose contracting
dimension is split). An op strategy fixes the shardings of an op's inputs and outputs; the op then runs
with no communication of its own, and any mismatch with a neighbour is a resharding priced on the
topology.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, Sequence

from jax.sharding import PartitionSpec

DimSpec = tuple[str, ...]  # mesh axes splitting one dimension, major to minor; () = not split


@dataclasses.dataclass(frozen=True)
class TensorSharding:
    dims: tuple[DimSpec, ...]
    partial: tuple[str, ...] = ()  # axes over which the value is an unreduced partial sum

    @staticmethod
    def replicated(ndim: int) -> "TensorSharding":
        return TensorSharding(((),) * ndim)

    @staticmethod
    def from_partition_spec(spec: PartitionSpec, ndim: int) -> "TensorSharding":
        dims = []
        for entry in tuple(spec) + (None,) * (ndim - len(spec)):
            if entry is None:
                dims.append(())
            elif isinstance(entry, str):
                dims.append((entry,))
            else:
                dims.append(tuple(entry))
        return TensorSharding(tuple(dims))

    @functools.cached_property  # frozen data: computed once (hot in propagation and pricing)
    def axes(self) -> tuple[str, ...]:
        """Every mesh axis that splits some dimension."""
        return tuple(a for d in self.dims for a in d)

    def problem(self, shape: Sequence[int], mesh_axes: Mapping[str, int]) -> str | None:
        """Why this sharding cannot apply to a tensor of `shape` on a mesh, or None if it can."""
        if len(self.dims) != len(shape):
            return (f"sharding {self} has {len(self.dims)} dims but the tensor has shape "
                    f"{tuple(shape)}; give one entry per dimension")
        for a in self.axes + self.partial:
            if a not in mesh_axes:
                return (f"sharding {self} names mesh axis {a!r}, but the mesh has axes "
                        f"{dict(mesh_axes)}; plan for this mesh or name its axes")
        return None

    def is_replicated(self) -> bool:
        return not self.axes and not self.partial

    def shards(self, mesh_axes: Mapping[str, int]) -> int:
        """Into how many pieces the tensor is split (replicas not counted)."""
        return math.prod(mesh_axes[a] for a in self.axes)

    def local_shape(self, shape: Sequence[int], mesh_axes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(n // math.prod(mesh_axes[a] for a in d) for n, d in zip(shape, self.dims))

    def to_partition_spec(self) -> PartitionSpec:
        entries = [None if not d else d[0] if len(d) == 1 else d for d in self.dims]
        while entries and entries[-1] is None:
            entries.pop()
        return PartitionSpec(*entries)

    def without_partial(self) -> "TensorSharding":
        return TensorSharding(self.dims)

    def __str__(self) -> str:
        body = ", ".join("None" if not d else d[0] if len(d) == 1 else "(" + ",".join(d) + ")"
                         for d in self.dims)
        return f"P({body})" + (f"+partial({','.join(self.partial)})" if self.partial else "")


@dataclasses.dataclass(frozen=True)
class OpStrategy:
    """One way to run an op: the shardings it wants for its inputs and gives its outputs."""

    name: str  # e.g. "S(b@data) x R -> S(b@data)"; readable, unique within the op's list
    inputs: tuple[TensorSharding, ...]
    outputs: tuple[TensorSharding, ...]

    @functools.cached_property
    def split_axes(self) -> tuple[str, ...]:
        """Mesh axes over which the op's work is divided (its FLOPs shrink by their product)."""
        seen: list[str] = []
        for t in self.inputs + self.outputs:
            for a in t.axes + t.partial:
                if a not in seen:
                    seen.append(a)
        return tuple(seen)


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """A logical mesh over physical devices: `device_ids[k]` sits at row-major position k."""

    shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    device_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.axis_names):
            raise ValueError(f"mesh shape {self.shape} and axis names {self.axis_names} differ in length")
        if math.prod(self.shape) != len(self.device_ids):
            raise ValueError(f"mesh shape {self.shape} needs {math.prod(self.shape)} devices, "
                             f"got {len(self.device_ids)}")
        if len(set(self.device_ids)) != len(self.device_ids):
            raise ValueError(f"mesh device ids repeat: {self.device_ids}")

    @property
    def axes(self) -> dict[str, int]:
        return dict(zip(self.axis_names, self.shape))

    @property
    def size(self) -> int:
        return len(self.device_ids)

    def groups(self, axes: Sequence[str]) -> tuple[tuple[int, ...], ...]:
        """Physical device groups that vary along `axes` (fixing the others): a collective's groups."""
        import numpy as np

        ids = np.asarray(self.device_ids).reshape(self.shape)
        keep = [i for i, n in enumerate(self.axis_names) if n not in axes]
        vary = [self.axis_names.index(a) for a in axes]
        moved = ids.transpose(keep + vary).reshape(-1, math.prod(self.shape[i] for i in vary) if vary else 1)
        return tuple(tuple(int(d) for d in row) for row in moved)


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A whole plan before emission: mesh, one choice per op, and a sharding per graph input.

    `choices[i]` indexes the strategy list that `tag_jax.rules.strategies` gives op i of the graph;
    `input_shardings[k]` is the sharding of graph input k (parameters, optimizer state, batch).
    """

    mesh: MeshSpec
    choices: tuple[int, ...]
    input_shardings: tuple[TensorSharding, ...]
    name: str = "strategy"
