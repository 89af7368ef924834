"""`emit`: a strategy becomes an ordinary `jax.jit` program.

The program re-evaluates the traced graph (`tag_jax.hlo.evaluate`) with a sharding constraint on each
op result, as the op's chosen strategy produces it, and on each operand an op wants resharded (one
constrained copy per (tensor, sharding), shared by every consumer that wants it, as the simulator
prices one reshard per (tensor, target)); arguments and results get `in_shardings` and
`out_shardings`. GSPMD cannot be asked for an unreduced partial sum, so a partial result is
constrained to what it is right after its reduction (reduce-scattered towards its consumer) when
all consumers want one sharding; otherwise XLA reduces it where it is made, as the simulator
prices it (a partial batched dot_general is all-reduced there: see below).

Layouts are not left to GSPMD's own choice, for two reasons. Fidelity: left free, GSPMD re-plans e.g.
every weight-gradient `dot_general` (a partial sum and a reduce-scatter of the weight-sized gradient
where the strategy gathers the batch-split output gradient and moves the activation with an
all-to-all), so the compiled collectives would differ from the plan (benchmarks/FIDELITY.md).
Correctness: XLA's SPMD partitioner (GSPMD and Shardy alike, jax 0.10.2) miscompiles some choices
it makes itself, e.g. a batched dot_general whose result it re-splits with the batch and
contraction axes swapped, or a convolution it partitions along a window dimension of a spatially
split operand; with every operand and result pinned it only ever moves data between the layouts
the plan names (tests/test_emit.py holds minimal reproductions).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding

from tag_jax.cost.reshard import after_reduction
from tag_jax.hlo.evaluate import evaluate
from tag_jax.hlo.graph import OpGraph
from tag_jax.strategy import OpStrategy, Strategy, TensorSharding


class EmitError(ValueError):
    """A strategy cannot become a program as given; the message says what, where, and what to do."""


def chosen(graph: OpGraph, strategy: Strategy,
           op_strategies: Sequence[Sequence[OpStrategy]]) -> tuple[OpStrategy, ...]:
    """The chosen `OpStrategy` of every op, after checking the lists line up with the graph."""
    if len(op_strategies) != len(graph.ops):
        raise EmitError(f"{len(op_strategies)} strategy lists for the {len(graph.ops)} ops of "
                        f"{graph.name}; build them with tag_jax.rules.for_graph(graph, mesh_axes)")
    if len(strategy.choices) != len(graph.ops):
        raise EmitError(f"strategy '{strategy.name}' has {len(strategy.choices)} op choices but "
                        f"{graph.name} has {len(graph.ops)} ops: it was made for another graph")
    if len(strategy.input_shardings) != len(graph.inputs):
        raise EmitError(f"strategy '{strategy.name}' shards {len(strategy.input_shardings)} inputs but "
                        f"{graph.name} takes {len(graph.inputs)}: it was made for another graph")
    out = []
    for op, options, k in zip(graph.ops, op_strategies, strategy.choices):
        if not 0 <= k < len(options):
            raise EmitError(f"strategy '{strategy.name}' picks option {k} for {op.where()}, which has "
                            f"{len(options)} option(s)")
        s = options[k]
        if len(s.inputs) != len(op.inputs) or len(s.outputs) != len(op.outputs):
            raise EmitError(f"option {s.name!r} of {op.where()} shards {len(s.inputs)} inputs and "
                            f"{len(s.outputs)} outputs; the op has {len(op.inputs)} and "
                            f"{len(op.outputs)}")
        out.append(s)
    return tuple(out)


def produced_shardings(graph: OpGraph, strategy: Strategy,
                       op_strategies: Sequence[Sequence[OpStrategy]]) -> dict[int, TensorSharding]:
    """The sharding every tensor has where it is made: inputs as planned, op results as chosen,
    constants replicated. Partial sums keep their `partial` axes."""
    picks = chosen(graph, strategy, op_strategies)
    out: dict[int, TensorSharding] = dict(zip(graph.inputs, strategy.input_shardings))
    for op, s in zip(graph.ops, picks):
        out.update(zip(op.outputs, s.outputs))
    for t in graph.tensors:
        out.setdefault(t.id, TensorSharding.replicated(len(t.shape)))
    return out


def output_shardings(graph: OpGraph, strategy: Strategy,
                     op_strategies: Sequence[Sequence[OpStrategy]]) -> tuple[TensorSharding, ...]:
    """The (non-partial) sharding of each graph result, in `graph.outputs` order. Carried state
    (`tag_jax.search.propagate.carried_outputs`: the new value of an argument) comes back sharded as
    its argument went in, so a step's output feeds the next step as is; this is the steady state
    `tag_jax.plan.simulate` prices (the simulator's `carried`), including the reshard it needs."""
    from tag_jax.search.propagate import carried_outputs

    made = produced_shardings(graph, strategy, op_strategies)
    by_input = dict(zip(graph.inputs, strategy.input_shardings))
    carried = carried_outputs(graph)
    return tuple(by_input[carried[t]] if t in carried else made[t].without_partial()
                 for t in graph.outputs)


def check(graph: OpGraph, strategy: Strategy, op_strategies: Sequence[Sequence[OpStrategy]],
          mesh_axes: Mapping[str, int]) -> None:
    """Raise `EmitError` if the strategy names an axis the mesh lacks, a sharding has the wrong rank,
    or an argument or result does not split evenly (jit requires it)."""
    picks = chosen(graph, strategy, op_strategies)
    axes = dict(mesh_axes)

    def one(ts: TensorSharding, tid: int, where: str, even: bool) -> None:
        t = graph.tensors[tid]
        problem = ts.problem(t.shape, axes)
        if problem:
            raise EmitError(f"{where} ({t.describe()}): {problem}")
        used = ts.axes + ts.partial
        if len(set(used)) != len(used):
            raise EmitError(f"{where}: sharding {ts} of {t.describe()} uses a mesh axis twice")
        if even:
            for n, d in zip(t.shape, ts.dims):
                k = math.prod(axes[a] for a in d)
                if n % k:
                    raise EmitError(f"{where}: {t.describe()} splits a dimension of size {n} into {k} "
                                    f"pieces over {d}; jit arguments and results must split evenly")

    for tid, ts in zip(graph.inputs, strategy.input_shardings):
        one(ts, tid, "argument", even=True)
        if ts.partial:
            raise EmitError(f"input {graph.tensors[tid].describe()}: an argument cannot be a partial "
                            f"sum ({ts}); give it a sharding without partial axes")
    for op, s in zip(graph.ops, picks):
        for tid, ts in zip(op.inputs, s.inputs):
            one(ts, tid, f"{op.where()} option {s.name!r} (input)", even=False)
        for tid, ts in zip(op.outputs, s.outputs):
            one(ts, tid, f"{op.where()} option {s.name!r} (output)", even=tid in graph.outputs)


def constraints(graph: OpGraph, strategy: Strategy,
                op_strategies: Sequence[Sequence[OpStrategy]]) -> dict[int, TensorSharding]:
    """The sharding constraint of every op result: as its op produces it; a partial result, when
    all its consumers want one non-partial sharding, as it is right after its reduction on the way
    there (`tag_jax.cost.reshard.after_reduction`: usually what they want), else all-reduced where
    it is made (what the simulator prices: GSPMD has no partial sharding between ops)."""
    picks = chosen(graph, strategy, op_strategies)
    wanted: dict[int, set[TensorSharding]] = {}
    for op, s in zip(graph.ops, picks):
        for tid, ts in zip(op.inputs, s.inputs):
            wanted.setdefault(tid, set()).add(ts)
    out: dict[int, TensorSharding] = {}
    for op, s in zip(graph.ops, picks):
        for tid, ts in zip(op.outputs, s.outputs):
            if not ts.partial:
                out[tid] = ts
                continue
            want = wanted.get(tid, set())
            if len(want) == 1 and not next(iter(want)).partial:
                # reduced as the simulator prices it (reduce-scatter where it can), then moved
                reduced = after_reduction(ts, next(iter(want)))
                if not reduced.partial:
                    out[tid] = reduced
            elif _batched_dot(op):
                # Left free, XLA's SPMD partitioner can miscompile a partial batched dot_general
                # (batch dims on one axis, contraction on another, result re-split with the two
                # swapped: wrong values; tests/test_emit.py): reduce it where it is made.
                out[tid] = ts.without_partial()
            # else: consumers disagree or carry the partial sum on; XLA reduces it where it is
            # made, towards what they want (the simulator prices the same, cost/simulate.py)
    return out


def _batched_dot(op) -> bool:
    if op.primitive != "dot_general":
        return False
    (_, _), (lhs_batch, _) = op.eqn.params["dimension_numbers"]
    return bool(lhs_batch)


def operand_constraints(graph: OpGraph, strategy: Strategy,
                        op_strategies: Sequence[Sequence[OpStrategy]]) -> dict[tuple[int, int], TensorSharding]:
    """{(op id, operand position): sharding} for the operands an op wants resharded: non-partial
    wanted shardings that differ from (the non-partial part of) how the tensor was produced."""
    picks = chosen(graph, strategy, op_strategies)
    made = produced_shardings(graph, strategy, op_strategies)
    out: dict[tuple[int, int], TensorSharding] = {}
    for op, s in zip(graph.ops, picks):
        for pos, (tid, ts) in enumerate(zip(op.inputs, s.inputs)):
            if ts.partial or tid in graph.constants:
                continue
            if ts != made[tid]:
                out[(op.id, pos)] = ts
    return out


def emit(graph: OpGraph, strategy: Strategy, op_strategies: Sequence[Sequence[OpStrategy]],
         jax_mesh: Mesh | None = None, *, donate_argnums: int | Sequence[int] = (),
         compiler_options: Mapping[str, Any] | None = None,
         constrain: bool | str = "operands", compression: Sequence[Any] = ()) -> Callable:
    """The jitted program of `strategy`, taking the traced function's positional arguments.

    `jax_mesh` defaults to `make_mesh(strategy.mesh)` (Auto axes). `constrain="operands"` (the
    default) pins op results and the operands each op wants resharded (see the module docstring),
    so the program does exactly what the strategy says. `True` pins op results only and `False`
    places only the argument and result shardings (GSPMD propagates the rest): debugging aids to
    tell a constraint problem from a program problem, not for use.
    `compression`: the plan's `tag_jax.search.compression.CompressionChoice`s; row-sparse and lossy
    ones replace their source ops (`tag_jax.emit.compressed`), SFB is in the strategy already.
    """
    if constrain not in (True, False, "operands"):
        raise EmitError(f"constrain={constrain!r}: give True (op results), False (arguments and "
                        f"results only) or 'operands' (op results and resharded operands)")
    from tag_jax.emit.mesh import make_mesh

    mesh = make_mesh(strategy.mesh) if jax_mesh is None else jax_mesh
    mesh_axes = dict(zip(mesh.axis_names, mesh.devices.shape))
    planned = strategy.mesh.axes
    if mesh_axes != planned:
        raise EmitError(f"strategy '{strategy.name}' was planned on mesh {planned} but the mesh given "
                        f"has axes {mesh_axes}; emit on a mesh with the planned axes and sizes")
    check(graph, strategy, op_strategies, mesh_axes)
    in_flat = [NamedSharding(mesh, ts.to_partition_spec()) for ts in strategy.input_shardings]
    out_flat = [NamedSharding(mesh, ts.to_partition_spec())
                for ts in output_shardings(graph, strategy, op_strategies)]
    in_tree = jax.tree_util.tree_unflatten(graph.in_tree, in_flat)
    args_shardings, kwargs_shardings = in_tree
    if kwargs_shardings:
        raise EmitError(f"{graph.name} was traced with keyword arguments {sorted(kwargs_shardings)}; "
                        "emitted programs take positional arguments only: trace it with them")
    out_shardings = jax.tree_util.tree_unflatten(graph.out_tree, out_flat)
    marks = ({tid: NamedSharding(mesh, ts.to_partition_spec())
              for tid, ts in constraints(graph, strategy, op_strategies).items()} if constrain else {})

    operand_marks = ({k: NamedSharding(mesh, ts.to_partition_spec())
                      for k, ts in operand_constraints(graph, strategy, op_strategies).items()}
                     if constrain == "operands" else {})
    replaced: dict = {}
    if compression:
        from tag_jax.emit.compressed import replacements

        replaced, as_made = replacements(graph, strategy, op_strategies, mesh, compression)
        operand_marks = {k: v for k, v in operand_marks.items() if k[0] not in as_made}

    def hook(tid: int, value: Any) -> Any:
        sharding = marks.get(tid)
        return value if sharding is None else jax.lax.with_sharding_constraint(value, sharding)

    def run(*args: Any) -> Any:
        flat, tree = jax.tree_util.tree_flatten((args, {}))
        if tree != graph.in_tree:
            raise EmitError(f"{graph.name} was planned for arguments of structure {graph.in_tree}, "
                            f"got {tree}; plan again for these arguments")
        copies: dict[tuple[int, Any], Any] = {}  # (id of the value, spec) -> constrained copy

        def operand(op_id: int, pos: int, value: Any) -> Any:
            sharding = operand_marks.get((op_id, pos))
            if sharding is None:
                return value
            key = (id(value), sharding.spec)
            if key not in copies:
                copies[key] = (value, jax.lax.with_sharding_constraint(value, sharding))
            return copies[key][1]

        return jax.tree_util.tree_unflatten(graph.out_tree, evaluate(graph, flat, hook, on_operand=operand,
                                                                   on_op=on_op if replaced else None))

    def on_op(op: Any, invals: list) -> list | None:
        fn = replaced.get(op.id)
        return None if fn is None else fn(invals)

    run.__name__ = run.__qualname__ = graph.name
    return jax.jit(run, in_shardings=tuple(args_shardings), out_shardings=out_shardings,
                   donate_argnums=donate_argnums, compiler_options=dict(compiler_options or {}) or None)
