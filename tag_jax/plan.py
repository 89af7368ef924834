"""`Plan`: a chosen strategy, as shardings people can read, save, reload and run.

A plan holds the mesh it runs on (Auto axes, devices in the planned order), the strategy (one option
per op, one sharding per argument), the argument and result shardings as pytrees of `NamedSharding`,
and the simulator's prediction. `ShardedFunction` is the jit-like object that plans once per input
signature and runs the emitted program; the baselines and `auto_shard` return one.

Saved plans are JSON with a format version, the graph fingerprint (primitives and shapes of every op)
and the topology fingerprint; loading one for another function or topology is refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import types
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from tag_jax.hlo.graph import OpGraph
from tag_jax.strategy import MeshSpec, OpStrategy, Strategy, TensorSharding

FORMAT = "tag_jax.plan"
VERSION = 1
_COST_FIELDS = ("step_time_s", "compute_s", "comm_s", "comm_bytes", "peak_memory_bytes")


class PlanMismatchError(ValueError):
    """A saved plan does not belong to this function, topology or version of tag_jax."""


def graph_fingerprint(graph: OpGraph) -> str:
    """sha256 over each op's primitive and its inputs' and outputs' shapes and dtypes, in order.

    Paths, names and source lines are left out: renaming a variable keeps the plan valid.
    """
    h = hashlib.sha256()

    def sig(tids: Sequence[int]) -> str:
        return ";".join(f"{graph.tensors[t].dtype.name}{list(graph.tensors[t].shape)}" for t in tids)

    h.update(f"in:{sig(graph.inputs)}|out:{sig(graph.outputs)}\n".encode())
    for op in graph.ops:
        h.update(f"{op.primitive}({sig(op.inputs)})->({sig(op.outputs)})x{op.trips}\n".encode())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Argument:
    """One flat argument of the planned function, as the summary and saved plans show it."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    role: str
    sharding: TensorSharding

    @property
    def is_key(self) -> bool:
        """A typed PRNG key, stored as "void<bits>" (`tag_jax.hlo.trace.storage_dtype`)."""
        return self.dtype.startswith("void")

    @property
    def itemsize(self) -> int:
        return int(self.dtype[4:]) // 8 if self.is_key else np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """A strategy made concrete. Build with `Plan.build`; reload with `Plan.load`."""

    mesh: Mesh
    strategy: Strategy
    in_shardings: Any  # pytree of NamedSharding matching the arguments (tuple of positional args)
    out_shardings: Any  # pytree of NamedSharding matching the results
    cost: Any | None  # tag_jax.cost.Cost: step_time_s, compute_s, comm_s, comm_bytes, peak_memory_bytes
    arguments: tuple[Argument, ...]
    function: str
    fingerprint: str  # graph_fingerprint of the planned graph
    topology_fingerprint: str | None = None
    graph: OpGraph | None = dataclasses.field(default=None, repr=False)
    op_strategies: tuple[tuple[OpStrategy, ...], ...] | None = dataclasses.field(default=None, repr=False)
    topology: Any = dataclasses.field(default=None, repr=False)
    # per-gradient compression (tag_jax.search.compression.CompressionChoice), and the same plan's
    # cost without it
    compression: tuple = ()
    uncompressed_cost: Any | None = dataclasses.field(default=None, repr=False)

    def __repr__(self) -> str:
        axes = ", ".join(f"{n}={k}" for n, k in self.strategy.mesh.axes.items())
        step = "" if self.cost is None else f", predicted step {_seconds(self.cost.step_time_s)}"
        return f"Plan({self.strategy.name!r} for {self.function}, mesh {axes}{step})"

    # ---- making and running ----------------------------------------------------------------
    @classmethod
    def build(cls, graph: OpGraph, strategy: Strategy, op_strategies: Sequence[Sequence[OpStrategy]],
              topology: Any = None, *, jax_mesh: Mesh | None = None, cost: Any = "simulate",
              compression: Sequence[Any] = (), uncompressed_cost: Any = None) -> "Plan":
        """Check the strategy against the graph and mesh, predict its cost, make the shardings.

        `cost="simulate"` runs `tag_jax.cost.Simulator` when a topology is given (None if the
        cost package is not available); pass a Cost or None to skip simulating.
        """
        from tag_jax.emit import check, make_mesh, output_shardings

        op_strategies = tuple(tuple(o) for o in op_strategies)
        mesh = make_mesh(strategy.mesh) if jax_mesh is None else jax_mesh
        check(graph, strategy, op_strategies, strategy.mesh.axes)
        in_flat = [NamedSharding(mesh, ts.to_partition_spec()) for ts in strategy.input_shardings]
        out_flat = [NamedSharding(mesh, ts.to_partition_spec())
                    for ts in output_shardings(graph, strategy, op_strategies)]
        args, kwargs = jax.tree_util.tree_unflatten(graph.in_tree, in_flat)
        if kwargs:
            raise ValueError(f"{graph.name} was traced with keyword arguments {sorted(kwargs)}; "
                             "plans take positional arguments only")
        if isinstance(cost, str) and cost == "simulate":
            cost = (simulate(graph, op_strategies, topology, strategy, tuple(compression))
                    if topology is not None else None)
        arguments = tuple(
            Argument(graph.tensors[t].path or f"arg{k}", graph.tensors[t].shape,
                     graph.tensors[t].dtype.name, str(graph.tensors[t].role), ts)
            for k, (t, ts) in enumerate(zip(graph.inputs, strategy.input_shardings)))
        return cls(mesh=mesh, strategy=strategy, in_shardings=tuple(args),
                   out_shardings=jax.tree_util.tree_unflatten(graph.out_tree, out_flat), cost=cost,
                   arguments=arguments, function=graph.name, fingerprint=graph_fingerprint(graph),
                   topology_fingerprint=None if topology is None else topology.fingerprint(),
                   graph=graph, op_strategies=op_strategies, topology=topology,
                   compression=tuple(compression), uncompressed_cost=uncompressed_cost)

    def jit(self, *, donate_argnums: int | Sequence[int] = (),
            compiler_options: Mapping[str, Any] | None = None, constrain: bool | str = "operands") -> Callable:
        """The emitted `jax.jit` program (needs the graph: plan it, or load it with the function)."""
        from tag_jax.emit import emit

        self._need_graph("jit")
        return emit(self.graph, self.strategy, self.op_strategies, self.mesh,
                    donate_argnums=donate_argnums, compiler_options=compiler_options,
                    constrain=constrain, compression=self.compression)

    def shard_args(self, *args: Any) -> Any:
        """`jax.device_put` the arguments onto the plan's input shardings.

        Returns a tuple like `args` (the argument itself when there is exactly one)."""
        if len(args) != len(self.in_shardings):
            raise ValueError(f"the plan of {self.function} takes {len(self.in_shardings)} "
                             f"argument(s), got {len(args)}")
        out = tuple(jax.device_put(a, s) for a, s in zip(args, self.in_shardings))
        return out[0] if len(out) == 1 else out

    # ---- reading ---------------------------------------------------------------------------
    def summary(self) -> str:
        """A table of arguments (path, shape, spec, bytes per device), then the prediction and its
        per-device breakdown (`device_breakdown`; like devices merged into one row past 16)."""
        spec = self.strategy.mesh
        axes = spec.axes
        lines = [f"Plan '{self.strategy.name}' for {self.function}: mesh "
                 f"{', '.join(f'{n}={s}' for n, s in axes.items())} over devices "
                 f"{list(spec.device_ids)}"]
        rows = []
        for a in self.arguments:
            local = a.sharding.local_shape(a.shape, axes)
            nbytes = math.prod(local) * a.itemsize
            dtype = "key" if a.is_key else a.dtype
            rows.append((a.path, f"{dtype}[{','.join(map(str, a.shape))}]",
                         str(a.sharding.to_partition_spec()), nbytes, a.role))
        wp = max([len("argument")] + [len(r[0]) for r in rows])
        ws = max([len("shape")] + [len(r[1]) for r in rows])
        wq = max([len("spec")] + [len(r[2]) for r in rows])
        lines.append(f"  {'argument':<{wp}}  {'shape':<{ws}}  {'spec':<{wq}}  {'bytes/device':>12}")
        for path, shape, pspec, nbytes, _ in rows:
            lines.append(f"  {path:<{wp}}  {shape:<{ws}}  {pspec:<{wq}}  {_bytes(nbytes):>12}")
        by_role: dict[str, int] = {}
        for *_, nbytes, role in rows:
            by_role[role] = by_role.get(role, 0) + nbytes
        lines.append("  per device: " + ", ".join(f"{r} {_bytes(b)}" for r, b in sorted(by_role.items())))
        if self.cost is None:
            lines.append("  predicted: not available (no topology or cost model)")
        else:
            c = self.cost
            lines.append(
                f"  predicted: step {_seconds(c.step_time_s)} (compute {_seconds(c.compute_s)}, "
                f"communication {_seconds(c.comm_s)}), {_bytes(c.comm_bytes)} sent per device, "
                f"peak memory {_bytes(c.peak_memory_bytes)} per device")
            lines.extend(self._device_lines())
        lines.extend(self._compression_lines())
        return "\n".join(lines)

    def device_breakdown(self) -> tuple:
        """Per-device rows (`tag_jax.cost.DeviceRow`, mesh order) of the predicted step: busy compute
        at each device's own FLOP/s and memory bandwidth, idle time waiting for the slowest,
        communication on its own groups, peak memory against its capacity
        (`tag_jax.cost.breakdown`). Empty without a cost, graph or topology (e.g. a plan loaded
        without its function)."""
        if self.cost is None or self.graph is None or self.topology is None:
            return ()
        cached = self.__dict__.get("_breakdown")
        if cached is None:
            from tag_jax.cost import breakdown
            from tag_jax.search.propagate import carried_outputs

            cached = breakdown(self.graph, self.op_strategies, self.strategy, self.topology,
                               self.cost, carried=carried_outputs(self.graph))
            object.__setattr__(self, "_breakdown", cached)  # frozen: cache beside the fields
        return cached

    def _device_lines(self, max_rows: int = 16) -> list[str]:
        """The per-device table; like devices are merged into one row when there are many."""
        rows = self.device_breakdown()
        if not rows:
            return []
        from tag_jax.cost import group_rows

        grouped = len(rows) > max_rows
        shown = group_rows(rows) if grouped else rows
        head = ("  per device (busy: compute at its own FLOP/s and memory bandwidth; idle: waiting "
                "for the slowest)")
        if grouped:
            head += f"; {len(rows)} devices, like devices merged"
        table = [("device", "kind", "node", "busy", "idle", "communication", "comm bytes",
                  "peak memory", "of memory")]
        for r in shown:
            comm = _seconds(r.comm_s)
            if r.comm_s_min is not None and not math.isclose(r.comm_s_min, r.comm_s, rel_tol=1e-6):
                comm = f"{_seconds(r.comm_s_min)}-{comm}"
            dev = _ranges(r.devices) + (f" ({len(r.devices)})" if len(r.devices) > 1 else "")
            table.append((dev, r.kind, _ranges(r.nodes), _seconds(r.compute_s), _seconds(r.idle_s),
                          comm, _bytes(r.comm_bytes), _bytes(r.peak_memory_bytes),
                          f"{_bytes(r.memory_bytes)} ({_percent(r.memory_fraction)})"))
        widths = [max(len(t[k]) for t in table) for k in range(len(table[0]))]
        left = 3  # device, kind, node: left-aligned; figures right-aligned
        out = [head]
        for t in table:
            out.append("    " + "  ".join(x.ljust(w) if k < left else x.rjust(w)
                                          for k, (x, w) in enumerate(zip(t, widths))).rstrip())
        return out

    def _compression_lines(self) -> list[str]:
        """The per-gradient compression table (method, bytes saved per device)."""
        if not self.compression:
            return ["  compression: none"]
        u = self.uncompressed_cost
        head = f"  compression: {len(self.compression)} gradient(s)"
        if u is not None and self.cost is not None:
            head += (f", step {_seconds(self.cost.step_time_s)} vs {_seconds(u.step_time_s)} without "
                     f"({u.step_time_s / self.cost.step_time_s:.2f}x)")
        if any(not c.exact for c in self.compression):
            head += "; LOSSY methods chosen (compression='lossy'), their saving is an estimate"
        wg = max(len("gradient"), *(len(c.gradient) for c in self.compression))
        wm = max(len("method"), *(len(c.method) for c in self.compression))
        rows = [head, f"    {'gradient':<{wg}}  {'method':<{wm}}  {'bytes saved/device':>18}"]
        for c in self.compression:
            saved = _bytes(c.bytes_saved) if c.bytes_saved >= 0 else "-" + _bytes(-c.bytes_saved)
            rows.append(f"    {c.gradient:<{wg}}  {c.method:<{wm}}  {saved:>18}")
        total = sum(c.bytes_saved for c in self.compression)
        rows.append(f"    {'total':<{wg}}  {'':<{wm}}  {_bytes(max(total, 0)):>18}")
        return rows

    # ---- saving ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        spec = self.strategy.mesh
        names = None
        if self.op_strategies is not None:
            names = [opts[k].name for opts, k in zip(self.op_strategies, self.strategy.choices)]
        return {
            "format": FORMAT, "version": VERSION, "function": self.function,
            "graph_fingerprint": self.fingerprint, "topology_fingerprint": self.topology_fingerprint,
            "strategy": self.strategy.name,
            "mesh": {"shape": list(spec.shape), "axis_names": list(spec.axis_names),
                     "device_ids": list(spec.device_ids)},
            "choices": list(self.strategy.choices), "choice_names": names,
            "arguments": [{"path": a.path, "shape": list(a.shape), "dtype": a.dtype, "role": a.role,
                           "sharding": _ts_to_json(a.sharding)} for a in self.arguments],
            "cost": None if self.cost is None else {f: float(getattr(self.cost, f)) for f in _COST_FIELDS},
            "compression": [c.to_dict() for c in self.compression],
            "uncompressed_cost": None if self.uncompressed_cost is None else
            {f: float(getattr(self.uncompressed_cost, f)) for f in _COST_FIELDS},
        }

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str, fn: Callable | None = None, *args: Any, topology: Any = None,
             graph: OpGraph | None = None, **kwargs: Any) -> "Plan":
        """Read a saved plan. With `fn` and its example arguments (or a traced `graph`), the plan is
        checked to belong to that function and made runnable; with `topology`, checked to be made
        for that topology. Without either, it can be read (summary, shardings by path) but not run.
        """
        with open(path) as f:
            d = json.load(f)
        return cls.from_dict(d, fn, *args, topology=topology, graph=graph, source=path, **kwargs)

    @classmethod
    def from_dict(cls, d: Any, fn: Callable | None = None, *args: Any, topology: Any = None,
                  graph: OpGraph | None = None, source: str = "the plan", **kwargs: Any) -> "Plan":
        """`load` from the dict `to_dict` made (e.g. received from another process)."""
        path = source
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise PlanMismatchError(f"{path} is not a tag_jax plan (no \"format\": \"{FORMAT}\")")
        if d.get("version") != VERSION:
            raise PlanMismatchError(f"{path} is a version {d.get('version')} plan; this tag_jax reads "
                                    f"version {VERSION}: plan the function again")
        if topology is not None and d["topology_fingerprint"] not in (None, topology.fingerprint()):
            raise PlanMismatchError(
                f"{path} was planned for another topology (fingerprint "
                f"{d['topology_fingerprint'][:12]}), not '{topology.name}' (fingerprint "
                f"{topology.fingerprint()[:12]}): its device order and costs would be wrong; "
                "plan again for this topology")
        if graph is None and fn is not None:
            # traced as auto_shard traces it: keywords bound to positions, Flax NNX objects split
            # (the plan then takes their state first, then the other arguments)
            tracer = ShardedFunction(fn, _no_planner, roles=kwargs.pop("roles", None),
                                     static_argnums=kwargs.pop("static_argnums", ()),
                                     name=kwargs.pop("name", None))
            graph = tracer.trace(*args, **kwargs)
        if graph is not None:
            got = graph_fingerprint(graph)
            if got != d["graph_fingerprint"]:
                raise PlanMismatchError(
                    f"{path} was planned for function `{d['function']}` (graph fingerprint "
                    f"{d['graph_fingerprint'][:12]}), but `{graph.name}` with these arguments traces "
                    f"to another program ({len(graph.ops)} ops, fingerprint {got[:12]})"
                    f"{_first_difference(d.get('arguments') or [], graph)}; load it with "
                    "the function and argument shapes it was planned for, or plan this one anew")
        spec = MeshSpec(tuple(d["mesh"]["shape"]), tuple(d["mesh"]["axis_names"]),
                        tuple(d["mesh"]["device_ids"]))
        shardings = tuple(_ts_from_json(a["sharding"]) for a in d["arguments"])
        strategy = Strategy(spec, tuple(d["choices"]), shardings, d["strategy"])
        from tag_jax.search.compression import CompressionChoice

        compression = tuple(CompressionChoice.from_dict(c) for c in d.get("compression") or ())
        uncompressed = _saved_cost(d.get("uncompressed_cost"))
        if graph is None:
            from tag_jax.emit import make_mesh

            mesh = make_mesh(spec)
            arguments = tuple(Argument(a["path"], tuple(a["shape"]), a["dtype"], a["role"], ts)
                              for a, ts in zip(d["arguments"], shardings))
            return cls(mesh=mesh, strategy=strategy,
                       in_shardings={a.path: NamedSharding(mesh, a.sharding.to_partition_spec())
                                     for a in arguments},
                       out_shardings=None, cost=_saved_cost(d["cost"]), arguments=arguments,
                       function=d["function"], fingerprint=d["graph_fingerprint"],
                       topology_fingerprint=d["topology_fingerprint"], topology=topology,
                       compression=compression, uncompressed_cost=uncompressed)
        from tag_jax import rules

        op_strategies = rules.for_graph(graph, spec.axes)
        strategy = dataclasses.replace(strategy, choices=_match_choices(
            graph, op_strategies, strategy.choices, d.get("choice_names"), path))
        cost = _saved_cost(d["cost"]) if topology is None else "simulate"
        return cls.build(graph, strategy, op_strategies, topology, cost=cost, compression=compression,
                         uncompressed_cost=uncompressed)

    def _need_graph(self, what: str) -> None:
        if self.graph is None:
            raise ValueError(f"Plan.{what} needs the traced function: load the plan with "
                             "Plan.load(path, fn, *example_args)")


def simulate(graph: OpGraph, op_strategies, topology, strategy: Strategy,
             compression: Sequence[Any] = ()) -> Any | None:
    """The simulator's Cost of a strategy in its steady state: updated state is priced back to the
    layout it came in with (as the planner prices its candidates, so costs compare). Compression the
    simulator cannot express (row-sparse collectives, lossy psums) is priced by
    `tag_jax.search.compression.compressed_cost`."""
    from tag_jax.cost import Simulator
    from tag_jax.search.propagate import carried_outputs

    sim = Simulator(graph, op_strategies, topology, strategy.mesh, carried=carried_outputs(graph))
    if compression:
        from tag_jax.search.compression import compressed_cost

        return compressed_cost(graph, op_strategies, sim, strategy, compression)
    return sim.cost(strategy)


def abstract(tree: Any) -> Any:
    """Shapes and dtypes only (`jax.ShapeDtypeStruct`), dropping shardings and values."""

    def one(x: Any) -> Any:
        aval = jax.typeof(x) if not isinstance(x, jax.ShapeDtypeStruct) else x
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False))

    return jax.tree_util.tree_map(one, tree)


def signature(args: Any) -> tuple:
    """A hashable key of the arguments' structure, shapes and dtypes (one plan per key). Computed
    on every call of a planned step, so arrays are read directly (~0.3 us a leaf, not ~20 us
    through `abstract`)."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    try:
        return (tree, tuple(_leaf_signature(x) for x in leaves))
    except TypeError:  # name the argument, as jax.jit does (only now: the fast path has no paths)
        for path, x in jax.tree_util.tree_flatten_with_path(args)[0]:
            try:
                _leaf_signature(x)
            except TypeError:
                where = jax.tree_util.keystr(path)
                raise TypeError(f"argument {where} is a {type(x).__name__} ({x!r:.40}), not an array: "
                                "a planned step takes arrays (pytrees of arrays); pass Python values "
                                "through static_argnums, or as arrays") from None
        raise


def _leaf_signature(x: Any) -> tuple:
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and not isinstance(x, jax.core.Tracer):
        return (tuple(x.shape), x.dtype, bool(getattr(x, "weak_type", False)))
    aval = jax.typeof(x)
    return (tuple(aval.shape), aval.dtype, bool(getattr(aval, "weak_type", False)))


class ShardedFunction:
    """A jit-like function that plans once per input signature: `fn(*args)`, `.lower`, `.plan`.

    `planner(graph) -> Plan` makes the plan of a traced graph. Calls move arguments onto the plan's
    input shardings first (a no-op when they are already there), so the results of one step can be
    fed to the next whatever their layout.

    `donate_argnums` works as `jax.jit`'s: the caller's jax Arrays in donated arguments are consumed
    by the call and read as deleted afterwards (`x.is_deleted()`; using one raises jax's
    deleted-array error), whether they came in the plan's layout (their buffers are donated to the
    program) or not (they are copied to the plan's layout, the copy is donated and the originals
    are deleted once the copies are made, so the step never holds both). NumPy arrays and Python
    scalars are left alone, and so is an array that is also passed in a non-donated argument.

    `static_argnums` works as `jax.jit`'s too: those arguments are hashable Python values the
    function is traced with, not arrays; each distinct value gets its own plan and program (the
    plan, its arguments and its shardings cover the other arguments only). Saved plans of such a
    function load against it with the static values bound, e.g.
    `Plan.load(path, functools.partial(fn, train=True), *arrays)`.
    """

    def __init__(self, fn: Callable, planner: Callable[[OpGraph], Plan], *,
                 donate_argnums: int | Sequence[int] = (), static_argnums: int | Sequence[int] = (),
                 compiler_options: Mapping[str, Any] | None = None, name: str | None = None,
                 roles: Mapping[str, Any] | None = None):
        self.fn = fn
        self.roles = roles
        self.planner = planner
        self.donate_argnums = donate_argnums
        self.static_argnums = static_argnums
        self.compiler_options = compiler_options
        self.__name__ = name or getattr(fn, "__name__", "fn")
        self.__wrapped__ = fn
        self._plans: dict[tuple, Plan] = {}
        self._programs: dict[tuple, Callable] = {}
        self._bound: dict[tuple, ShardedFunction] = {}  # per static values: fn with them bound

    def _split(self, args: tuple) -> tuple["ShardedFunction", tuple]:
        """The function to plan for these arguments (`fn` with its static arguments bound) and
        the arguments it takes (the others)."""
        if not _given(self.static_argnums):
            return self, args
        static = _argnums(self.static_argnums, len(args))
        bad = sorted(k for k in static if not 0 <= k < len(args))
        if bad:
            raise ValueError(f"{self.__name__}: static_argnums {bad} out of range for a call with "
                             f"{len(args)} positional argument(s)")
        values = tuple((k, args[k]) for k in sorted(static))
        try:
            hash(values)
        except TypeError:
            k, v = next((k, v) for k, v in values if not _hashable(v))
            raise TypeError(f"{self.__name__}: static argument {k} is a {type(v).__name__}, which is "
                            f"not hashable; static arguments must be hashable Python values (pass "
                            f"arrays as ordinary arguments)") from None
        dynamic = tuple(a for k, a in enumerate(args) if k not in static)
        bound = self._bound.get(values)
        if bound is None:
            fn, n, fixed = self.fn, len(args), dict(values)

            def with_static(*rest):
                it = iter(rest)
                return fn(*(fixed[k] if k in fixed else next(it) for k in range(n)))

            kept = [k for k in range(n) if k not in static]  # old position -> new position
            named_like(with_static, fn, kept)  # the other arguments keep their names
            donated = sorted(kept.index(k) for k in _argnums(self.donate_argnums, n) if k in kept)
            bound = ShardedFunction(with_static, self.planner, donate_argnums=tuple(donated),
                                    compiler_options=self.compiler_options, name=self.__name__,
                                    roles=self.roles)
            self._bound[values] = bound
        return bound, dynamic

    def _positional(self, args: tuple, kwargs: dict) -> tuple:
        """Keyword arguments as the positions `fn`'s signature gives them (plans, shardings and
        static/donate argnums count positions, as jax.jit's do)."""
        if not kwargs:
            return args
        try:
            sig = inspect.signature(self.fn)
            bound = sig.bind(*args, **kwargs)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{self.__name__}: cannot bind keyword argument(s) {sorted(kwargs)}: {exc}; "
                            f"pass them positionally") from None
        if bound.kwargs:  # one skipped before it: the skipped ones take their defaults
            bound.apply_defaults()
        if bound.kwargs:
            raise TypeError(f"{self.__name__}: keyword-only argument(s) {sorted(bound.kwargs)} are not "
                            f"supported; make them positional, or bind them with functools.partial")
        return tuple(bound.args)

    def trace(self, *args: Any, **kwargs: Any) -> OpGraph:
        from tag_jax.hlo.trace import trace

        inner, args = self._route(args, kwargs)
        with auto_axes_context():
            return trace(inner.fn, *abstract(args), name=self.__name__, roles=self.roles)

    def _objects(self, args: tuple) -> tuple["ShardedFunction", tuple, tuple[int, ...]] | None:
        """Flax NNX objects among the arguments (`tag_jax.nnx_objects`): the planned function of
        their state, its arguments, and the objects' positions; None without such arguments."""
        from tag_jax import nnx_objects

        positions = nnx_objects.object_positions(args)
        if not positions:
            return None
        if _given(self.static_argnums):
            raise ValueError(f"{self.__name__}: static_argnums with Flax NNX objects among the "
                             f"arguments is not supported; bind the static values with functools.partial")
        graphdef, state, others = nnx_objects.split(args, positions)
        key = (graphdef, positions, len(args))
        pure = self._bound.get(key)
        if pure is None:
            # donating an object donates its state (the pure step's first argument)
            donated = (0,) if _argnums(self.donate_argnums, len(args)) & set(positions) else ()
            pure = ShardedFunction(nnx_objects.pure_step(self.fn, graphdef, positions, len(args)),
                                   self.planner, donate_argnums=donated,
                                   compiler_options=self.compiler_options, name=self.__name__,
                                   roles=self.roles)
            self._bound[key] = pure
        return pure, (state,) + others, positions

    def _route(self, args: tuple, kwargs: dict) -> tuple["ShardedFunction", tuple]:
        """The function that plans these arguments (this one; `fn` with its static arguments
        bound; or the pure step of the Flax NNX objects among them) and the arguments it takes."""
        args = self._positional(args, kwargs)
        objects = self._objects(args)
        if objects is not None:
            return objects[0], objects[1]
        return self._split(args)

    def plan(self, *args: Any, **kwargs: Any) -> Plan:
        inner, args = self._route(args, kwargs)
        return inner._plan(signature(args), args)

    def _plan(self, key: tuple, args: tuple) -> Plan:
        if key not in self._plans:
            self._plans[key] = self.planner(self.trace(*args))
        return self._plans[key]

    def program(self, *args: Any, **kwargs: Any) -> Callable:
        inner, args = self._route(args, kwargs)
        return inner._program(signature(args), args)

    def _program(self, key: tuple, args: tuple) -> Callable:
        if key not in self._programs:
            self._programs[key] = self._plan(key, args).jit(donate_argnums=self.donate_argnums,
                                                            compiler_options=self.compiler_options)
        return self._programs[key]

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        inner, args = self._route(args, kwargs)
        program = inner._program(signature(args), args)
        with auto_axes_context():
            return program.lower(*args)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args = self._positional(args, kwargs)
        objects = self._objects(args)
        if objects is not None:  # the step's mutations land in the caller's objects
            from tag_jax.nnx_objects import write_back

            pure, pure_args, positions = objects
            new_state, out = pure(*pure_args)
            write_back(args, positions, new_state)
            return out
        inner, args = self._split(args)
        if inner is not self:
            return inner(*args)
        key = signature(args)
        program = self._program(key, args)
        plan = self._plans[key]
        donated = _argnums(self.donate_argnums, len(args))
        _refuse_deleted(args, plan)  # XLA:CPU crashes the process on a donated buffer
        stale: list = []  # donated caller arrays that were copied to the plan's layout
        placed = []
        for k, (a, s) in enumerate(zip(args, plan.in_shardings)):
            if _in_place(a, s):  # last step's results, as a training loop passes them: no call
                placed.append(a)
            else:
                placed.append(_put_donated(a, s, stale) if k in donated else jax.device_put(a, s))
        if stale:
            kept = {id(x) for k, a in enumerate(args) if k not in donated
                    for x in jax.tree_util.tree_leaves(a)}
            for x in stale:
                if id(x) not in kept and not x.is_deleted():
                    x.delete()
        with auto_axes_context():
            return program(*placed)

    def __repr__(self) -> str:
        n = len(self._plans) + sum(len(b._plans) for b in self._bound.values())
        return f"ShardedFunction({self.__name__}, {n} plan(s))"


# ---- helpers -------------------------------------------------------------------------------------

def _first_difference(saved: Sequence[Mapping], graph: OpGraph) -> str:
    """The first argument whose path, shape or dtype differs from the saved plan's, in words."""
    now = [graph.tensors[t] for t in graph.inputs]
    for k, (a, t) in enumerate(zip(saved, now)):
        was, got = f"{a['dtype']}{list(a['shape'])}", f"{t.dtype.name}{list(t.shape)}"
        same_path = not (a.get("path") and t.path) or a["path"] == t.path
        if was != got and same_path:
            return f": argument {t.path or k} was {was} when planned, now {got}"
        if not same_path:
            return f": argument {k} was {a['path']} {was} when planned, now {t.path} {got}"
    if len(saved) != len(now):
        return f": {len(saved)} array arguments when planned, now {len(now)}"
    return ": the arguments are alike, the function's body changed"


def _no_planner(graph: OpGraph) -> Plan:
    raise AssertionError("only traced")  # pragma: no cover


def auto_axes_context() -> Any:
    """Inside `jax.set_mesh(mesh)` with Explicit axes, the same mesh with Auto axes; else nothing.

    A planned program places its own shardings (Auto axes); traced or run under the caller's
    Explicit context, JAX would check its values' types against that context instead."""
    import contextlib

    current = jax.sharding.get_abstract_mesh()
    if current.empty or not current._any_axis_explicit:
        return contextlib.nullcontext()
    auto = jax.sharding.AxisType.Auto
    concrete = jax.sharding.get_mesh()
    if getattr(concrete, "empty", True):
        return jax.sharding.use_abstract_mesh(
            current.update_axis_types({a: auto for a in current.axis_names}))
    return jax.set_mesh(Mesh(concrete.devices, concrete.axis_names,
                             axis_types=(auto,) * len(concrete.axis_names)))


def named_like(wrapper: Callable, fn: Callable, kept: Sequence[int], first: str | None = None) -> Callable:
    """`wrapper` with `fn`'s positional parameters at positions `kept` (after a parameter `first`,
    if given) as its signature, which the tracer names the arguments' paths by."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return wrapper
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [params[k] for k in kept if k < len(params) and params[k].kind in positional]
    lead = [inspect.Parameter(first, inspect.Parameter.POSITIONAL_OR_KEYWORD)] if first else []
    try:
        wrapper.__signature__ = inspect.Signature(lead + names)
    except ValueError:  # (a kept name clashing with `first`)
        pass
    return wrapper


def _given(argnums: Any) -> bool:
    return argnums not in ((), None)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _argnums(argnums: int | Sequence[int], n: int) -> set[int]:
    """`donate_argnums` as a set of non-negative positions among `n` arguments."""
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    return {k + n if k < 0 else k for k in nums}


def _refuse_deleted(args: tuple, plan: "Plan") -> None:
    """A deleted (donated) array among the arguments, named, instead of XLA's segfault on a
    multi-device program given a donated buffer."""
    for k, arg in enumerate(args):
        for path, x in jax.tree_util.tree_flatten_with_path(arg)[0]:
            if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_deleted():
                raise RuntimeError(f"argument {k}{jax.tree_util.keystr(path)} of {plan.function} was "
                                 "donated to an earlier call and is deleted: pass the value that "
                                 "call returned")


def _in_place(arg: Any, shardings: Any) -> bool:
    """Whether every leaf is a jax Array already on its planned sharding. Checking costs ~1 us a
    leaf; `jax.device_put` of an array already there ~30 us (gpt2-small's state: ~450 leaves)."""
    leaves, tree = jax.tree_util.tree_flatten(arg)
    try:
        targets = tree.flatten_up_to(shardings)
    except (ValueError, TypeError):
        return False
    return all(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
               and (x.sharding is t or x.sharding == t) for x, t in zip(leaves, targets))


def _put_donated(arg: Any, shardings: Any, stale: list) -> Any:
    """A donated argument on the plan's shardings: leaves already there keep their buffers (the
    program's donation consumes them); other jax Arrays are copied there and listed in `stale`."""
    leaves, tree = jax.tree_util.tree_flatten(arg)
    targets = tree.flatten_up_to(shardings)
    out = []
    for x, s in zip(leaves, targets):
        if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
            out.append(jax.device_put(x, s))
        elif x.sharding.is_equivalent_to(s, x.ndim):  # the same buffers (relabelled if need be)
            out.append(jax.device_put(x, s))
        else:
            # device_put may keep x's own buffer for a shard (even with may_alias=False, e.g. one
            # device -> replicated), and the program may hand an input back as an output: reshard a
            # private copy, so deleting x can never reach the program's arguments or results
            out.append(jax.device_put(jnp.copy(x), s))
            stale.append(x)
    return jax.tree_util.tree_unflatten(tree, out)


def _match_choices(graph, op_strategies, choices, names, path) -> tuple[int, ...]:
    """The saved choices, re-found by option name when the rules list options in another order."""
    if len(choices) != len(op_strategies):
        raise PlanMismatchError(f"{path} has {len(choices)} op choices; the graph has "
                                f"{len(op_strategies)} ops")
    if names is None:
        return tuple(choices)
    out = []
    for op, opts, k, name in zip(graph.ops, op_strategies, choices, names):
        if k < len(opts) and opts[k].name == name:
            out.append(k)
            continue
        found = [i for i, o in enumerate(opts) if o.name == name]
        if not found:
            raise PlanMismatchError(f"{path} picks option {name!r} for {op.where()}, which the "
                                    "installed sharding rules no longer offer; plan again")
        out.append(found[0])
    return tuple(out)


def _saved_cost(d: Mapping[str, float] | None) -> Any:
    if d is None:
        return None
    try:
        from tag_jax.cost import Cost

        return Cost(**d)
    except Exception:  # the cost package is absent or its Cost has other fields
        return types.SimpleNamespace(**d)


def _ts_to_json(ts: TensorSharding) -> dict:
    return {"dims": [list(d) for d in ts.dims], "partial": list(ts.partial)}


def _ts_from_json(d: Mapping) -> TensorSharding:
    return TensorSharding(tuple(tuple(x) for x in d["dims"]), tuple(d.get("partial", ())))


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _percent(x: float) -> str:
    p = 100 * x
    return f"{p:.0f}%" if p >= 10 or p == 0 else f"{p:.2g}%"


def _ranges(ids: Sequence[int]) -> str:
    """0,1,2,3,6 -> '0-3,6' (order kept, consecutive runs joined)."""
    parts: list[list[int]] = []
    for i in ids:
        if parts and i == parts[-1][1] + 1:
            parts[-1][1] = i
        else:
            parts.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def _seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"
