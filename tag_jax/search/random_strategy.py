"""Random valid strategies: the fuzzing side of the search space.

    random_strategy(graph, op_strategies, mesh, rng, *, mode=None, p=None, shuffle_devices=None)

Draws a whole `Strategy` that `tag_jax.emit.check` accepts:

- argument shardings: each graph input (parameters, optimizer state, batch alike) is replicated,
  or has one dimension split by one or more mesh axes (in mesh order), or two dimensions split by
  one axis each; only axes (of size > 1) whose product divides the dimension; never partial.
- op choices, by `mode`: ``"uniform"`` picks uniformly among each op's options; ``"mix"`` takes,
  with probability `p`, the option a greedy forward pass would take given the shardings the op's
  inputs actually have (fewest resharding bytes, as `propagate` counts them; ties to more
  parallel work, then the lower index), and otherwise a uniform one. `mode=None` draws one of the
  two (and `p` uniformly in [0.3, 0.9]).
- ops producing a graph result choose among options that give it non-partial and evenly split
  (jit results must be); if an op has none, the first option (full replication) is taken.
- the device order (`MeshSpec.device_ids`) is shuffled with probability 1/2 by default.

`rng` is a `numpy.random.Generator` (or a seed). The strategy's name records how it was drawn.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np

from tag_jax.hlo.graph import OpGraph
from tag_jax.search.propagate import parallelism, reshard_bytes
from tag_jax.strategy import MeshSpec, OpStrategy, Strategy, TensorSharding

MODES = ("uniform", "mix")


def input_sharding_options(shape: Sequence[int], mesh: MeshSpec) -> tuple[TensorSharding, ...]:
    """Every valid non-partial sharding of an argument of `shape` that splits at most two dims."""
    axes = mesh.axes
    usable = [a for a in mesh.axis_names if axes[a] > 1]
    ndim = len(shape)
    out = [TensorSharding.replicated(ndim)]
    # groups of axes (in mesh order) that may split one dimension
    groups = [g for r in range(1, len(usable) + 1) for g in itertools.combinations(usable, r)]
    for d in range(ndim):
        for g in groups:
            if shape[d] % math.prod(axes[a] for a in g) == 0:
                dims = [()] * ndim
                dims[d] = g
                out.append(TensorSharding(tuple(dims)))
    for d1, d2 in itertools.permutations(range(ndim), 2):
        for a1, a2 in itertools.permutations(usable, 2):
            if d1 < d2 and shape[d1] % axes[a1] == 0 and shape[d2] % axes[a2] == 0:
                dims = [()] * ndim
                dims[d1], dims[d2] = (a1,), (a2,)
                out.append(TensorSharding(tuple(dims)))
    return tuple(out)


def _result_ok(ts: TensorSharding, shape: Sequence[int], axes) -> bool:
    return not ts.partial and all(n % math.prod(axes[a] for a in d) == 0 for n, d in zip(shape, ts.dims))


def random_strategy(graph: OpGraph, op_strategies: Sequence[Sequence[OpStrategy]], mesh: MeshSpec,
                    rng: np.random.Generator | int, *, mode: str | None = None, p: float | None = None,
                    shuffle_devices: bool | None = None, name: str | None = None) -> Strategy:
    """One random valid strategy (see the module docstring)."""
    rng = np.random.default_rng(rng)
    if len(op_strategies) != len(graph.ops):
        raise ValueError(f"{len(op_strategies)} strategy lists for the {len(graph.ops)} ops of "
                         f"{graph.name}; build them with tag_jax.rules.for_graph(graph, mesh.axes)")
    if mode is None:
        mode = MODES[int(rng.integers(len(MODES)))]
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; modes are {MODES}")
    if p is None:
        p = float(rng.uniform(0.3, 0.9)) if mode == "mix" else 0.0
    if shuffle_devices is None:
        shuffle_devices = bool(rng.integers(2))
    axes = mesh.axes
    if shuffle_devices:
        mesh = MeshSpec(mesh.shape, mesh.axis_names, tuple(int(i) for i in rng.permutation(mesh.device_ids)))

    ins = []
    for tid in graph.inputs:
        options = input_sharding_options(graph.tensors[tid].shape, mesh)
        ins.append(options[int(rng.integers(len(options)))])

    made: dict[int, TensorSharding | None] = dict(zip(graph.inputs, ins))
    for tid in graph.constants:
        made[tid] = None  # made wherever it is wanted
    results = set(graph.outputs)
    choices = []
    greedy_picks = 0
    for op, options in zip(graph.ops, op_strategies):
        if not options:
            raise ValueError(f"{op.where()} has no strategy options")
        allowed = [k for k, s in enumerate(options)
                   if all(_result_ok(ts, graph.tensors[t].shape, axes)
                          for t, ts in zip(op.outputs, s.outputs) if t in results)] or [0]
        if mode == "mix" and rng.random() < p:
            def key(k: int) -> tuple:
                s = options[k]
                cost = sum(reshard_bytes(made.get(t), want, graph.tensors[t].nbytes, axes)
                           for t, want in zip(op.inputs, s.inputs))
                return (round(cost, 3), -parallelism(s, axes), k)
            k = min(allowed, key=key)
            greedy_picks += 1
        else:
            k = allowed[int(rng.integers(len(allowed)))]
        choices.append(k)
        made.update(zip(op.outputs, options[k].outputs))
    label = name or (f"random-{mode}" + (f"(p={p:.2f})" if mode == "mix" else "")
                     + ("-shuffled" if shuffle_devices else ""))
    return Strategy(mesh, tuple(choices), tuple(ins), name=label)


__all__ = ["random_strategy", "input_sharding_options", "MODES"]
