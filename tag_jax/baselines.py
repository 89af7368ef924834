"""The plans people write by hand, over the same strategy space as the planner.

Each baseline fixes the argument shardings by a simple rule, then lets `propagate` choose every op's
option greedily (and asks carried state to come out as it went in):

- `data_parallel`: batch inputs split on dimension 0 over all mesh axes (as many as divide it),
  parameters, optimizer state and other state replicated.
- `fsdp` (ZeRO-3): batch as data parallel; every parameter and optimizer-state tensor split on its
  largest dimension that the whole mesh divides. Ops are chosen as for data parallel (weights are
  gathered where they are used) and the update produces the sharded state.
- `megatron`: a (data, model) mesh. Batch on `data`; weights by the Megatron-LM recipe, recognised by
  the names in their paths (`MEGATRON_COLUMN`, `MEGATRON_ROW`, embedding tables): column-parallel
  kernels split their output (last) dimension over `model` (their biases too), row-parallel kernels
  their input dimension (second to last), embedding tables their vocabulary (first) dimension;
  everything else replicated. Optimizer state follows its parameter (matched by path suffix).
  A 1-D mesh is viewed as (data, model) with model = devices per node of the topology (2 when no
  topology is given); a 2-D mesh's first axis plays data and its second model.

Each returns a `ShardedFunction`: call it, `.lower(*args)`, `.plan(*args) -> Plan`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

from jax.sharding import Mesh

from tag_jax.hlo.graph import OpGraph, Role
from tag_jax.plan import Plan, ShardedFunction
from tag_jax.strategy import MeshSpec, Strategy, TensorSharding

# Layer names, as the zoo (GPT-2, BERT, T5) and the common checkpoints name them: Hugging Face's
# Llama/Mistral (q_proj ... down_proj), Meta's Llama (wq ... w3), GPT-NeoX (query_key_value)
MEGATRON_COLUMN = frozenset({"c_attn", "c_fc", "query", "key", "value", "wi", "fc1", "intermediate",
                             "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "wq", "wk", "wv",
                             "w1", "w3", "query_key_value", "dense_h_to_4h"})
MEGATRON_ROW = frozenset({"c_proj", "out", "wo", "fc2", "output", "o_proj", "down_proj", "w2",
                          "dense_4h_to_h"})
# `nn.MultiHeadDotProductAttention`'s projections are DenseGeneral with a heads dimension:
# splitting heads keeps each head's attention on one device (head_dim would make the scores a
# partial sum to all-reduce)
_HEADED = frozenset({"query", "key", "value", "out"})
_NOT_VOCAB = ("pos", "wpe", "type", "rel")  # position / token-type / relative-bias tables stay replicated

BASELINES = ("data_parallel", "fsdp", "megatron")


# ---- argument shardings -------------------------------------------------------------------------

def _split_dim(ndim: int, dim: int, axes: Sequence[str]) -> TensorSharding:
    dims = [()] * ndim
    dims[dim] = tuple(axes)
    return TensorSharding(tuple(dims))


def _dividing_axes(n: int, axes: Sequence[str], mesh_axes: Mapping[str, int]) -> tuple[str, ...]:
    """The longest prefix of `axes` whose product divides n."""
    out: list[str] = []
    for a in axes:
        if n % math.prod(mesh_axes[x] for x in out + [a]):
            break
        out.append(a)
    return tuple(out)


def _batch(shape: tuple[int, ...], axes: Sequence[str], mesh_axes: Mapping[str, int]) -> TensorSharding:
    if not shape:
        return TensorSharding.replicated(0)
    use = _dividing_axes(shape[0], axes, mesh_axes)
    return _split_dim(len(shape), 0, use) if use else TensorSharding.replicated(len(shape))


def _largest_dim(shape: tuple[int, ...], axes: Sequence[str],
                 mesh_axes: Mapping[str, int]) -> TensorSharding:
    """Split the largest dimension the whole of `axes` divides (ties: the first); else replicate."""
    k = math.prod(mesh_axes[a] for a in axes)
    fits = [i for i, n in enumerate(shape) if n % k == 0 and n >= k]
    if not fits or not axes:
        return TensorSharding.replicated(len(shape))
    dim = max(fits, key=lambda i: (shape[i], -i))
    return _split_dim(len(shape), dim, axes)


def _param_parts(path: str) -> list[str]:
    """A parameter's path from below `params/`, without the trailing `value` of a Flax NNX
    variable (`state/fc1/kernel/value`: its array is the variable's `value`)."""
    parts = path.split("/")
    if "params" in parts:
        parts = parts[parts.index("params") + 1:]
    if len(parts) > 1 and parts[-1] == "value":
        parts = parts[:-1]
    return parts


def megatron_dim(path: str, shape: tuple[int, ...]) -> int | None:
    """Which dimension of a parameter Megatron-LM splits over `model` (None: replicated)."""
    parts = _param_parts(path)
    leaf = parts[-1] if parts else ""
    if not shape:
        return None
    heads = len(parts) > 1 and parts[-2] in _HEADED  # Flax's attention: kernels split by head
    # (dims counted from the end, so stacked layers' leading axis, `nn.scan`, is never split)
    if any(p in MEGATRON_COLUMN for p in parts):
        if heads and len(shape) >= (3 if leaf == "kernel" else 2):
            return len(shape) - 2  # kernel (features, heads, head_dim), bias (heads, head_dim)
        return len(shape) - 1
    if any(p in MEGATRON_ROW for p in parts):
        if heads and leaf == "kernel" and len(shape) >= 3:  # (heads, head_dim, features)
            return len(shape) - 3
        return None if len(shape) == 1 or leaf == "bias" else len(shape) - 2
    is_table = leaf == "embedding" or leaf.startswith("table") or "embed" in leaf
    if is_table and len(shape) == 2 and not any(w in p for p in parts for w in _NOT_VOCAB):
        return 0
    return None


def _follow_params(graph: OpGraph, shardings: dict[int, TensorSharding]) -> None:
    """Give each optimizer-state tensor the sharding of the parameter whose path (after `params/`)
    ends its own path and whose shape it has; replicate the rest."""
    # every ending of every parameter's path (an NNX model's `0/fc1/kernel` must meet its
    # optimizer's `opt_state/0/mu/fc1/kernel`): the longest ending shared with one parameter of
    # the same shape is the match
    endings: dict[tuple, set[int]] = {}
    for tid in graph.inputs:
        t = graph.tensors[tid]
        if t.role == Role.PARAMETER and t.path:
            parts = tuple(_param_parts(t.path))
            if "params" not in t.path.split("/"):
                parts = parts[1:]  # below the argument's name
            for n in range(1, len(parts) + 1):
                endings.setdefault(parts[-n:], set()).add(tid)
    for tid in graph.inputs:
        t = graph.tensors[tid]
        if t.role != Role.OPTIMIZER_STATE:
            continue
        parts = tuple(_param_parts(t.path or ""))
        match = None
        for n in range(len(parts), 0, -1):
            same = [p for p in endings.get(parts[-n:], ()) if graph.tensors[p].shape == t.shape]
            if len(same) == 1:
                match = same[0]
                break
            if same:  # several parameters end so: a longer ending did not tell them apart
                break
        shardings[tid] = shardings[match] if match is not None else TensorSharding.replicated(len(t.shape))


def input_shardings(kind: str, graph: OpGraph, mesh: MeshSpec) -> tuple[TensorSharding, ...]:
    """The argument shardings of a baseline (`data_parallel`, `fsdp` or `megatron`)."""
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; baselines are {BASELINES}")
    axes = mesh.axes
    names = mesh.axis_names
    if kind == "megatron" and len(names) != 2:
        raise ValueError(f"megatron needs a (data, model) mesh; got axes {axes}")
    out: dict[int, TensorSharding] = {}
    for tid in graph.inputs:
        t = graph.tensors[tid]
        if t.role == Role.BATCH:
            out[tid] = _batch(t.shape, names[:1] if kind == "megatron" else names, axes)
        elif t.role in (Role.PARAMETER, Role.OPTIMIZER_STATE) and kind == "fsdp":
            out[tid] = _largest_dim(t.shape, names, axes)
        elif t.role == Role.PARAMETER and kind == "megatron":
            dim = megatron_dim(t.path or "", t.shape)
            model = names[1]
            if dim is not None and t.shape[dim] % axes[model] == 0:
                out[tid] = _split_dim(len(t.shape), dim, (model,))
            else:
                out[tid] = TensorSharding.replicated(len(t.shape))
        else:
            out[tid] = TensorSharding.replicated(len(t.shape))
    if kind == "megatron":
        _follow_params(graph, out)
    return tuple(out[t] for t in graph.inputs)


def baseline_strategy(kind: str, graph: OpGraph, op_strategies, mesh: MeshSpec, *,
                      simulator=None, memory_limit: float | None = None) -> Strategy:
    """The baseline's whole strategy: its argument shardings, then op options by `propagate`.

    The arguments fix the plan; what the ops do in between can be read two ways, both plans of
    this kind: split work wherever slicing is free (`ties="split"`, returned without a
    `simulator`), or only where that saves resharding (`ties="replicate"`). Neither is always
    the faster: on GPT-2 small over 25 GbE the first slices data parallel's optimizer update and
    gathers the parameters and both Adam moments back (3x the bytes of all-reducing the
    gradients, which the second does: 0.67 -> 0.57 s), on mlp toy the second gathers an
    activation. A person writing the plan would take the faster, so with a `simulator` (of this
    graph, `op_strategies` and mesh) both are priced and the faster that fits in `memory_limit`
    is returned: the search's seeds, and so the benchmarks' baselines, are never the weaker."""
    ins = input_shardings(kind, graph, mesh)
    # FSDP computes as data parallel (weights gathered at use); only the stored state is sharded.
    seed = input_shardings("data_parallel", graph, mesh) if kind == "fsdp" else ins
    prefer = _megatron_prefer(graph, mesh, ins) if kind == "megatron" else None

    def read(ties: str) -> Strategy:
        return propagated_strategy(graph, op_strategies, mesh, ins, kind, seed=seed, prefer=prefer,
                                   ties=ties)

    sliced = read("split")
    if simulator is None:
        return sliced
    kept = read("replicate")
    if kept.choices == sliced.choices:
        return sliced

    def score(strategy: Strategy) -> tuple[bool, float]:
        cost = simulator.cost(strategy)
        over = memory_limit is not None and cost.peak_memory_bytes > memory_limit
        return over, cost.step_time_s

    return min((sliced, kept), key=score)


def propagated_strategy(graph: OpGraph, op_strategies, mesh: MeshSpec, ins: Sequence[TensorSharding],
                        name: str, *, seed: Sequence[TensorSharding] | None = None, prefer=None,
                        ties: str = "split") -> Strategy:
    """Arguments stored as `ins`, ops chosen by `propagate` from `seed` (default `ins`: the layout
    they are computed in), updated state wanted back in its argument's layout."""
    from tag_jax.search.propagate import carried_outputs, propagate

    by_input = dict(zip(graph.inputs, ins))
    wanted = {out: by_input[src] for out, src in carried_outputs(graph).items()}
    choices = propagate(graph, op_strategies, mesh, ins if seed is None else seed, outputs=wanted,
                        prefer=prefer, ties=ties)
    return Strategy(mesh, choices, tuple(ins), name=name)


def _megatron_prefer(graph: OpGraph, mesh: MeshSpec, ins: Sequence[TensorSharding]):
    """Megatron's rules for the greedy pass, as byte penalties:
    weights are used where they lie (resharding a parameter argument costs 1000x its bytes, so
    the column/row-parallel matmuls are chosen even where moving small weights would be cheaper);
    `data` and `model` never split the same dimension; and any use of `model` costs one byte more,
    so that ties do not spread it over activations where slicing is free."""
    from tag_jax.search.propagate import reshard_bytes

    data, model = mesh.axis_names
    axes = mesh.axes
    params = {t: s for t, s in zip(graph.inputs, ins) if graph.tensors[t].role == Role.PARAMETER}

    def prefer(op, s) -> float:
        penalty = 1000.0 * sum(reshard_bytes(params[t], want, graph.tensors[t].nbytes, axes)
                               for t, want in zip(op.inputs, s.inputs) if t in params)
        if model in s.split_axes:
            penalty += 1.0
            if any(data in d and model in d for t in s.inputs + s.outputs for d in t.dims):
                penalty += float(sum(graph.tensors[t].nbytes for t in op.inputs + op.outputs))
        return -penalty

    def key(op) -> tuple:
        # what `prefer` reads of an op besides its option: its parameter operands' shardings (the
        # objects, which `params` holds) and bytes, and the bytes it reads and writes
        return (tuple((id(params.get(t)), graph.tensors[t].nbytes) for t in op.inputs),
                sum(graph.tensors[t].nbytes for t in op.inputs + op.outputs))

    prefer.key = key
    return prefer


# ---- meshes and topologies ----------------------------------------------------------------------

def check_topology(topology: Any, mesh: MeshSpec) -> None:
    """Raise TopologyError unless the topology describes every device of the mesh."""
    from tag_jax.topology import TopologyError

    if topology.num_devices < mesh.size:
        raise TopologyError(
            f"the mesh {mesh.axes} has {mesh.size} devices but topology '{topology.name}' describes "
            f"only {topology.num_devices}; pass a topology of all the mesh's devices "
            "(Topology.detect() sees every device JAX has) or use a smaller mesh")
    topology.check_ids(mesh.device_ids)


def megatron_mesh(mesh: MeshSpec, topology: Any = None) -> MeshSpec:
    """(data, model) view of a mesh: 2-D meshes as they are; a 1-D mesh reshaped with
    model = devices per node (of the topology, restricted to the mesh; 2 without a topology)."""
    from tag_jax.emit.mesh import reshape_spec

    if len(mesh.shape) == 2:
        return mesh
    if len(mesh.shape) != 1:
        raise ValueError(f"megatron takes a 1-D or (data, model) 2-D mesh, got axes {mesh.axes}")
    n = mesh.size
    if topology is None:
        per_node = 2
    else:
        ids = set(mesh.device_ids)
        counts = [len(ids.intersection(node)) for node in topology.nodes]
        per_node = min(c for c in counts if c) if any(counts) else 1
    model = math.gcd(per_node, n)
    return reshape_spec(mesh, (n // model, model), ("data", "model"))


def _planner(kind: str, mesh: Mesh, topology: Any, in_specs: Any = None) -> Callable[[OpGraph], Plan]:
    """Plans of one kind on `mesh`: a baseline, or with `kind="hand_written"` the user's
    `in_specs` (`tag_jax.hand_written`)."""
    from tag_jax.emit.mesh import make_mesh, mesh_spec

    spec = mesh_spec(mesh)
    if kind == "megatron":
        spec = megatron_mesh(spec, topology)
    if topology is None:
        from tag_jax.topology import Topology

        topology = Topology.detect()
    check_topology(topology, spec)

    def plan(graph: OpGraph) -> Plan:
        from tag_jax import rules

        op_strategies = rules.for_graph(graph, spec.axes)
        if kind == "hand_written":
            from tag_jax.hand_written import hand_written_strategy

            strategy = hand_written_strategy(graph, op_strategies, spec, in_specs)
        else:
            strategy = baseline_strategy(kind, graph, op_strategies, spec)
        return Plan.build(graph, strategy, op_strategies, topology, jax_mesh=make_mesh(spec))

    return plan


def _baseline(kind: str, fn: Callable, mesh: Mesh, topology: Any, donate_argnums,
              compiler_options) -> ShardedFunction:
    return ShardedFunction(fn, _planner(kind, mesh, topology), donate_argnums=donate_argnums,
                           compiler_options=compiler_options)


def data_parallel(fn: Callable, mesh: Mesh, topology: Any = None, *,
                  donate_argnums: int | Sequence[int] = (),
                  compiler_options: Mapping[str, Any] | None = None) -> ShardedFunction:
    """Batch split over every mesh axis; parameters and optimizer state replicated."""
    return _baseline("data_parallel", fn, mesh, topology, donate_argnums, compiler_options)


def fsdp(fn: Callable, mesh: Mesh, topology: Any = None, *,
         donate_argnums: int | Sequence[int] = (),
         compiler_options: Mapping[str, Any] | None = None) -> ShardedFunction:
    """ZeRO-3: batch as data parallel; parameters and optimizer state split over every mesh axis."""
    return _baseline("fsdp", fn, mesh, topology, donate_argnums, compiler_options)


def megatron(fn: Callable, mesh: Mesh, topology: Any = None, *,
             donate_argnums: int | Sequence[int] = (),
             compiler_options: Mapping[str, Any] | None = None) -> ShardedFunction:
    """Megatron-LM 2-D: batch over `data`, column/row-parallel weights over `model`."""
    return _baseline("megatron", fn, mesh, topology, donate_argnums, compiler_options)


def hand_written(fn: Callable, mesh: Mesh, in_specs: Sequence[Any], topology: Any = None, *,
                 donate_argnums: int | Sequence[int] = (),
                 compiler_options: Mapping[str, Any] | None = None) -> ShardedFunction:
    """Your own plan, priced by the same simulator: `in_specs` as `jax.jit(in_shardings=...)`
    takes them, in PartitionSpecs over `mesh`'s axes (`tag_jax.hand_written`)."""
    return ShardedFunction(fn, _planner("hand_written", mesh, topology, in_specs),
                           donate_argnums=donate_argnums, compiler_options=compiler_options)


# ---- the Alpa-style ILP -------------------------------------------------------------------------

def _ilp_planner(mesh: Mesh, topology: Any, time_limit_s: float,
                 memory_limit: float | None) -> Callable[[OpGraph], Plan]:
    from tag_jax.emit.mesh import make_mesh, mesh_spec

    spec = mesh_spec(mesh)
    if topology is None:
        from tag_jax.topology import Topology

        topology = Topology.detect()
    check_topology(topology, spec)

    def plan(graph: OpGraph) -> Plan:
        from tag_jax import rules
        from tag_jax.search.ilp import ilp_strategy

        op_strategies = rules.for_graph(graph, spec.axes)
        strategy, info = ilp_strategy(graph, op_strategies, topology, spec,
                                      time_limit_s=time_limit_s, memory_limit=memory_limit)
        return Plan.build(graph, strategy, op_strategies, topology, jax_mesh=make_mesh(spec),
                          cost=info["cost"])

    return plan


def ilp(fn: Callable, mesh: Mesh, topology: Any = None, *, time_limit_s: float = 30.0,
        memory_limit: float | None = None, donate_argnums: int | Sequence[int] = (),
        compiler_options: Mapping[str, Any] | None = None) -> ShardedFunction:
    """Alpa-style ILP over the planner's strategy space on `mesh` as given
    (`tag_jax.search.ilp`): exact within `time_limit_s`, else the best solution found by then.
    Not in `BASELINES`: its argument shardings come from the solver, not from a rule."""
    return ShardedFunction(fn, _ilp_planner(mesh, topology, time_limit_s, memory_limit),
                           donate_argnums=donate_argnums, compiler_options=compiler_options)
