"""Resharding: which collectives turn one tensor sharding into another, as XLA's SPMD partitioner does.

`reshard_collectives(src, dst, shape, dtype, mesh)` returns the collectives, in order, each with the
mesh axes it runs over and its per-device RESULT bytes (the convention of `tag_jax.hlo.compiled` and
`Topology.collective_time`). The steps follow what XLA 0.10's partitioner was seen to emit on 8 CPU
devices (2x4 mesh, compiled HLO read with `tag_jax.hlo.collectives`):

1. Free slices. A dimension whose new split only appends mesh axes to the old one (old is a prefix
   of new) and whose new axes split nothing else in `src` is cut locally (dynamic-slice): no comm.
   XLA does this FIRST, so later collectives move the smaller piece
   (``P(None,b) -> P(a,b)`` costs nothing; but see step 0c: ``P(None,b) -> P(a,None)`` is not
   sliced first in the emitted programs, it is gathered whole).
2. Partial sums. Axes partial in `src` but not in `dst` are reduced. Those that `dst` uses to split
   ONE dimension (as a prefix extension) become one reduce-scatter (bytes = the shard each device
   keeps); the rest one all-reduce of the (already scattered) local piece. When the scattered axes
   would land on two or more dimensions XLA does not form a reduce-scatter: it all-reduces the
   whole local piece once per scattered axis (last dimension first) and then slices. A dimension
   whose new split mixes reduced axes with others (``P()+partial(b) -> P((a,b))``, either order) is
   neither sliced nor scattered first: the whole local piece is all-reduced, then sliced. Axes
   partial in `dst` but not in `src` cost nothing (a local select).
3. All-gathers. Dimensions that drop trailing axes (new is a prefix of old) gather them, last
   dimension first (XLA's order), bytes = the gathered local result.
4. Re-ordering within a dimension (neither split is a prefix of the other, e.g. ``(a,b) -> (b,a)`` or
   ``a -> b``): a collective-permute of the local piece; when the new split is coarser, followed by an
   all-gather over the axes that left (XLA: ``(a,b) -> b`` is a permute then an all-gather over a).
0. (Checked first.) Axes moving between dimensions while every dimension's new piece count is a
   multiple of its old one: each new piece lies inside one old piece, so XLA sends it with ONE
   collective-permute of the new local bytes (``P(None,a) -> P(a,b)``, ``P(a,None) -> P(b,a)``).
5. Axes moving from one dimension to another: one all-to-all per (from, to) pair of dimensions over
   those axes, bytes = the local buffer (all-to-all keeps its size). XLA gathers first, then moves;
   a dimension an axis leaves is sliced (for its new axes) only after the move
   (``P(None,b) -> P(b,a)``: all-to-all of the (64, 32) block, then slice). When the moved axes land
   in another order than wanted (``P(a,None) -> P(None,(a,b))`` gives ``(b,a)``), XLA follows with a
   collective-permute of the same bytes.

   A swap ``P(a,b) -> P(b,a)`` is an all-to-all then a collective-permute of the same size (XLA).
   One axis leaving dim i for an empty dim j while ONE new axis takes dim i (``P(b,None) ->
   P(a,b)``, Megatron's weights back to their update layout): XLA slices the new axis onto j first
   and swaps, an all-to-all plus a permute of the final piece, except i last and j = i - 1 (the
   all-to-all of the whole piece, then the slice); 3-D arrays with the new axis on the third
   dimension follow the (i, j, k) table read from HLO (step 0b in the code).

0a. (Checked after 0.) One axis X leaving a dimension that other axes Ys also split, the other
   dimensions unchanged: X major and Ys dropped (``P(None,(a,b)) -> P(a,None)``) is XLA's
   "involuntary full rematerialization", one all-gather of the whole block; X minor and Ys dropped
   an all-to-all of the local piece, then an all-gather over Ys; X major and Ys kept
   (``P(None,(a,b)) -> P(a,b)``) an all-to-all plus a permute of the final piece; X alone going to a
   dimension split by more pieces that it replaces (``P(a,b) -> P(None,a)``) a permute of the local
   piece and two all-gathers (to X's, then to the final size).

0c. (Checked first.) A value split on one dimension only (by axes S) wanted split on another
   dimension only, by one axis Y (S != (Y,), which is an all-to-all): one all-gather of the WHOLE
   tensor over S, then a slice. This is what XLA does where the value is pinned by a sharding
   constraint, as every op result and resharded operand of `tag_jax.emit`'s programs is
   ("involuntary full rematerialization": ``P(None,b) -> P(a,None)``, ``P(None,(a,b)) -> P(b,None)``;
   all 110 pairs of 2-D shardings on a 2x4 mesh agree with the pinned form, tests/test_cost.py).
   Left to propagation (a jit output of an unconstrained value) XLA slices first instead.

Known differences: in step 4 the gather group XLA uses can be smaller than the axes priced here.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from tag_jax.strategy import MeshSpec, TensorSharding

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Comm:
    """One collective of a resharding: its kind, the mesh axes its groups vary along, and the
    per-device result bytes (all-reduce: the array; all-gather: the gathered array; reduce-scatter:
    the kept shard; all-to-all: the local buffer; collective-permute: the bytes each device sends)."""

    kind: str
    axes: tuple[str, ...]
    bytes: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Comm kind {self.kind!r} is not one of {', '.join(KINDS)}")


def _local_bytes(shape: Sequence[int], dims: Sequence[Sequence[str]], itemsize: int,
                 sizes: dict[str, int]) -> int:
    n = 1
    for extent, d in zip(shape, dims):  # XLA pads uneven shards up to the ceiling
        n *= -(-extent // math.prod(sizes[a] for a in d)) if d else extent
    return int(n * itemsize)


def _check(s: TensorSharding, shape: Sequence[int], sizes: dict[str, int], what: str) -> None:
    problem = s.problem(shape, sizes)
    if problem:
        raise ValueError(f"{what} {problem}")


def _placement(src: TensorSharding, dst: TensorSharding):
    """(dimension of each mesh axis in src, the same in dst, the axes that change dimension)."""
    src_where = {a: i for i, d in enumerate(src.dims) for a in d}
    dst_where = {a: i for i, d in enumerate(dst.dims) for a in d}
    return src_where, dst_where, {a for a in src_where if a in dst_where and src_where[a] != dst_where[a]}


def reshard_collectives(src: TensorSharding, dst: TensorSharding, shape: Sequence[int], dtype,
                        mesh: MeshSpec) -> tuple[Comm, ...]:
    """The collectives that turn a tensor of `shape`/`dtype` sharded as `src` into `dst`, in order."""
    if src == dst:
        return ()
    sizes = mesh.axes
    _check(src, shape, sizes, "source")
    _check(dst, shape, sizes, "target")
    itemsize = np.dtype(dtype).itemsize
    ndim = len(shape)
    cur = [list(d) for d in src.dims]
    comms: list[Comm] = []

    def local() -> int:
        return _local_bytes(shape, cur, itemsize, sizes)

    src_where, dst_where, moved = _placement(src, dst)
    s_ = [tuple(a for a in d if a not in moved) for d in src.dims]
    d_ = [tuple(a for a in d if a not in moved) for d in dst.dims]
    reduce = [a for a in src.partial if a not in dst.partial]

    # 0c. a tensor split on one dim only (by axes S) wanted split on another dim only, by ONE axis Y
    # (S != (Y,), which is an all-to-all): in the emitted program, where the value being resharded
    # is pinned by a sharding constraint (an op result or a constrained operand), XLA 0.10 finds no
    # efficient path ("involuntary full rematerialization") and all-gathers the whole tensor over S,
    # then slices (``P(None,b) -> P(a,None)``, ``P(None,(a,b)) -> P(b,None)``; every 2-D pair on a 2x4
    # mesh and 3-D ones compiled, tests/test_cost.py). An unpinned value (a jit output left to
    # propagation) is sliced first instead; the simulator prices the emitted programs.
    if not src.partial and not dst.partial:
        s_dims = [i for i, d in enumerate(src.dims) if d]
        d_dims = [i for i, d in enumerate(dst.dims) if d]
        if (len(s_dims) == 1 and len(d_dims) == 1 and s_dims != d_dims
                and len(dst.dims[d_dims[0]]) == 1 and src.dims[s_dims[0]] != dst.dims[d_dims[0]]):
            return (Comm("all-gather", tuple(src.dims[s_dims[0]]),
                         _local_bytes(shape, [[] for _ in range(ndim)], itemsize, sizes)),)

    # 0. contained tiles: when axes change dimension but every dimension's new split refines its old
    # one (the new piece count is a multiple of the old), each device's new piece lies inside ONE
    # old piece: XLA sends it with one collective-permute (bytes = the new local piece), where the
    # steps below would price an all-to-all of the same bytes (``P(None,a) -> P(a,b)``).
    if moved and not reduce and all(
            math.prod(sizes[a] for a in d) % math.prod(sizes[a] for a in s) == 0
            for s, d in zip(src.dims, dst.dims)):
        axes = tuple(dict.fromkeys(src.axes + dst.axes))
        local_dst = _local_bytes(shape, dst.dims, itemsize, sizes)
        return (Comm("collective-permute", axes, local_dst),) if local_dst else ()

    # 0a. one axis X leaves a dim i that other axes Ys also split, for dim j (other dims unchanged),
    # as XLA 0.10 was seen to do it (tests/test_cost.py, 2x4 mesh):
    #   X major, Ys dropped, j empty (``P(None,(a,b)) -> P(a,None)``): "involuntary full
    #     rematerialization", one all-gather of the whole (dims i, j) block, then a slice;
    #   X minor, Ys dropped, j empty (``P(None,(a,b)) -> P(b,None)``): the all-to-all of the local
    #     piece first, then the all-gather over Ys;
    #   X major, Ys kept, j empty (``P(None,(a,b)) -> P(a,b)``): an all-to-all and a permute of the
    #     final piece (the Ys tiles change order).
    # and X alone on dim i going to a dim j split by more pieces (Ys, dropped) than X makes
    # (``P(a,b) -> P(None,a)``): a permute of the local piece, then all-gathers to X's and Ys' size.
    if len(moved) == 1 and not reduce and not src.partial and not dst.partial:
        (x,) = moved
        i, j = src_where[x], dst_where[x]
        si, sj, di, dj = src.dims[i], src.dims[j], dst.dims[i], dst.dims[j]
        same_rest = all(src.dims[k] == dst.dims[k] for k in range(ndim) if k not in (i, j))
        if same_rest and len(si) > 1 and not sj and dj == (x,):
            ys = tuple(a for a in si if a != x)
            if si[0] == x and not di:
                block = [list(d) if k not in (i, j) else [] for k, d in enumerate(src.dims)]
                comms = [Comm("all-gather", si, _local_bytes(shape, block, itemsize, sizes))]
                return tuple(c for c in comms if c.bytes > 0)
            if si[-1] == x and not di:
                comms = [Comm("all-to-all", (x,), _local_bytes(shape, src.dims, itemsize, sizes)),
                         Comm("all-gather", ys, _local_bytes(shape, dst.dims, itemsize, sizes))]
                return tuple(c for c in comms if c.bytes > 0)
            if si[0] == x and di == ys:
                local_dst = _local_bytes(shape, dst.dims, itemsize, sizes)
                comms = [Comm("all-to-all", (x,), local_dst), Comm("collective-permute", si, local_dst)]
                return tuple(c for c in comms if c.bytes > 0)
        if (same_rest and si == (x,) and sj and x not in sj and not di and dj == (x,)
                and math.prod(sizes[a] for a in sj) > sizes[x]):
            local_dst = _local_bytes(shape, dst.dims, itemsize, sizes)
            local_src = _local_bytes(shape, src.dims, itemsize, sizes)
            comms = [Comm("collective-permute", (x,) + tuple(sj), local_src),
                     Comm("all-gather", (x,), local_dst // sizes[x]),
                     Comm("all-gather", tuple(sj), local_dst)]
            return tuple(c for c in comms if c.bytes > 0)

    # 0b. one axis X leaves dim i for an empty dim j while one new axis Y takes its place on dim i
    # (``P(b,None) -> P(a,b)``): XLA slices Y onto dim j first and then swaps X and Y, an all-to-all
    # and a collective-permute of the final local piece each, where step 5 would price one
    # all-to-all of twice those bytes. Seen on 2-D and 3-D arrays for every (i, j) except i the
    # last dimension and j = i - 1, which is step 5's all-to-all then a slice (tests/test_cost.py).
    if len(moved) == 1 and not reduce and not src.partial and not dst.partial:
        (x,) = moved
        i, j = src_where[x], dst_where[x]
        new = [a for a in dst.axes if a not in src_where]
        if (len(new) == 1 and src.dims[i] == (x,) and dst.dims[i] == (new[0],) and not src.dims[j]
                and dst.dims[j] == (x,) and not (i == ndim - 1 and j == i - 1)
                and all(src.dims[k] == dst.dims[k] for k in range(ndim) if k not in (i, j))):
            local_dst = _local_bytes(shape, dst.dims, itemsize, sizes)
            comms = [Comm("all-to-all", (x,), local_dst), Comm("collective-permute", (x, new[0]), local_dst)]
            return tuple(c for c in comms if c.bytes > 0)
        # the same on a 3-D array with Y landing on the third dimension k: XLA's order depends on
        # (i, j, k); j last is step 5 (slice Y, then one all-to-all), the rest as seen in HLO
        k = dst_where.get(new[0], -1) if len(new) == 1 else -1
        if (ndim == 3 and len(new) == 1 and k not in (i, j, -1) and j != ndim - 1
                and src.dims[i] == (x,) and not src.dims[j] and not src.dims[k]
                and dst.dims[j] == (x,) and dst.dims[k] == (new[0],) and not dst.dims[i]):
            local_dst = _local_bytes(shape, dst.dims, itemsize, sizes)
            if (i, j, k) == (1, 0, 2):  # one all-to-all of the unsliced piece, then a slice
                comms = [Comm("all-to-all", (x,), _local_bytes(shape, src.dims, itemsize, sizes))]
            else:  # (2, 0, 1) and (0, 1, 2): two all-to-alls of the final piece
                comms = [Comm("all-to-all", (x,), local_dst), Comm("all-to-all", (x, new[0]), local_dst)]
            return tuple(c for c in comms if c.bytes > 0)

    # 1. free slices, and the reduce-scatter candidates of step 2
    scatter: dict[int, list[str]] = {}
    mixed: dict[int, list[str]] = {}
    for i in range(ndim):
        if any(a in moved for a in src.dims[i]):
            continue  # an axis leaves this dimension: XLA moves it first, slices after (below)
        if d_[i][:len(s_[i])] == s_[i]:
            new_axes = [a for a in d_[i][len(s_[i]):] if a not in src_where]
            if (any(a in reduce for a in new_axes) and
                    any(a not in reduce and a not in src.partial for a in new_axes)):
                # reduced axes split a dim together with others (``P()+partial(b) -> P((a,b))``):
                # XLA neither slices nor reduce-scatters it first, it all-reduces the whole
                # local piece and slices after
                mixed[i] = new_axes
                continue
            for a in d_[i][len(s_[i]):]:
                if a in src_where:
                    continue  # used elsewhere in src: cannot slice locally (handled below)
                if a in reduce:
                    scatter.setdefault(i, []).append(a)
                elif a not in src.partial:
                    cur[i].append(a)

    # 2. partial sums
    if reduce:
        if len(scatter) == 1:
            (i, axes), = scatter.items()
            cur[i].extend(axes)
            comms.append(Comm("reduce-scatter", tuple(axes), local()))
            rest = tuple(a for a in reduce if a not in axes)
        elif scatter:
            # scattered onto two or more dimensions: XLA all-reduces the whole local piece once per
            # mesh axis, the last dimension's first (``P(None,None)+partial(a,b) -> P(a,b)``: an
            # all-reduce over b, then one over a, then the slice), not once over all of them
            for i in sorted(scatter, reverse=True):
                for a in scatter[i]:
                    comms.append(Comm("all-reduce", (a,), local()))
            rest = tuple(a for a in reduce if not any(a in v for v in scatter.values()))
        else:
            rest = tuple(reduce)
        if rest:
            comms.append(Comm("all-reduce", rest, local()))
        for i, axes in list(scatter.items()) + list(mixed.items()):  # slices after it are free
            for a in axes:
                if a not in cur[i]:
                    cur[i].append(a)

    # 3. all-gathers of trailing axes, last dimension first
    for i in reversed(range(ndim)):
        if s_[i][:len(d_[i])] == d_[i] and len(s_[i]) > len(d_[i]):
            gone = s_[i][len(d_[i]):]
            cur[i] = [a for a in cur[i] if a not in gone]
            comms.append(Comm("all-gather", tuple(gone), local()))

    # 4. re-ordering within a dimension
    for i in range(ndim):
        if s_[i][:len(d_[i])] != d_[i] and d_[i][:len(s_[i])] != s_[i]:
            n_src = math.prod(sizes[a] for a in s_[i])
            n_dst = math.prod(sizes[a] for a in d_[i])
            kept_moved = [a for a in cur[i] if a in moved]
            axes = tuple(dict.fromkeys(s_[i] + d_[i]))
            if n_dst >= n_src:
                cur[i] = list(d_[i]) + kept_moved
                comms.append(Comm("collective-permute", axes, local()))
            else:
                comms.append(Comm("collective-permute", axes, local()))
                cur[i] = list(d_[i]) + kept_moved
                gone = tuple(a for a in s_[i] if a not in d_[i])
                comms.append(Comm("all-gather", gone, local()))

    # 5. all-to-alls for axes changing dimension
    pairs: dict[tuple[int, int], list[str]] = {}
    for a in sorted(moved, key=lambda a: (src_where[a], src.dims[src_where[a]].index(a))):
        pairs.setdefault((src_where[a], dst_where[a]), []).append(a)
    for (i, j), axes in pairs.items():
        cur[i] = [a for a in cur[i] if a not in axes]
        cur[j] = cur[j] + axes
        # a swap (axes going i -> j and others j -> i): XLA's second exchange is a permute
        kind = "collective-permute" if (j, i) in pairs and (j, i) < (i, j) else "all-to-all"
        comms.append(Comm(kind, tuple(axes), local()))
    for j in range(ndim):  # XLA: the moved axes landed minor to the wanted order: one more permute
        if pairs and set(cur[j]) == set(dst.dims[j]) and cur[j] != list(dst.dims[j]):
            cur[j] = list(dst.dims[j])
            comms.append(Comm("collective-permute", tuple(dst.dims[j]), local()))
    return tuple(c for c in comms if c.bytes > 0 and math.prod(sizes[a] for a in c.axes) > 1)


def _extensions(src: TensorSharding, dst: TensorSharding):
    """(dimension, axes) for each dimension whose split in `dst` extends its split in `src` (no
    axis leaving it): the axes it gains that split nothing in `src` (partial ones included)."""
    src_where, _, moved = _placement(src, dst)
    for i, (sd, dd) in enumerate(zip(src.dims, dst.dims)):
        if any(a in moved for a in sd):
            continue
        s_ = tuple(a for a in sd if a not in moved)
        d_ = tuple(a for a in dd if a not in moved)
        if d_[:len(s_)] == s_:
            got = tuple(a for a in d_[len(s_):] if a not in src_where)
            if got:
                yield i, got


def leading_slices(src: TensorSharding, dst: TensorSharding) -> dict[int, tuple[str, ...]]:
    """The local slices step 1 of `reshard_collectives` starts with, per dimension: the axes a
    dimension gains after its own (no axis leaving it) that split nothing else in `src`. XLA cuts
    these first (a dynamic-slice), whatever collectives follow."""
    out = {i: tuple(a for a in got if a not in src.partial) for i, got in _extensions(src, dst)}
    return {i: got for i, got in out.items() if got}


def after_reduction(src: TensorSharding, dst: TensorSharding) -> TensorSharding:
    """The sharding a partial `src` has right after steps 1-2 of `reshard_collectives` towards a
    non-partial `dst`: its free slices done and its partial axes reduced (scattered where step 2
    scatters). Equals `dst` when the reduction is all there is to do. `tag_jax.emit` constrains a
    partial op result to this: constraining it to `dst` itself lets GSPMD re-plan the producing
    dot instead (e.g. gather a batch-sized operand over `model` to make a weight gradient split
    differently), where the simulator prices reducing first and moving the small result after."""
    cur = [list(d) for d in src.dims]
    reduce = [a for a in src.partial if a not in dst.partial]
    scatter: dict[int, list[str]] = {}
    for i, got in _extensions(src, dst):
        for a in got:
            if a in reduce:
                scatter.setdefault(i, []).append(a)
            elif a not in src.partial:
                cur[i].append(a)
    for i, axes in scatter.items():
        cur[i].extend(axes)
    return TensorSharding(tuple(tuple(c) for c in cur), tuple(a for a in src.partial if a in dst.partial))


def comm_time(comm: Comm, mesh: MeshSpec, topology) -> float:
    """Seconds for `comm` on the topology: its device groups run at once, the slowest bounds."""
    return max(topology.collective_time(comm.kind, comm.bytes, g) for g in mesh.groups(comm.axes))
