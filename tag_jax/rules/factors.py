"""Einsum-like factor descriptions of ops, and the enumeration of their communication-free strategies.

A rule describes an op by naming each dimension of each input and output with a *factor* label
(``"m"``, ``"k"``, ``"d0"``...) or ``None`` for a dimension that may never be split (a reduced axis of
``reduce_max``, a sliced axis, a broadcast size-1 axis). Splitting a factor over mesh axes splits every
dimension carrying it the same way, so each device computes the op on its local blocks. A *summed*
factor appears only in inputs (a contracting dimension): splitting it leaves the outputs as partial sums
over those axes. A *linear* group names inputs that may together carry a partial sum straight through
the op (``add`` of two partial sums is the partial sum of the result).

`enumerate_strategies` turns a `Factors` into `OpStrategy`s: every assignment of usable mesh axes (size
above one) to factors such that each dimension is divisible by the product of its axes, first the
all-replicated one, then those with partial sums passed through.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, Mapping, Sequence

from tag_jax.strategy import OpStrategy, TensorSharding

Labels = tuple  # per dimension: a factor label (str) or None


@dataclasses.dataclass(frozen=True)
class Factors:
    """How an op's dimensions line up; see the module docstring."""

    ins: tuple[Labels, ...]
    outs: tuple[Labels, ...]
    summed: frozenset = frozenset()  # labels absent from outputs whose split makes outputs partial
    summed_inputs: tuple[int, ...] = ()  # inputs that are partial too when a summed label is split
    linear: tuple[tuple[int, ...], ...] = ()  # groups of inputs that may together be partial sums
    # (params, local input shapes, local output shapes) -> params for the op on local blocks
    local: Callable[[Mapping[str, Any], Sequence[tuple], Sequence[tuple]], Mapping[str, Any]] | None = None
    # (params, local args, strategy, mesh_axes) -> local results, for ops whose values depend on position
    impl: Callable | None = None
    # per input: exclusive upper bound for random integers in validation (index operands); None: default
    index_bounds: tuple[int | None, ...] = ()


def replicated_only(n_in: Sequence[int], n_out: Sequence[int]) -> Factors:
    """Factors for an op that is never split: every dimension unsplittable."""
    return Factors(tuple((None,) * n for n in n_in), tuple((None,) * n for n in n_out))


def _labels_in_order(f: Factors) -> list[str]:
    seen: list[str] = []
    for lab in itertools.chain(*f.ins, *f.outs):
        if lab is not None and lab not in seen:
            seen.append(lab)
    return seen


def enumerate_strategies(f: Factors, in_shapes: Sequence[tuple], out_shapes: Sequence[tuple],
                         mesh_axes: Mapping[str, int]) -> tuple[OpStrategy, ...]:
    usable = [a for a, n in mesh_axes.items() if n > 1]
    labels = _labels_in_order(f)
    sizes: dict[str, list[int]] = {lab: [] for lab in labels}
    for labs, shape in itertools.chain(zip(f.ins, in_shapes), zip(f.outs, out_shapes)):
        for lab, n in zip(labs, shape):
            if lab is not None:
                sizes[lab].append(int(n))

    bases: list[tuple[dict[str, tuple[str, ...]], tuple[str, ...]]] = []
    for choice in itertools.product([None] + labels, repeat=len(usable)):
        assign: dict[str, tuple[str, ...]] = {}
        for axis, lab in zip(usable, choice):
            if lab is not None:
                assign[lab] = assign.get(lab, ()) + (axis,)
        if all(all(n % math.prod(mesh_axes[a] for a in axes) == 0 for n in sizes[lab])
               for lab, axes in assign.items()):
            unused = tuple(a for a, lab in zip(usable, choice) if lab is None)
            bases.append((assign, unused))

    out: list[OpStrategy] = []
    for assign, _ in bases:
        out.append(_make(f, assign, (), None, usable))
    if f.linear:
        for assign, unused in bases:
            for r in range(1, len(unused) + 1):
                for sub in itertools.combinations(unused, r):
                    for group in f.linear:
                        out.append(_make(f, assign, sub, group, usable))
    return tuple(out)


def _make(f: Factors, assign: Mapping[str, tuple[str, ...]], through: tuple[str, ...],
          group: tuple[int, ...] | None, order: Sequence[str]) -> OpStrategy:
    summed_axes = tuple(a for lab in f.summed for a in assign.get(lab, ()))
    out_partial = _ordered(summed_axes + through, order)

    def sharding(labs: Labels, partial: tuple[str, ...]) -> TensorSharding:
        return TensorSharding(tuple(assign.get(lab, ()) if lab is not None else () for lab in labs),
                              partial)

    ins = []
    for i, labs in enumerate(f.ins):
        partial: tuple[str, ...] = ()
        if group is not None and i in group:
            partial += through
        if i in f.summed_inputs:
            partial += summed_axes
        ins.append(sharding(labs, _ordered(partial, order)))
    outs = tuple(sharding(labs, out_partial) for labs in f.outs)
    parts = [f"{lab}@{'.'.join(axes)}" for lab, axes in assign.items()]
    name = " ".join(parts) or "R"
    if through:
        name += f" +partial({','.join(through)})" + (f" via in{','.join(map(str, group))}"
                                                    if len(f.linear) > 1 else "")
    return OpStrategy(name, tuple(ins), outs)


def _ordered(axes: tuple[str, ...], order: Sequence[str]) -> tuple[str, ...]:
    return tuple(a for a in order if a in axes)


def position(axes: Sequence[str], mesh_axes: Mapping[str, int]) -> Any:
    """Inside shard_map: this device's block index along a dimension split by `axes` (major to minor)."""
    import jax

    pos = 0
    for k, a in enumerate(axes):
        pos = pos + jax.lax.axis_index(a) * math.prod(mesh_axes[b] for b in axes[k + 1:])
    return pos
