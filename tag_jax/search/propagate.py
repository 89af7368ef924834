"""Greedy forward choice of op strategies from the shardings of the inputs.

`propagate` walks the ops in order and gives each the option whose wanted input shardings best match
the shardings its inputs already have: it minimises the bytes to reshard, breaks ties by more
parallel work (or by less: `ties="replicate"`, the baselines), then by the lower option index. It never looks ahead, so it expresses the hand-written
baselines (fix the inputs, let the rest follow) and seeds the search; it is not a planner on its own.

Resharding bytes here are a coarse, topology-free count (the simulator prices the real collectives):
reducing a partial sum costs the local bytes of the partial value, un-splitting a dimension (an
all-gather or all-to-all) costs the local bytes of the result, and slicing a replicated dimension is free.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

from tag_jax.hlo.graph import Op, OpGraph, Role
from tag_jax.strategy import MeshSpec, OpStrategy, TensorSharding


def reshard_bytes(src: TensorSharding | None, dst: TensorSharding, nbytes: float,
                  mesh_axes: Mapping[str, int]) -> float:
    """Bytes per device to turn a tensor sharded `src` into `dst` (None: free, e.g. a constant)."""
    if src is None or src == dst:
        return 0.0
    if len(src.dims) != len(dst.dims):
        return float(nbytes)
    cost = 0.0
    if any(a not in dst.partial for a in src.partial):
        cost += nbytes / src.shards(mesh_axes)  # all-reduce / reduce-scatter of the partial value
    if any(tuple(d[:len(s)]) != tuple(s) for s, d in zip(src.dims, dst.dims)):
        cost += nbytes / dst.shards(mesh_axes)  # all-gather / all-to-all into the wanted layout
    return cost


def parallelism(s: OpStrategy, mesh_axes: Mapping[str, int]) -> int:
    """Into how many pieces the option divides the op's work."""
    return math.prod(mesh_axes[a] for a in s.split_axes)


def propagate(graph: OpGraph, op_strategies: Sequence[Sequence[OpStrategy]], mesh: MeshSpec,
              input_shardings: Sequence[TensorSharding], *,
              prefer: Callable[[Op, OpStrategy], float] | None = None,
              outputs: Mapping[int, TensorSharding] | None = None,
              refine: int = 2, ties: str = "split") -> tuple[int, ...]:
    """One option index per op: a greedy forward pass, then `refine` local-improvement sweeps.

    `input_shardings`: the sharding of each graph input (in `graph.inputs` order).
    `prefer(op, option)`: a bonus in bytes, subtracted from the option's resharding bytes; when it
    has an attribute `key(op) -> hashable`, ops with the same key and the same option list (the
    same object) are given the same bonuses without asking again.
    `outputs`: wanted shardings of some graph results (tensor id -> sharding), e.g. the updated
    state should come out as the state went in; an op producing one pays the resharding to it.
    `refine`: sweeps (backward, then forward, ...) that re-choose each op given both its producers
    and its consumers, keeping a change only when it lowers the bytes around the op (or keeps them
    and divides more work). The forward pass alone cannot see that slicing a tensor for free forces
    a gather later; these sweeps undo such choices.
    `ties`: among options that reshard equally, "split" prefers the one dividing more work (the
    default); "replicate" the one dividing less, so that work is split only where that saves
    resharding (`tag_jax.baselines.baseline_strategy` prices both readings of a baseline).
    """
    if ties not in ("split", "replicate"):
        raise ValueError(f"ties={ties!r}: give 'split' or 'replicate'")
    sign = -1 if ties == "split" else 1
    if len(op_strategies) != len(graph.ops):
        raise ValueError(f"{len(op_strategies)} strategy lists for the {len(graph.ops)} ops of "
                         f"{graph.name}; build them with tag_jax.rules.for_graph")
    if len(input_shardings) != len(graph.inputs):
        raise ValueError(f"{len(input_shardings)} input shardings for the {len(graph.inputs)} "
                         f"inputs of {graph.name}")
    for op, options in zip(graph.ops, op_strategies):
        if not options:
            raise ValueError(f"{op.where()} has no strategy options; the rules must give at least "
                             "full replication")
    axes = mesh.axes
    wanted_out = dict(outputs or {})
    fixed: dict[int, TensorSharding | None] = dict(zip(graph.inputs, input_shardings))
    for tid in graph.constants:
        fixed[tid] = None  # a constant is made wherever it is wanted, in any layout
    uses: dict[int, list[tuple[int, int]]] = {}
    for op in graph.ops:
        for pos, tid in enumerate(op.inputs):
            uses.setdefault(tid, []).append((op.id, pos))
    choice: list[int | None] = [None] * len(graph.ops)
    nbytes_of = [t.nbytes for t in graph.tensors]

    out_pos = {tid: k for op in graph.ops for k, tid in enumerate(op.outputs)}
    producer_of = [t.producer for t in graph.tensors]
    factors: dict[tuple[int, int], float] = {}  # by object identity: the options are shared objects
    par: dict[int, tuple[int, int]] = {}
    bonus: dict[int, tuple[float, ...]] = {}  # prefer(op, option) per op, asked once
    answers: dict[tuple, list[tuple]] = {}  # keys() by what they depend on

    def factor(src: TensorSharding, dst: TensorSharding) -> float:
        k = (id(src), id(dst))
        f = factors.get(k)
        if f is None:
            f = factors[k] = reshard_bytes(src, dst, 1.0, axes)
        return f

    known = factors.get

    def made(tid: int) -> TensorSharding | None:
        p = producer_of[tid]
        if p is None:
            return fixed.get(tid)
        k = choice[p]
        return None if k is None else op_strategies[p][k].outputs[out_pos[tid]]

    prefer_key = getattr(prefer, "key", None)
    alike: dict[tuple, tuple[float, ...]] = {}  # bonuses of ops that `prefer.key` says are alike

    def bonuses(op: Op) -> tuple[float, ...]:
        b = bonus.get(op.id)
        if b is None:
            k = None if prefer_key is None else (id(op_strategies[op.id]), prefer_key(op))
            b = None if k is None else alike.get(k)
            if b is None:
                b = tuple(float(prefer(op, s)) for s in op_strategies[op.id])
                if k is not None:
                    alike[k] = b
            bonus[op.id] = b
        return b

    def keys(op: Op, look_ahead: bool) -> list[tuple]:
        """The sort key of each of the op's options: (bytes to reshard around it, less parallel
        work, fewer split axes, index; the middle two negated with `ties="replicate"`). What its neighbours have is read once for all options;
        the answer is remembered by what it depends on (repeated layers ask the same question)."""
        have = [(made(tid), nbytes_of[tid]) for tid in op.inputs]
        around = []  # per output: (bytes, wanted graph-result sharding, what its consumers want)
        for tid in op.outputs:
            consumers = []
            if look_ahead:
                for j, pos in uses.get(tid, ()):
                    c = choice[j]
                    if c is not None:
                        consumers.append(op_strategies[j][c].inputs[pos])
            around.append((nbytes_of[tid], wanted_out.get(tid), consumers))
        options = op_strategies[op.id]
        b = bonuses(op) if prefer is not None else None
        # (the shardings are shared objects that live as long as `op_strategies`: ids are stable)
        sig = (id(options), tuple((id(src), n) for src, n in have),
               tuple((n, id(w), tuple(map(id, cs))) for n, w, cs in around), b)
        out = answers.get(sig)
        if out is not None:
            return out
        out = []
        for k, s in enumerate(options):
            cost = 0.0
            for (src, nbytes), want in zip(have, s.inputs):
                if src is not None and src is not want:
                    f = known((id(src), id(want)))  # (inlined: the hot loop of the planner's seeds)
                    cost += (factor(src, want) if f is None else f) * nbytes
            for (nbytes, w, consumers), got in zip(around, s.outputs):
                if w is not None and w is not got:
                    cost += factor(got, w) * nbytes
                for want in consumers:
                    if want is not got:
                        f = known((id(got), id(want)))
                        cost += (factor(got, want) if f is None else f) * nbytes
            if b is not None:
                cost -= b[k]
            p = par.get(id(s))
            if p is None:
                p = par[id(s)] = (parallelism(s, axes), len(s.split_axes))
            out.append((round(cost, 3), sign * p[0], sign * p[1], k))
        answers[sig] = out
        return out

    for op in graph.ops:
        choice[op.id] = min(keys(op, look_ahead=False))[3]
    # After the first full sweep only the neighbours of ops that changed can want to change.
    todo = set(range(len(graph.ops)))
    for sweep in range(refine):
        changed: set[int] = set()
        for op in (reversed(graph.ops) if sweep % 2 == 0 else graph.ops):
            if op.id not in todo or len(op_strategies[op.id]) < 2:
                continue
            ranked = keys(op, look_ahead=True)
            k = min(ranked)[3]
            if k != choice[op.id] and ranked[k] < ranked[choice[op.id]]:
                choice[op.id] = k
                changed.add(op.id)
        if not changed:
            break
        todo = set()
        for i in changed:
            op = graph.ops[i]
            todo.update(p for p in (graph.tensors[t].producer for t in op.inputs) if p is not None)
            todo.update(j for t in op.outputs for j, _ in uses.get(t, ()))
    return tuple(int(k) for k in choice)


def carried_outputs(graph: OpGraph) -> dict[int, int]:
    """Results that are the new value of an argument (result tensor id -> input tensor id).

    A result matches an input of the same shape and dtype, with role parameter, optimizer state or
    state, whose path without the argument name ends the result's path: ``out/0/params/w`` is the
    new ``state/params/w``. Results with no unique match are left out.
    """
    carried_roles = (Role.PARAMETER, Role.OPTIMIZER_STATE, Role.STATE)
    by_tail: dict[tuple[str, ...], list[int]] = {}
    for tid in graph.inputs:
        t = graph.tensors[tid]
        if t.role in carried_roles and t.path:
            by_tail.setdefault(tuple(t.path.split("/")[1:]), []).append(tid)
    out: dict[int, int] = {}
    for tid in graph.outputs:
        t = graph.tensors[tid]
        if not t.path:
            continue
        parts = tuple(t.path.split("/"))
        for n in range(len(parts), 0, -1):
            hits = [i for i in by_tail.get(parts[-n:], ()) if graph.tensors[i].shape == t.shape
                    and graph.tensors[i].dtype == t.dtype]
            if len(hits) == 1:
                out[tid] = hits[0]
                break
            if len(hits) > 1:
                break
    return out
