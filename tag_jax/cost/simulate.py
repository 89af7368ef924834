"""The simulator: what a strategy costs (time, communication, memory) on a topology. Never compiles.

Semantics of a `Strategy` on an `OpGraph` with per-op strategy lists `op_strategies`
(`op_strategies[i][0]` replicated, as `tag_jax.rules.for_graph` gives them):

- graph input k is sharded as `strategy.input_shardings[k]`; constants are replicated;
- op i runs as `op_strategies[i][strategy.choices[i]]`; its outputs get that strategy's shardings;
- where a tensor's sharding differs from what a consumer wants, the tensor is resharded
  (`reshard.reshard_collectives`); one (tensor, target) reshard is done once and reused;
- a graph output left partial is all-reduced (the program's out_shardings are never partial);
  with `Simulator(..., carried={output id: input id})` (e.g. from
  `tag_jax.search.propagate.carried_outputs(graph)`) those outputs are instead resharded to the
  sharding their input came in with, so a plan's steady state (state in = state out) is priced.

Time. Compute of op i = max(flops / (shards * rate * COMPUTE_EFFICIENCY),
local bytes / (memory bandwidth * MEMORY_EFFICIENCY)) where local bytes counts only the operands
and results XLA materialises (a value its fusion keeps in registers, see `_fused`, is neither
written by its producer nor read by its consumers: an elementwise chain pays its memory traffic
once, as one fused kernel does) and shards = product of the sizes of
`OpStrategy.split_axes`, on the rates of the mesh's slowest device kind: work is split evenly
and devices run on their own between collectives, so the kind whose replicated step takes
longest bounds the step (its op times are the timeline's; on a mix of devices one slow at
matmuls and another slow at memory, taking each rate's minimum would price a device that does
not exist). The rate is the device's dense 16-bit peak
(`Device.flops`) when the op's floating operands are 16-bit or narrower; else, for a float32
dot_general or convolution at JAX's default precision, its default-precision matmul peak
(`Device.matmul_flops_fp32`: TF32 on NVIDIA Ampere and later, one bf16 pass on TPU), and for
everything else (or precision HIGHEST) its fp32 peak (`Device.flops_fp32`). Collectives are priced with `comm_time` (max over the
parallel device groups). With `overlap=True` there are two resources, one compute stream running ops
in program order and one communication stream running reshards first-in first-out in order of
their source tensor's readiness; a reshard starts when its source is ready and the stream is free,
and its consumers wait for it. So gradient all-reduces overlap with the rest of the backward pass.
A reshard with no collective (a local slice) costs nothing and waits for nothing.
step_time = makespan. With `overlap=False` step_time = compute + comm.
Not modelled: kernel launch overheads, collectives inside loop bodies (a scan/while op is one
op whose operands are resharded at its boundary), and the memory a loop body uses internally.

Memory (per device). Graph inputs and constants live for the whole step (no donation); an op's
output lives from its producer to its last consumer; graph results live in XLA's output allocation
for the whole step, in the layout the program returns them in (a result resharded at the end, e.g.
a sharded optimizer update gathered back to replicated parameters, counts its final layout from
the start and its as-made value as a temporary); a resharded copy lives from its first consumer to
its last (reshards are placed just in time, as XLA's scheduler does for memory, even though the time
model issues them early). A tensor's local bytes are its bytes divided by the shards of its sharding
(partial sums are full size). peak = max over the op order.

Partial sums (GSPMD has none between ops): a partial result is reduced at each of its roots, the
ops that made it (dot, reduction, scatter-add), at the root's size, however far a strategy carries
it (see `Simulator._partial_roots`; an operand partial over more axes than wanted, or over fewer
where the op makes no sum over the others, still carries it: the root is reduced over all its
axes); one wanted in several shardings is reduced once, towards the first consumer's sharding
refined by later ones that extend it (`Simulator._merge_targets`; a reduce_sum result: in place),
and moved from there to the others; a root reached through transposes is reduced along the
transposed dims. A partial result of an op that cannot make a sum (elementwise, reshape,
transpose, slice, concatenate..., or any op whose option splits no operand by its partial axes,
e.g. a scatter-add of selects) from non-partial operands is a local select the program never
makes: no reduction; it is resharded from the layout the program pins it to (wanted one way,
the reduction layout `reshard.after_reduction`, its partial axes as free slices:
`Simulator._select_sources`). An operand an elementwise op wants as such a select
(``b1 * mu`` added to a partial gradient) has no constraint in the program; XLA moves it to the
layout the op's result is reduced to (`Simulator._retarget_selects`; through a chain of
selects, where the chain ends non-partial: `Simulator._chain_end`); only the chain's last select
is pinned, so its ops run in their operands' layouts merged, the pinned one's operands moved to
the pin (`Simulator._select_chains`). Reshards of one tensor from one layout that start with the
same all-gather on the same path share it (the SPMD partitioner's reshard cache: a replication is
made once, and so is a partial one; `Simulator._shared_gathers`). An all-reduce whose every
later use, directly or through transposes/reshapes (and ``x ** 1``, which XLA removes), only
slices it 1/n by the reduced axes (possibly before moving the slice) is what XLA:CPU writes for a
reduce-scatter, and is counted as one (`Simulator._sliced_all_reduces`).

Lowering (`Simulator(..., lowering="xla-cpu")`, default `LOWERING`, `set_lowering`): XLA:CPU's
scratch buffers, live while their op runs (transposed copies for convolutions whose operands are
not NHWC/HWIO, max-pool backward's index buffers; `Simulator._cpu_temps`). Reshards of arguments
feeding lookups (gather ops) are issued together before the first of those lookups (XLA:CPU's
schedule of the recommender's table all-gathers), so their copies are live at once. A reduction
fuses at most one multiply/maximum of materialised values (YNNPACK fusions): any other elementwise
value it reads is materialised, e.g. batch norm's ``x - mean`` from the forward to the backward's
``reduce_sum(dy * (x - mean))``, while still recomputed inside its other users' fusions (`_fused`).
A 16-bit floating tensor's collectives move float32 (twice the bytes; `_cpu_wide_collectives`).
`Simulator.live_at(strategy)` lists what the memory model holds at its peak (or at any op).

`Simulator` precomputes per-graph arrays once (`with_mesh` reuses them for another mesh, and the
compute table too when only the device order changes); `cost(strategy)` is vectorised with numpy
and caches reshard prices per (shape, dtype, src, dst); only the overlap schedule is a Python loop,
over the reshards. GPT-2 small (5,781 ops, ~17 options per op from `rules.for_graph`) on one CPU
core: ~300-900 full evaluations/s for coherent plans (hundreds of reshards; the Megatron baseline
420/s of CPU time on a loaded machine), ~110/s for uniformly random choices (~7,500 reshards; the
overlap schedule and the select retargeting dominate). Partial roots are cached per tensor with
the shardings and op choices they were derived from, so a search re-walks only chains its moves
touched. `incremental(strategy)` re-prices moves of a few ops with the no-overlap time in
~25-100 us (see `tag_jax.cost.incremental`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from tag_jax.cost.reshard import (KINDS, Comm, after_reduction, comm_time, leading_slices,
                                  reshard_collectives)
from tag_jax.hlo.graph import OpGraph
from tag_jax.rules.elementwise import ELEMENTWISE
from tag_jax.strategy import MeshSpec, OpStrategy, Strategy, TensorSharding

# Fraction of the vendor dense peak that real kernels reach: 40-70% (REFERENCE.md); 0.5 is the middle.
COMPUTE_EFFICIENCY = 0.5
# Fraction of peak memory bandwidth that streaming kernels reach (STREAM-like, typically 75-90%).
MEMORY_EFFICIENCY = 0.8
# Share of device memory a plan may use: the rest goes to the runtime, workspaces, fragmentation.
USABLE_MEMORY = 0.9

_KIND_INDEX = {k: i for i, k in enumerate(KINDS)}

# How the program is lowered, for the memory XLA's backend adds on top of the op-by-op model:
# None (no backend scratch buffers) or "xla-cpu" (XLA:CPU's, see `Simulator._cpu_temps`; the
# compiled-vs-predicted checks of benchmarks/fidelity.py and tests compile for CPU devices).
# `LOWERING` is the default of `Simulator(..., lowering=...)`; `set_lowering` changes it.
LOWERINGS = (None, "xla-cpu")
LOWERING: str | None = None


def set_lowering(lowering: str | None) -> str | None:
    """Make `lowering` the default of new Simulators (and `simulate`); returns the old one."""
    global LOWERING
    if lowering not in LOWERINGS:
        raise ValueError(f"lowering {lowering!r}: give one of {', '.join(map(repr, LOWERINGS))}")
    old, LOWERING = LOWERING, lowering
    _RECENT.clear()
    return old


@dataclasses.dataclass(frozen=True)
class Cost:
    """Predicted cost of one training step, per device."""

    step_time_s: float
    compute_s: float
    comm_s: float  # sum of collective durations (not all on the critical path when overlapped)
    comm_bytes: int  # per-device result bytes of all collectives (as compiled.collective_bytes_by_kind)
    comm_bytes_by_kind: Mapping[str, int]
    peak_memory_bytes: int
    per_op: tuple[tuple[int, float, float], ...] | None = None  # (op id, compute s, reshard s in)
    reshards: tuple[tuple[int, TensorSharding, TensorSharding, tuple[Comm, ...], float], ...] | None = None

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {_si(v)}B" for k, v in self.comm_bytes_by_kind.items() if v) or "none"
        exposed = max(0.0, self.step_time_s - self.compute_s)
        lines = [f"step {self.step_time_s * 1e3:.3f} ms: compute {self.compute_s * 1e3:.3f} ms, "
                 f"communication {self.comm_s * 1e3:.3f} ms ({exposed * 1e3:.3f} ms exposed)",
                 f"  per-device collectives {_si(self.comm_bytes)}B: {kinds}",
                 f"  per-device peak memory {_si(self.peak_memory_bytes)}B"]
        if self.reshards:
            worst = sorted(self.reshards, key=lambda r: -r[4])[:5]
            lines.append("  costliest reshards:")
            for tid, src, dst, comms, secs in worst:
                what = " + ".join(f"{c.kind}({','.join(c.axes)}) {_si(c.bytes)}B" for c in comms)
                lines.append(f"    t{tid} {src} -> {dst}: {what}, {secs * 1e3:.3f} ms")
        return "\n".join(lines)


def _cpu_wide_collectives(comms: tuple[Comm, ...]) -> tuple[Comm, ...]:
    """XLA:CPU computes 16-bit floating dots, convolutions and reductions in float32 (its float
    normalisation inserts converts around them) and moves the converts past the collectives, so
    those move float32: a bf16 einsum's partial sum is ``f32 all-reduce(dot)`` then a convert to
    bf16, and a bf16 weight gathered for a dot is converted first and all-gathered as f32
    (compiled on 8 CPU devices; the zoo in bfloat16: every all-gather of tag_jax's plans at twice
    the bf16 bytes). So every collective of a 16-bit floating tensor moves twice its bytes. GPU
    and TPU move the 16-bit dtype."""
    return tuple(dataclasses.replace(c, bytes=2 * c.bytes) for c in comms)


def _last_uses(g: OpGraph, out_set: set) -> np.ndarray:
    """Per tensor, the position of the last op that reads it (its producer if none does); graph
    results are read at the end (position len(g.ops))."""
    last = np.array([max(t.consumers, default=t.producer if t.producer is not None else -1)
                     for t in g.tensors], np.int64)
    for t in out_set:
        last[t] = len(g.ops)
    return last


def memory_traffic(graph: OpGraph, lowering: str | None = None) -> float:
    """Bytes the unsharded step reads and writes in memory, as the roofline counts them: each op's
    bytes, less the operands and results XLA's fusion keeps out of memory (`_fused`; `lowering`
    "xla-cpu" for XLA:CPU's fusion rules, to compare with its `cost_analysis()["bytes accessed"]`,
    as benchmarks/trace_flops.py does)."""
    out_set = set(graph.outputs)
    fused = _fused(graph, _last_uses(graph, out_set), out_set, lowering)
    total = 0.0
    for op in graph.ops:
        io = [graph.tensors[t].nbytes for t in op.inputs + op.outputs]
        kept = sum(0 if fused[t] else n for t, n in zip(op.inputs + op.outputs, io))
        total += op.bytes * kept / sum(io) if sum(io) > 0 else op.bytes
    return total


def fits(cost: Cost, topology, mesh: MeshSpec, usable: float = USABLE_MEMORY) -> bool:
    """Whether the per-device peak fits in `usable` of the smallest memory among the mesh's devices."""
    return cost.peak_memory_bytes <= usable * min(topology.device_memory(i) for i in mesh.device_ids)


def simulate(graph: OpGraph, op_strategies: Sequence[Sequence[OpStrategy]], strategy: Strategy,
             topology, *, overlap: bool = True) -> Cost:
    """The cost of `strategy` (see the module docstring). Build a `Simulator` to price many.

    The last few simulators are kept (by identity of graph and strategy lists, and topology), so
    repeated calls on one graph do not redo the per-graph precomputation.
    """
    for k, (g, strats, topo, sim) in enumerate(_RECENT):
        if g is graph and strats is op_strategies and topo == topology:
            if sim.mesh != strategy.mesh:
                sim = sim.with_mesh(strategy.mesh)
                _RECENT[k] = (g, strats, topo, sim)
            break
    else:
        sim = Simulator(graph, op_strategies, topology, strategy.mesh)
        _RECENT.insert(0, (graph, op_strategies, topology, sim))
        del _RECENT[4:]
    return sim.cost(strategy, overlap=overlap)


_RECENT: list = []


class _Interner:
    def __init__(self):
        self.ids: dict = {}
        self.items: list = []

    def __call__(self, x) -> int:
        i = self.ids.get(x)
        if i is None:
            i = self.ids[x] = len(self.items)
            self.items.append(x)
        return i


class Simulator:
    """Prices strategies of one graph on one mesh of one topology; build once, call `cost` often."""

    def __init__(self, graph: OpGraph, op_strategies: Sequence[Sequence[OpStrategy]], topology,
                 mesh: MeshSpec, *, efficiency: float = COMPUTE_EFFICIENCY,
                 memory_efficiency: float = MEMORY_EFFICIENCY,
                 carried: Mapping[int, int] | None = None, lowering: str | None = None,
                 _shared=None):
        if len(op_strategies) != len(graph.ops):
            raise ValueError(f"op_strategies has {len(op_strategies)} lists but graph {graph.name} has "
                             f"{len(graph.ops)} ops; pass rules.for_graph(graph, mesh.axes)")
        self.graph, self.op_strategies, self.topology, self.mesh = graph, op_strategies, topology, mesh
        self.efficiency, self.memory_efficiency = efficiency, memory_efficiency
        lowering = LOWERING if lowering is None else lowering
        if lowering not in LOWERINGS:
            raise ValueError(f"lowering {lowering!r}: give one of {', '.join(map(repr, LOWERINGS))}")
        self.lowering = lowering
        topology.check_ids(mesh.device_ids)
        self._sh = _shared if _shared is not None else self._precompute_graph()
        self.carried = self._check_carried(carried or {})
        self._precompute_mesh()

    def with_mesh(self, mesh: MeshSpec) -> "Simulator":
        """The same graph on another mesh, reusing per-graph arrays (and the compute table when only
        the device order changes). The op strategies must suit the new mesh: `rules.for_graph`
        depends on the axis names and sizes, so a new mesh shape usually needs a new Simulator."""
        return Simulator(self.graph, self.op_strategies, self.topology, mesh,
                         efficiency=self.efficiency, memory_efficiency=self.memory_efficiency,
                         carried=self.carried, lowering=self.lowering, _shared=self._sh)

    def _check_carried(self, carried: Mapping[int, int]) -> dict[int, int]:
        g, sh = self.graph, self._sh
        produced = set(sh["outputs"].tolist())
        inputs = set(g.inputs)
        out = {}
        for o, i in carried.items():
            o, i = int(o), int(i)
            if o not in g.outputs or i not in inputs:
                raise ValueError(f"carried {{{o}: {i}}}: keys must be graph outputs and values graph "
                                 f"inputs (tensor ids); see tag_jax.search.propagate.carried_outputs")
            if g.tensors[o].shape != g.tensors[i].shape:
                raise ValueError(f"carried output {g.tensors[o].describe()} and input "
                                 f"{g.tensors[i].describe()} differ in shape")
            if o in produced:
                out[o] = i
        self._carry_out = np.array(sorted(out), np.int64)
        self._carry_in = np.array([out[o] for o in sorted(out)], np.int64)
        self._free_outs = np.array(sorted(produced - set(out)), np.int64)
        return out

    # ---- per-graph precomputation (mesh independent) --------------------------------------------
    def _precompute_graph(self) -> dict:
        g, strats = self.graph, self.op_strategies
        sh = _Interner()
        n_ops, n_t = len(g.ops), len(g.tensors)
        nst = np.array([len(s) for s in strats], dtype=np.int64)
        for i, s in enumerate(strats):
            if not s:
                raise ValueError(f"op {g.ops[i].where()} has no strategies; index 0 must be replicated")
        row_base = np.concatenate([[0], np.cumsum(nst)[:-1]]).astype(np.int64)
        e_t, e_op, e_pos, o_t, o_op, o_pos = [], [], [], [], [], []
        want, give = [], []  # flat sharding ids: [op][strategy][position]
        in_base, out_base = np.zeros(n_ops, np.int64), np.zeros(n_ops, np.int64)
        splits = _Interner()
        row_split = []
        in_idx, out_idx = [], []  # tensor of every operand of every (op, strategy) row
        # The rules share one strategy list among ops alike (repeated layers): intern each once.
        interned: dict[int, tuple[list, list, list]] = {}
        for i, op in enumerate(g.ops):
            in_base[i], out_base[i] = len(want), len(give)
            ids = interned.get(id(strats[i]))
            if ids is None:
                w, gv, rs = [], [], []
                for k, s in enumerate(strats[i]):
                    rs.append(splits(s.split_axes))
                    if len(s.inputs) != len(op.inputs) or len(s.outputs) != len(op.outputs):
                        raise ValueError(f"strategy {k} ({s.name!r}) of {op.where()} has {len(s.inputs)} "
                                         f"inputs/{len(s.outputs)} outputs; the op has {len(op.inputs)}/"
                                         f"{len(op.outputs)}")
                    w.extend(sh(x) for x in s.inputs)
                    gv.extend(sh(x) for x in s.outputs)
                ids = interned[id(strats[i])] = (w, gv, rs)
            want.extend(ids[0])
            give.extend(ids[1])
            row_split.extend(ids[2])
            in_idx.extend(list(op.inputs) * len(strats[i]))
            out_idx.extend(list(op.outputs) * len(strats[i]))
            for p, t in enumerate(op.inputs):
                e_t.append(t), e_op.append(i), e_pos.append(p)
            for p, t in enumerate(op.outputs):
                o_t.append(t), o_op.append(i), o_pos.append(p)
        nin = np.array([len(op.inputs) for op in g.ops], np.int64)
        nout = np.array([len(op.outputs) for op in g.ops], np.int64)
        shapes = _Interner()
        t_shape = np.array([shapes((t.shape, t.dtype.str)) for t in g.tensors], np.int64)
        producer = np.array([-1 if t.producer is None else t.producer for t in g.tensors], np.int64)
        nbytes = np.array([t.nbytes for t in g.tensors], np.float64)
        is_input = np.zeros(n_t, bool)
        is_input[list(g.inputs)] = True
        out_set = set(g.outputs)
        last = _last_uses(g, out_set)
        fused = _fused(g, last, out_set)
        e_t, e_op = np.array(e_t, np.int64), np.array(e_op, np.int64)
        e_pos = np.array(e_pos, np.int64)
        o_t, o_op, o_pos = (np.array(x, np.int64) for x in (o_t, o_op, o_pos))
        # per op: 16-bit or not, FLOPs, bytes, and the bytes of its operands (for the roofline)
        is16 = np.zeros(n_ops, bool)
        float_size = {}  # dtype -> itemsize of a floating dtype, 0 otherwise
        for t in g.tensors:
            if t.dtype not in float_size:
                float_size[t.dtype] = t.dtype.itemsize if jnp.issubdtype(t.dtype, jnp.floating) else 0
        t_float = np.array([float_size[t.dtype] for t in g.tensors], np.int64)
        for i, op in enumerate(g.ops):
            sizes = [int(x) for x in t_float[list(op.inputs + op.outputs)] if x]
            is16[i] = bool(sizes) and max(sizes) <= 2
        fast_mm = np.array([_default_precision_matmul(op) for op in g.ops], bool)
        op_io = np.array([sum(g.tensors[t].nbytes for t in op.inputs + op.outputs) for op in g.ops],
                         np.float64)
        # (row, sharding id, tensor bytes) for every operand of every (op, strategy) row
        row_of_in = np.repeat(np.arange(len(nst) and int(nst.sum())), np.repeat(nin, nst))
        row_of_out = np.repeat(np.arange(len(nst) and int(nst.sum())), np.repeat(nout, nst))
        # the roofline's memory traffic: a value XLA fuses away is neither written nor read again
        moved_bytes = np.where(fused, 0.0, nbytes)
        in_nbytes = moved_bytes[np.array(in_idx, np.int64)]
        out_nbytes = moved_bytes[np.array(out_idx, np.int64)]
        consumers_of: list[list[tuple[int, int]]] = [[] for _ in range(n_t)]
        for t, i, p in zip(e_t.tolist(), e_op.tolist(), e_pos.tolist()):
            consumers_of[t].append((i, p))
        return dict(sh=sh, nst=nst, row_base=row_base, want=np.array(want, np.int64),
                    give=np.array(give, np.int64), in_base=in_base, out_base=out_base, nin=nin,
                    nout=nout, e_t=e_t, e_op=e_op, e_pos=e_pos, o_t=o_t, o_op=o_op, o_pos=o_pos,
                    t_shape=t_shape, shapes=shapes, producer=producer, nbytes=nbytes,
                    is_input=is_input, free=(producer < 0) & ~is_input, last=last,
                    outputs=np.array(sorted(out_set - set(g.inputs)), np.int64),
                    consumers_of=consumers_of, n_ops=n_ops, repl={},
                    splits=splits, row_split=np.array(row_split, np.int64), is16=is16, op_io=op_io,
                    fast_mm=fast_mm,
                    op_flops=np.array([op.flops for op in g.ops], np.float64),
                    op_bytes=np.array([op.bytes for op in g.ops], np.float64),
                    row_op=np.repeat(np.arange(n_ops), nst),
                    o_is_out=np.isin(o_t, np.array(sorted(out_set), np.int64)),
                    o_pos_of=_positions(o_t, n_t),
                    o_last_use=np.array([max(g.tensors[t].consumers, default=g.tensors[t].producer)
                                         for t in o_t.tolist()], np.int64),
                    o_fused=fused[o_t],
                    io_row=np.concatenate([row_of_in, row_of_out]),
                    io_sid=np.concatenate([np.array(want, np.int64), np.array(give, np.int64)]),
                    io_nbytes=np.concatenate([in_nbytes, out_nbytes]), comp_cache={})

    # ---- per-mesh precomputation ----------------------------------------------------------------
    def _precompute_mesh(self) -> None:
        g, topo, mesh, sh = self.graph, self.topology, self.mesh, self._sh
        sizes = mesh.axes
        devs = [topo.device(i) for i in mesh.device_ids]
        kinds = sorted({(d.flops, d.flops_fp32, d.matmul_flops_fp32, d.memory_bandwidth) for d in devs})
        key = (tuple(mesh.shape), mesh.axis_names, frozenset(mesh.device_ids), self.efficiency,
               self.memory_efficiency, tuple(kinds))
        self._shards = np.zeros(0, np.float64)
        self._ensure_shards()
        comp = sh["comp_cache"].get(key)
        if comp is None:
            split_shards = np.ones(len(sh["splits"].items))
            for k, axes in enumerate(sh["splits"].items):
                for a in axes:
                    if a not in sizes:
                        row = int(np.flatnonzero(sh["row_split"] == k)[0])
                        i = int(sh["row_op"][row])
                        st = self.op_strategies[i][row - int(sh["row_base"][i])]
                        raise ValueError(f"strategy {st.name!r} of {g.ops[i].where()} uses mesh axis "
                                         f"{a!r}; the mesh has axes {sizes}")
                split_shards[k] = math.prod(sizes[a] for a in axes)
            n_rows = len(sh["row_op"])
            local = np.bincount(sh["io_row"], sh["io_nbytes"] / self._shards[sh["io_sid"]],
                                minlength=n_rows)
            op = sh["row_op"]
            shards = split_shards[sh["row_split"]]
            io = sh["op_io"][op]
            moved = np.where(io > 0, sh["op_bytes"][op] * local / np.where(io > 0, io, 1),
                             sh["op_bytes"][op] / shards)
            comp, slowest = None, -1.0
            for f16, f32, mm32, mbw in kinds:
                rate = np.where(sh["is16"][op], f16, np.where(sh["fast_mm"][op], mm32, f32)) * self.efficiency
                times = np.maximum(sh["op_flops"][op] / shards / rate, moved / (mbw * self.memory_efficiency))
                # which kind is slowest: by the replicated step (option 0 of every op), so that one
                # kind prices every strategy of this mesh
                total = float(times[sh["row_base"]].sum())
                if total > slowest:
                    comp, slowest = times, total
            sh["comp_cache"][key] = comp
        self._comp = comp
        self._p_keys = np.zeros(0, np.int64)    # sorted (shape class, src, dst) keys
        self._p_slot = np.zeros(0, np.int64)    # key position -> slot of the arrays below
        self._p_dur = np.zeros(0)               # seconds
        self._p_rbytes = np.zeros(0)            # local bytes of the resharded copy
        self._p_kb = np.zeros((0, len(KINDS)))  # per-device result bytes by kind
        self._p_comms: list = []
        self._p_ag0 = np.zeros(0, np.int64)     # id of the reshard's leading all-gather, or -1
        self._ag0_ids: dict = {}                # (axes, bytes) of a leading all-gather -> id
        self._p_dict: dict = {}                 # (shape class, src, dst) -> slot, for scalar lookups
        self._comm_cache: dict = {}
        self._root_cache: dict = {}             # tensor -> (tensors read, their shardings, roots)
        self._slice_cache: dict = {}            # (tensor, src, dst) -> `_only_sliced` and its inputs
        self._chain_cache: dict = {}            # (tensor, pin) -> `_select_chains`' moves and inputs
        self._out_set = frozenset(g.outputs)
        self._manual_comms()

    def _manual_comms(self) -> None:
        """shard_map bodies' own collectives (`tag_jax.cost.manual`): priced on this mesh's groups,
        their time added to the op's (they run inside it, nothing overlaps them), their bytes to
        every strategy's (the op has one option)."""
        self._manual_kb = np.zeros(len(KINDS))
        self._manual_s = 0.0
        self._manual: tuple = ()
        def regions(op) -> list:  # the op itself, or the regions inside a loop or branch body
            if op.primitive == "shard_map" and op.eqn is not None:
                return [op]
            return [r for g in op.subgraphs for o in g.ops for r in regions(o)]

        found = [(op, regions(op)) for op in self.graph.ops]
        if not any(r for _, r in found):
            return
        from tag_jax.cost.manual import body_comms

        comp = self._comp.copy()
        for op, inner in found:
            seconds = 0.0
            for region in inner:  # a region in a scan body: its `trips` count the iterations
                for c in body_comms(region.eqn):
                    self._manual += (c,) * region.trips
                    seconds += region.trips * self.comm_seconds(c)
                    self._manual_kb[_KIND_INDEX[c.kind]] += region.trips * c.bytes
            if seconds:
                comp[self._sh["row_base"][op.id]:self._sh["row_base"][op.id] + len(self.op_strategies[op.id])] += seconds
                self._manual_s += seconds
        self._comp = comp

    def manual_comms(self) -> tuple:
        """The collectives shard_map bodies issue per step (`Comm`s, repeated per trip)."""
        return self._manual

    def _ensure_shards(self) -> None:
        items = self._sh["sh"].items
        if len(self._shards) < len(items):
            sizes = self.mesh.axes
            extra = []
            for s in items[len(self._shards):]:  # other meshes' shardings may be interned: NaN
                ok = all(a in sizes for a in s.axes + s.partial)
                extra.append(s.shards(sizes) if ok else math.nan)
            self._shards = np.concatenate([self._shards, np.array(extra, np.float64)])

    def _replicated_id(self, ndim: int) -> int:
        repl = self._sh["repl"]
        if ndim not in repl:
            repl[ndim] = self._sh["sh"](TensorSharding.replicated(ndim))
        return repl[ndim]

    def comm_seconds(self, comm: Comm) -> float:
        key = (comm.kind, comm.axes, comm.bytes)
        t = self._comm_cache.get(key)
        if t is None:
            t = self._comm_cache[key] = comm_time(comm, self.mesh, self.topology)
        return t

    def price(self, tid: int, src: int, dst: int) -> tuple[float, tuple[Comm, ...], float]:
        """(seconds, comms, local result bytes) of resharding tensor `tid` between sharding ids."""
        key = (int(self._sh["t_shape"][tid]), src, dst)
        k = self._p_dict.get(key)
        if k is None:
            k = self._p_dict[key] = int(self._lookup(np.array([tid]), np.array([src]), np.array([dst]))[0])
        return float(self._p_dur[k]), self._p_comms[k], float(self._p_rbytes[k])

    def _lookup(self, tids: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """Indices into the price cache (`_p_*` arrays) of reshards (tensor, src id, dst id)."""
        keys = (self._sh["t_shape"][tids] << 40) | (src << 20) | dst
        idx = np.searchsorted(self._p_keys, keys)
        hit = idx < len(self._p_keys)
        hit[hit] = self._p_keys[idx[hit]] == keys[hit]
        if not hit.all():
            miss, first = np.unique(keys[~hit], return_index=True)
            where = np.flatnonzero(~hit)[first]
            items = self._sh["sh"].items
            dur, rb, kb, ag0 = [], [], [], []
            for j in where.tolist():
                t = self.graph.tensors[int(tids[j])]
                s, d = items[int(src[j])], items[int(dst[j])]
                comms = reshard_collectives(s, d, t.shape, t.dtype, self.mesh)
                if self.lowering == "xla-cpu" and t.dtype.itemsize == 2 and jnp.issubdtype(t.dtype, jnp.floating):
                    comms = _cpu_wide_collectives(comms)
                dur.append(sum(self.comm_seconds(c) for c in comms))
                # a non-partial value wanted as partial over more axes (a local select) is read
                # where it lies: partial layouts are never constraints, so the program holds no
                # copy (vgg-19: the replicated 411 MB classifier weight gradient wanted as such by
                # its transpose; one copy too many at the peak)
                select = not comms and not s.partial and d.partial and d.without_partial() == s
                rb.append(0.0 if select else t.nbytes / max(1, d.shards(self.mesh.axes)))
                row = [0] * len(KINDS)
                for c in comms:
                    row[_KIND_INDEX[c.kind]] += c.bytes
                kb.append(row)
                self._p_comms.append(comms)
                ag0.append(self._ag0_id(comms, d, t.nbytes))
            keys_all = np.concatenate([self._p_keys, miss])
            order = np.argsort(keys_all, kind="stable")
            self._p_keys = keys_all[order]
            self._p_slot = np.concatenate([self._p_slot, np.arange(len(self._p_dur), len(self._p_dur) + len(miss))])[order]
            self._p_dur = np.concatenate([self._p_dur, dur])
            self._p_rbytes = np.concatenate([self._p_rbytes, rb])
            self._p_kb = np.concatenate([self._p_kb, np.array(kb, np.float64).reshape(-1, len(KINDS))])
            self._p_ag0 = np.concatenate([self._p_ag0, np.array(ag0, np.int64)])
            idx = np.searchsorted(self._p_keys, keys)
        return self._p_slot[idx]

    def _ag0_id(self, comms, dst: TensorSharding, nbytes: int) -> int:
        """An id of the reshard's leading collective when it is an all-gather (same axes, bytes
        and path, same id), else -1. The path: a reshard to a replicated layout (partial axes
        aside), or one whose first gather makes the whole tensor (XLA's "involuntary full
        rematerialization": replicate, then slice), goes through the partitioner's replication;
        any other through a partial replication (on the way to a slice or an all-to-all). Each
        is cached and reused by the reshards on its path, never by the other's, even where the
        first all-gathers are alike (vgg-19 random-7: ``fc6.kernel`` ``P(model, data)`` wanted
        ``P(None, None)`` and ``P(None, model)``: two all-gathers over data of one operand,
        ``all-gather.65``/``.95``; mlp-real random-5: ``P(data, model)`` wanted replicated and
        ``P(data, None)``: ``all-gather.7``/``.28``, identical but for channel ids)."""
        if not comms or comms[0].kind != "all-gather":
            return -1
        replicate = not any(dst.dims) or int(comms[0].bytes) >= nbytes
        key = (tuple(comms[0].axes), int(comms[0].bytes), replicate)
        return self._ag0_ids.setdefault(key, len(self._ag0_ids))

    def _shared_gathers(self, kb, slots, ut, us):
        """Reshards of one tensor from one layout that start with the same all-gather on the same
        path (`_ag0_id`) share it: the SPMD partitioner caches the replicated (or partially
        replicated) copy it makes and reshards from it again (a weight wanted replicated,
        ``P(None, b)`` and ``P(None, a)`` from ``P((a,b), None)``: one full gather, each target
        sliced from it; mlp-real random-1's ``dense_3.kernel``). It is not XLA's CSE: identical
        all-gathers of one operand on different paths stay two."""
        ag = self._p_ag0[slots]
        m = np.flatnonzero(ag >= 0)
        if m.size < 2:
            return kb
        key = (ut[m] << 42) | (us[m] << 21) | ag[m]
        _, first, count = np.unique(key, return_index=True, return_counts=True)
        dup = count > 1
        if not dup.any():
            return kb
        kb = kb.copy()
        gi = _KIND_INDEX["all-gather"]
        for j, n in zip(m[first[dup]].tolist(), count[dup].tolist()):
            kb[gi] -= (n - 1) * self._p_comms[int(slots[j])][0].bytes
        return kb

    # ---- evaluation -----------------------------------------------------------------------------
    def _shardings(self, strategy: Strategy) -> tuple[np.ndarray, np.ndarray]:
        """(choices, sharding id of every tensor) after checking the strategy fits the graph."""
        sh, g = self._sh, self.graph
        if strategy.mesh != self.mesh:
            raise ValueError(f"strategy {strategy.name!r} is for mesh {strategy.mesh}, this simulator "
                             f"for {self.mesh}; use Simulator.with_mesh(strategy.mesh)")
        c = np.asarray(strategy.choices, np.int64)
        if c.shape != (sh["n_ops"],):
            raise ValueError(f"strategy {strategy.name!r} has {len(strategy.choices)} choices for "
                             f"{sh['n_ops']} ops of graph {g.name}")
        bad = np.flatnonzero((c < 0) | (c >= sh["nst"]))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"strategy {strategy.name!r}: choice {c[i]} for {g.ops[i].where()}, "
                             f"which has {sh['nst'][i]} strategies")
        if len(strategy.input_shardings) != len(g.inputs):
            raise ValueError(f"strategy {strategy.name!r} has {len(strategy.input_shardings)} input "
                             f"shardings for {len(g.inputs)} graph inputs")
        tsh = self._base_shardings(strategy.input_shardings).copy()
        o = sh["o_op"]
        tsh[sh["o_t"]] = sh["give"][sh["out_base"][o] + c[o] * sh["nout"][o] + sh["o_pos"]]
        self._ensure_shards()
        return c, tsh

    def _base_shardings(self, input_shardings) -> np.ndarray:
        """Sharding ids of graph inputs and constants (op outputs unset); cached for the last inputs."""
        last = getattr(self, "_last_inputs", None)
        if last is not None and (last[0] is input_shardings or last[0] == input_shardings):
            return last[1]
        sh, g = self._sh, self.graph
        tsh = np.full(len(g.tensors), -1, np.int64)
        for t in np.flatnonzero(sh["free"]).tolist():
            tsh[t] = self._replicated_id(len(g.tensors[t].shape))
        sizes = self.mesh.axes
        for k, (t, s) in enumerate(zip(g.inputs, input_shardings)):
            if len(s.dims) != len(g.tensors[t].shape):
                raise ValueError(f"input {k} ({g.tensors[t].describe()}): sharding {s} has "
                                 f"{len(s.dims)} dims")
            bad = [a for a in s.axes + s.partial if a not in sizes]
            if bad:
                raise ValueError(f"input {k} ({g.tensors[t].describe()}): sharding {s} names mesh "
                                 f"axis {bad[0]!r}; the mesh has axes {sizes}")
            tsh[t] = sh["sh"](s)
        self._ensure_shards()
        self._last_inputs = (input_shardings, tsh)
        return tsh

    def _jobs(self, c: np.ndarray, tsh: np.ndarray):
        """Unique reshards: arrays (tensor, src, dst, first consumer, last consumer) + consumer lists."""
        sh = self._sh
        e_op = sh["e_op"]
        wanted = sh["want"][sh["in_base"][e_op] + c[e_op] * sh["nin"][e_op] + sh["e_pos"]]
        src = tsh[sh["e_t"]]
        m = np.flatnonzero(wanted != src)
        jt, jd, jc = sh["e_t"][m], wanted[m], e_op[m]
        if self._carry_out.size:  # carried state comes back sharded as it went in
            tgt = tsh[self._carry_in]
            m = np.flatnonzero(tgt != tsh[self._carry_out])
            jt = np.concatenate([jt, self._carry_out[m]])
            jd = np.concatenate([jd, tgt[m]])
            jc = np.concatenate([jc, np.full(len(m), sh["n_ops"])])
        outs = self._free_outs
        if outs.size:  # other graph outputs left partial are all-reduced at the end
            items = sh["sh"].items
            po = [int(t) for t in outs[self._partial_mask()[tsh[outs]]]]
            if po:
                jt = np.concatenate([jt, po])
                jd = np.concatenate([jd, [sh["sh"](items[tsh[t]].without_partial()) for t in po]])
                jc = np.concatenate([jc, np.full(len(po), sh["n_ops"])])
                self._ensure_shards()
        js = tsh[jt]
        pm = self._partial_mask()
        red = np.flatnonzero(pm[js]) if jt.size else jt
        if red.size:  # only jobs that reduce some partial axis (not all of them stay partial)
            pbits = self._partial_bits()
            red = red[(pbits[js[red]] & ~pbits[jd[red]]) != 0]
        if red.size:
            wp = np.flatnonzero(self._partial_bits()[jd] != 0)  # jobs wanting a partial operand
            jt, js, jd = self._retarget_selects(jt, js, jd, jc, red, tsh)
        if red.size:  # XLA reduces a partial sum where it is made, not after linear ops carry it
            items, shapes = sh["sh"].items, sh["t_shape"]
            jt, js, jd, jc = jt.copy(), js.copy(), jd.copy(), jc.copy()
            xt, xs, xd, xc = [], [], [], []
            # fast path (vectorised): a partial made by an op with no partial operand is its own
            # root (nothing changes), or a local select when that op is elementwise/shape-only
            kind = self._op_kind()
            prod = np.maximum(sh["producer"][jt[red]], 0)
            own = sh["producer"][jt[red]] < 0
            # an operand carries a partial sum into the op only where it is partial and wanted
            # partial over some same axis; one partial over other axes than wanted is reduced
            # before the op (mlp-real random-5: Adam's div wants the partial(data) update as a
            # partial(model) select; its partial(model) result is a select, never reduced)
            pbits = self._partial_bits()
            gen = np.bincount(sh["e_op"], (pbits[tsh[sh["e_t"]]] & pbits[wanted]) != 0,
                              minlength=sh["n_ops"] + 1)
            carries = ~own & (gen[prod] > 0) & (kind[prod] > 0)
            select = ~own & ~carries & (kind[prod] == 2)
            # ... or any op whose option only inherits its partial axes from operands wanted
            # as partial selects (none split an operand): mlp-real's label scatter-adds
            other = np.flatnonzero(~own & ~carries & (kind[prod] == 1))
            if other.size:
                ps = prod[other]
                select[other] = [not self._makes_sum(int(p), int(c[p])) for p in ps.tolist()]
            plain = self._plain_ids()
            sel = red[select]
            pinned: list = []
            js[sel] = self._select_sources(jt[sel], js[sel], jd[sel], c, pinned)
            ends = sel[pinned].tolist()
            todo = red[carries]
            for k, roots in zip(todo.tolist(), self._roots_of(jt[todo], tsh, c)):
                t0 = int(jt[k])
                if t0 in roots:
                    continue
                if not roots:  # made partial only by local selects: XLA never makes it partial
                    pinned = []
                    js[k] = self._select_sources(jt[k:k + 1], js[k:k + 1], jd[k:k + 1], c, pinned)[0]
                    ends.extend(k for _ in pinned)
                    continue
                # reduced at each root (towards d0 where the root has t0's shape, else in place);
                # t0 is then made from reduced values, as t0 without its partial axes: moved to d0
                dk = int(jd[k])
                for n, r in enumerate(sorted(roots)):
                    rd = self._through_transposes(r, t0, dk)
                    if rd < 0:
                        rd = dk if shapes[r] == shapes[t0] else self._towards(r, t0, dk, tsh)
                    if n == 0:
                        jt[k], js[k], jd[k] = r, tsh[r], rd
                    else:
                        xt.append(r), xs.append(int(tsh[r])), xd.append(rd), xc.append(int(jc[k]))
                p0 = int(plain[tsh[t0]])
                if p0 != dk and any(shapes[r] != shapes[t0] for r in roots):
                    xt.append(t0), xs.append(p0), xd.append(dk), xc.append(int(jc[k]))
            self._select_chains(ends, wp, jt, js, jd, jc, tsh, c)
            if xt:
                jt, js = np.concatenate([jt, xt]), np.concatenate([js, xs])
                jd, jc = np.concatenate([jd, xd]), np.concatenate([jc, xc])
            self._ensure_shards()
            # a partial sum wanted in several shardings is reduced once, towards the sharding the
            # program gives the reduced value (`_merge_targets`), and moved from there to the others
            # (XLA: ``y = x @ w`` split on the contraction, wanted as P(a,None) then P(None,a):
            # reduce-scatter, then all-to-all)
            pbits = self._partial_bits()
            cand = np.flatnonzero((pbits[js] & ~pbits[jd]) != 0)
            if cand.size > 1:
                keys, tgts, firsts = self._merge_targets(cand, jt, js, jd, jc)
                pbits = self._partial_bits()  # the merged targets may be new shardings
                pos = np.searchsorted(keys, jt[cand])
                t_for = tgts[pos]
                has = pbits[t_for] == 0
                src0 = js[cand].copy()
                move = has & (jd[cand] != t_for)
                js[cand[move]] = t_for[move]
                # a consumer wanting it still partial over some axes reads the reduced value in
                # the target layout (the program has no partial sharding between ops): no reshard
                carry = move & (pbits[jd[cand]] != 0)
                js[cand[carry]] = jd[cand[carry]]
                # a merged target no consumer wants as such: one more job reduces to it
                reached = set(zip(jt[cand[~move & has]].tolist(), jd[cand[~move & has]].tolist()))
                xt, xs, xd, xc = [], [], [], []
                for n in np.flatnonzero(pbits[tgts] == 0).tolist():
                    t, d = int(keys[n]), int(tgts[n])
                    if (t, d) not in reached:
                        k = int(np.flatnonzero(jt[cand] == t)[0])
                        xt.append(t), xs.append(int(src0[k])), xd.append(d), xc.append(int(firsts[n]))
                if xt:
                    jt, js = np.concatenate([jt, xt]), np.concatenate([js, xs])
                    jd, jc = np.concatenate([jd, xd]), np.concatenate([jc, xc])
            keep = js != jd  # a select retargeted to where its operand already is: nothing to do
            if not keep.all():
                jt, js, jd, jc = jt[keep], js[keep], jd[keep], jc[keep]
        return jt, js, jd, jc

    def _select_sources(self, ts, srcs, dsts, c, pinned: list | None = None) -> np.ndarray:
        """Where a local select (a partial result no sum made, `srcs` its partial shardings) is
        resharded from towards `dsts`: the program computes it in the layout `tag_jax.emit` pins
        it to, which, when every consumer wants one non-partial sharding, is that sharding's
        `reshard.after_reduction` (the partial axes taken as free slices: ``P(None,b)+partial(a)``
        wanted ``P(a,None)`` is made as ``P(a,b)``, then all-gathered over b); otherwise it is
        left unconstrained and made without its partial axes. `pinned` gets the positions of
        the pinned ones."""
        sh = self._sh
        plain = self._plain_ids()
        out = plain[srcs].copy()
        if not ts.size:
            return out
        pbits, items = self._partial_bits(), sh["sh"].items
        want, in_base, nin = sh["want"], sh["in_base"], sh["nin"]
        memo = sh.setdefault("select_sources", {})
        for n, (t, s, d) in enumerate(zip(ts.tolist(), srcs.tolist(), dsts.tolist())):
            if pbits[d]:
                continue
            users = sh["consumers_of"][t]
            if not users or any(int(want[in_base[i] + c[i] * nin[i] + p]) != d for i, p in users):
                continue
            got = memo.get((s, d))
            if got is None:
                got = memo[(s, d)] = sh["sh"](after_reduction(items[s], items[d]))
                self._ensure_shards()
            if not self._partial_bits()[got]:
                out[n] = got
                if pinned is not None:
                    pinned.append(n)
        return out

    def _retarget_selects(self, jt, js, jd, jc, red, tsh):
        """Operands an elementwise op wants as a local select of a partial sum (non-partial in,
        partial wanted, e.g. ``b1 * mu`` added to a partial gradient) are moved to the layout the
        op's partial result is reduced to, not gathered to the select's replicated-plus-partial
        layout. The program has no constraint for such an operand (GSPMD cannot be asked for a
        partial one) and XLA runs the op on reduced values, so the operand is resharded to the
        reduced result's sharding (mlp-real random strategies: Adam's mu/nu all-gathered whole where
        XLA moves them with an all-to-all or not at all). The reduction target of a partial result
        is the one `_merge_targets` gives its reducing jobs (as below); results whose partial is
        carried further by elementwise ops are followed forward to the first reduced one."""
        sh = self._sh
        pbits = self._partial_bits()
        sel = np.flatnonzero((pbits[jd] & ~pbits[js]) != 0)
        if not sel.size:
            return jt, js, jd
        n_ops = sh["n_ops"]
        sel = sel[(jc[sel] < n_ops)]
        elem_out, shape_id = self._elementwise_out()
        o_all = elem_out[jc[sel]]
        keep = o_all >= 0
        sel, o_all = sel[keep], o_all[keep]
        if sel.size:  # same shape as the op's result and the same partial axes as it
            plain = self._plain_ids()
            keep = ((shape_id[jt[sel]] == shape_id[o_all]) & (pbits[tsh[o_all]] == pbits[jd[sel]])
                    & (plain[tsh[o_all]] == plain[jd[sel]]))
            sel, o_all = sel[keep], o_all[keep]
        if not sel.size:
            return jt, js, jd
        # reduction targets of the partial tensors reduced directly (`_merge_targets`)
        t_keys, t_vals, _ = self._merge_targets(red, jt, js, jd, jc)
        pbits = self._partial_bits()
        g = self.graph
        memo: dict[int, int] = {}

        def direct(o: int) -> int:
            i = int(np.searchsorted(t_keys, o))
            return int(t_vals[i]) if i < len(t_keys) and t_keys[i] == o else -1

        def reduced_to(o: int, bits: int) -> int:
            if o in memo:
                return memo[o]
            memo[o] = -1
            found = direct(o)
            if found < 0:
                for i in g.tensors[o].consumers:
                    u = int(elem_out[i])
                    if u >= 0 and pbits[tsh[u]] == bits and shape_id[u] == shape_id[o]:
                        found = reduced_to(u, bits)
                        if found >= 0:
                            break
            memo[o] = found
            return found

        # the common case in one pass: the op's result is itself reduced directly
        pos = np.searchsorted(t_keys, o_all)
        pos_c = np.minimum(pos, max(len(t_keys) - 1, 0))
        hit = (pos < len(t_keys)) & (t_keys[pos_c] == o_all) if len(t_keys) else np.zeros(len(o_all), bool)
        d_all = np.where(hit, t_vals[pos_c] if len(t_keys) else -1, -1)
        for n in np.flatnonzero(~hit).tolist():
            o = int(o_all[n])
            d_all[n] = reduced_to(o, int(pbits[tsh[o]]))
        ok = d_all >= 0
        on = np.flatnonzero(ok & (pbits[np.maximum(d_all, 0)] != 0))
        if on.size:  # the target is a select wanted partial over other axes: follow the chain on
            by_job = {(int(t), int(d)): int(i) for t, d, i in zip(jt[red].tolist(), jd[red].tolist(),
                                                                   jc[red].tolist())}

            def find(o: int) -> int:
                d = direct(o)
                return d if d >= 0 else reduced_to(o, int(pbits[tsh[o]]))

            for n in on.tolist():
                d_all[n] = self._chain_end(int(o_all[n]), int(d_all[n]), find, by_job, elem_out, shape_id)
        if ok.any():
            jd = jd.copy()
            jd[sel[ok]] = d_all[ok]
        return jt, js, jd

    def _chain_end(self, o: int, d: int, find, by_job, elem_out, shape_id) -> int:
        """The non-partial layout a chain of local selects from `o` (reduced towards the partial
        `d`) ends in: the program pins only the chain's last select, where its consumer wants it
        non-partial, and XLA computes the chain there (mlp-real random-1: Adam's update plus weight
        decay, wanted partial(model) then partial(data), made in the update's P(data, None)); the
        target without its partial axes where the chain stops being one."""
        pbits, plain = self._partial_bits(), self._plain_ids()
        for _ in range(8):
            i = by_job.get((o, d), -1)
            u = int(elem_out[i]) if i >= 0 else -1
            nxt = find(u) if u >= 0 and shape_id[u] == shape_id[o] else -1
            if nxt < 0:
                break
            o, d = u, nxt
            if not pbits[d]:
                return d
        return int(plain[d])

    def _select_chains(self, ends, wp, jt, js, jd, jc, tsh, c) -> None:
        """Where the ops of a chain of local selects run (in place on the job arrays): the program
        pins only the chain's last select (`_select_sources`: its `js`), so GSPMD propagates
        shardings forward from the chain's operands: an unpinned elementwise op runs in its
        operands' layouts merged (`_merged`, first operand first: ``P(a,None)`` and ``P(None,b)``
        give ``P(a,b)``, each operand sliced to it), and the pinned op's operands are each moved
        to the pin (toys in tests/test_fidelity_random.py; mlp-real random-1's Adam update,
        ``[4096,2048]`` then one all-gather over model); an unpinned operand is sliced
        towards the pin before it moves (``P(a,None)`` to ``P(None,b)``: an all-gather over a of
        the ``P(a,b)`` piece, not of the whole tensor). `wp`: the jobs whose consumer wants its
        operand partial (before `_retarget_selects`): the chain's edges."""
        if not ends:
            return
        sh, g = self._sh, self.graph
        pbits = self._partial_bits()
        # a chain of one op ending where it is pinned is `_retarget_selects`' already
        e = np.array(ends, np.int64)
        prod = np.maximum(sh["producer"][jt[e]], 0)
        deep = np.bincount(sh["e_op"], self._partial_mask()[tsh[sh["e_t"]]], minlength=sh["n_ops"] + 1)
        e = e[(deep[prod] > 0) | (js[e] != jd[e])]
        if not e.size:
            return
        want, in_base, nin, items = sh["want"], sh["in_base"], sh["nin"], sh["sh"].items
        elem_out, shape_id = self._elementwise_out()
        edge = dict(zip(zip(jt[wp].tolist(), jc[wp].tolist()), wp.tolist()))

        def run(q: int, moves: list, read: list, pin: int = -1) -> int:
            # op q's result layout (-1: not a chain); its operands' moves into `moves`
            out, got = int(elem_out[q]), []
            read.append(q)
            for pos, x in enumerate(g.ops[q].inputs):
                if shape_id[x] != shape_id[out]:
                    continue  # a scalar or broadcast operand
                w = int(want[in_base[q] + c[q] * nin[q] + pos])
                if not pbits[w]:
                    got.append((-1, w, False))  # pinned by its own operand constraint
                    continue
                e_ = (int(x), q)
                read.append(~int(x))
                if not pbits[tsh[x]]:
                    got.append((e_, int(tsh[x]), False))  # a chain operand (pinned as made)
                    continue
                p = int(sh["producer"][x])
                if p < 0 or elem_out[p] != x or len(g.tensors[x].consumers) != 1:
                    return -1  # a partial sum or a shared select: not a chain
                inner = run(p, moves, read)
                if inner < 0:
                    return -1
                got.append((e_, inner, True))
            if not got:
                return -1
            merged = sh["sh"](_merged([items[d] for _, d, _ in got]))
            for e_, d, free in got:
                if e_ != -1 and pin < 0:
                    moves.append((e_, d, merged))
                elif e_ != -1:  # an unpinned value is sliced towards the pin first (`reshard` 0c)
                    moves.append((e_, sh["sh"](_merged([items[d], items[pin]])) if free else d, pin))
            return merged

        cache = self._chain_cache
        for k in e.tolist():
            t, pin = int(jt[k]), int(js[k])
            hit = cache.get((t, pin))
            if hit is not None and np.array_equal(c[hit[0]], hit[1]) and np.array_equal(tsh[hit[2]], hit[3]):
                moves = hit[4]
            else:
                p = int(sh["producer"][t])
                moves, read = [], []
                if p < 0 or elem_out[p] != t or run(p, moves, read, pin) < 0:
                    moves = []
                ops = np.array([r for r in read if r >= 0], np.int64)
                ts = np.array([~r for r in read if r < 0], np.int64)
                cache[(t, pin)] = (ops, c[ops], ts, tsh[ts], moves)
            for e_, d, to in moves:
                j = edge.get(e_, -1)
                if j >= 0:
                    js[j], jd[j] = d, to
        self._ensure_shards()

    def _merge_targets(self, idx, jt, js, jd, jc):
        """Where each partial tensor of the reducing jobs `idx` is reduced to: (tensors sorted,
        target sharding ids, first consumer op). The emitter leaves a partial result wanted in
        several shardings unconstrained, and the sharding the program gives the reduced value is
        the first consumer's, refined per dimension by each later consumer whose axes on that
        dimension extend it (with axes not used on other dimensions yet): users ``P(b)`` then
        ``P((a,b))`` reduce to ``P(b)`` (a reduce-scatter over b, an all-reduce over a, then a
        permute), ``P(a)`` then ``P((a,b))`` to ``P((a,b))``, ``P(None,b)`` then ``P((a,b),None)``
        to ``P(a,b)``, replicated then ``P(a)`` to ``P(a)`` (compiled HLO, 2x4 and 8 CPU devices:
        tests/test_fidelity_random.py). A `reduce_sum` result is instead all-reduced where it is
        made, in its own layout, and sliced or moved for each consumer. Only non-partial targets
        are merged; a tensor wanted partial only keeps its first consumer's."""
        sh = self._sh
        pbits, plain, items = self._partial_bits(), self._plain_ids(), sh["sh"].items
        order = idx[np.lexsort((jc[idx], jt[idx]))]
        ot = jt[order]
        starts = np.flatnonzero(np.r_[True, ot[1:] != ot[:-1]])
        ends = np.r_[starts[1:], order.size].astype(np.int64)
        keys, tgts, firsts = ot[starts], jd[order[starts]].copy(), jc[order[starts]]
        if order.size:
            differ = np.add.reduceat((jd[order] != np.repeat(tgts, ends - starts)).astype(np.int64), starts)
            for n in np.flatnonzero(differ > 0).tolist():
                run = order[starts[n]:ends[n]]
                wants = [int(d) for d in dict.fromkeys(jd[run].tolist()) if pbits[int(d)] == 0]
                if not wants:
                    continue
                prod = int(sh["producer"][int(keys[n])])
                if prod >= 0 and self.graph.ops[prod].primitive == "reduce_sum":
                    tgts[n] = plain[int(js[run[0]])]
                    continue
                tgts[n] = sh["sh"](_merged([items[d] for d in wants]))
            self._ensure_shards()
        return keys, tgts, firsts

    def _elementwise_out(self) -> tuple[np.ndarray, np.ndarray]:
        """(per op (and one past the end): its result's tensor id if it is a single-result
        elementwise op, else -1; per tensor: an id of its shape)."""
        got = self._sh.get("elementwise_out")
        if got is None:
            g = self.graph
            out = np.array([op.outputs[0] if op.primitive in _ELEMENTWISE and len(op.outputs) == 1
                            and not op.subgraphs else -1 for op in g.ops] + [-1], np.int64)
            shapes = _Interner()
            sid = np.array([shapes(t.shape) for t in g.tensors], np.int64)
            got = self._sh["elementwise_out"] = (out, sid)
        return got

    def _through_transposes(self, r: int, t0: int, dk: int) -> int:
        """The target `dk` of `t0` carried back onto its root `r` when `t0` is made from `r` by
        transposes and same-shape elementwise ops only and the dimensions move (a square weight
        gradient ``(x.T @ g).T``, wanted row-split, is reduce-scattered along the dot's columns);
        -1 when there is no such chain, or it keeps every dimension in place."""
        sh = self._sh
        memo = sh.setdefault("through_transposes", {})
        key = (r, t0)
        perm = memo.get(key, False)
        if perm is False:
            g = self.graph
            perm, stack = None, [(r, tuple(range(len(g.tensors[r].shape))), 0)]
            while stack:  # t0's dim j is r's dim p[j]
                u, p, depth = stack.pop()
                if u == t0:
                    perm = p
                    break
                if depth >= 8:
                    continue
                for k in g.tensors[u].consumers:
                    op = g.ops[k]
                    if len(op.outputs) != 1 or op.subgraphs:
                        continue
                    o = op.outputs[0]
                    if op.primitive == "transpose":
                        stack.append((o, tuple(p[q] for q in op.eqn.params["permutation"]), depth + 1))
                    elif op.primitive in _ELEMENTWISE and g.tensors[o].shape == g.tensors[u].shape:
                        stack.append((o, p, depth + 1))
            if perm is not None and (perm == tuple(range(len(perm)))
                                     or g.ops[int(sh["producer"][r])].primitive == "reduce_sum"):
                perm = None
            memo[key] = perm
        if perm is None:
            return -1
        want = sh["sh"].items[dk]
        dims = [()] * len(perm)
        for j, axes in enumerate(want.dims):
            dims[perm[j]] = axes
        out = sh["sh"](TensorSharding(tuple(dims), want.partial))
        self._ensure_shards()
        return out

    def _towards(self, r: int, t0: int, dk: int, tsh: np.ndarray) -> int:
        """The sharding a root `r` of another shape than `t0` is reduced to: its own, without the
        partial axes, plus each split of t0's target `dk` on the free dimension of r with the same
        extent, where that extent occurs once in each shape (XLA propagates the wanted split back through the reshapes: recommender's
        embedding lookups from row-split tables are reduce-scattered along the batch, not
        all-reduced); a split with no such dimension is left out (reduced in place)."""
        sh = self._sh
        key = (r, t0, dk, int(tsh[r]))
        memo = sh.setdefault("towards", {})
        out = memo.get(key)
        if out is None:
            items = sh["sh"].items
            root, want = items[int(tsh[r])], items[dk]
            rshape, tshape = self.graph.tensors[r].shape, self.graph.tensors[t0].shape
            dims = [list(d) for d in root.dims]
            used = set(root.axes)
            if self.graph.ops[int(sh["producer"][r])].primitive not in ("gather", "dot_general"):
                want = TensorSharding.replicated(len(tshape))  # reduce_sum & co: in place
            for extent, axes in zip(tshape, want.dims):
                if (not axes or any(a in used for a in axes) or tshape.count(extent) != 1
                        or rshape.count(extent) != 1):
                    continue  # only an unambiguous dimension (same extent once in each shape)
                for i, n in enumerate(rshape):
                    if n == extent and not dims[i]:
                        dims[i] = list(axes)
                        used.update(axes)
                        break
            out = memo[key] = sh["sh"](TensorSharding(tuple(tuple(d) for d in dims)))
            self._ensure_shards()
        return out

    def _roots_of(self, ts: np.ndarray, tsh: np.ndarray, c: np.ndarray) -> list:
        """`_partial_roots` of each tensor in `ts`, the cached answers checked in one numpy pass."""
        cache = self._root_cache
        hits = [cache.get(t) for t in ts.tolist()]
        vec = np.concatenate([tsh, c])  # tensor shardings, then op choices
        ok = _still_valid(hits, vec)
        return [hits[i][2] if ok[i] else self._partial_roots(int(t), tsh, c, vec)
                for i, t in enumerate(ts.tolist())]

    def _partial_roots(self, t: int, tsh: np.ndarray, c: np.ndarray, vec: np.ndarray) -> frozenset:
        """The tensors where the partial sum `t` was made, followed back through every op whose
        chosen option carries a partial operand (same partial axes) to a partial result.

        GSPMD has no partial-sum sharding between ops (`with_sharding_constraint` cannot ask for
        one): it reduces a dot's, reduction's or scatter-add's partial result where it is made
        (all-reduce, or reduce-scatter towards its consumer) and runs every later op on the reduced
        value. So a partial sum a strategy carries through several ops (a gradient into Adam's mu,
        nu and the update; t5's 12 per-layer position-bias gradients summed, then reduced over
        the batch and transposed into the bias table) is reduced at each of its roots, however
        many of its descendants the strategy reduces, and at the root's size. Operands made partial
        by a local select (an elementwise or shape-only op with no partial operand, e.g. `b1 * mu`
        with mu replicated) are no root: a value with none is never partial in the program.
        The answer depends only on the shardings of the tensors the walk read; it is cached per
        tensor with those (checked with one numpy comparison), so a search re-walks only the
        chains its moves touched.
        """
        cache = self._root_cache
        sh, g, items = self._sh, self.graph, self._sh["sh"].items
        want = items[int(tsh[t])].partial
        pbits, wants, in_base, nin = self._partial_bits(), sh["want"], sh["in_base"], sh["nin"]
        n_t = len(tsh)
        memo: dict[int, frozenset] = {}
        seen = [t]
        stack = [(t, 0)]
        while stack:  # iterative post-order (chains can be thousands of ops deep)
            u, state = stack.pop()
            if u in memo and state == 0:
                continue
            p = int(sh["producer"][u])
            op = g.ops[p] if p >= 0 else None
            if op is None or op.subgraphs or len(op.outputs) != 1:
                memo[u] = frozenset((u,))
                continue
            if state == 0:
                seen.extend(op.inputs)
                seen.append(n_t + p)
            # operands that carry a partial sum in: partial and wanted partial over a same axis
            # (one partial over other axes than wanted is reduced before the op)
            base = in_base[p] + c[p] * nin[p]
            ins = [v for k, v in enumerate(op.inputs)
                   if pbits[int(tsh[v])] & pbits[int(wants[base + k])]]
            # an operand partial over fewer axes than wanted carries its partial sum in when the
            # op makes no sum over the other wanted axes (it splits no operand by them: a
            # transpose, elementwise op, or a scatter-add of selects): those are a local select,
            # no sum over them is ever made (a reduction or dot contracting a dim split by them
            # sums over them: its result is a root)
            if any(items[int(tsh[v])].partial != want and not (
                    set(items[int(tsh[v])].partial) <= set(want)
                    and not (set(want) - set(items[int(tsh[v])].partial)) & self._split_axes(p, int(c[p])))
                   and not set(items[int(tsh[v])].partial) > set(want)
                   for v in ins):
                memo[u] = frozenset((u,))
                continue
            if not ins:
                memo[u] = (frozenset() if op.primitive in _SELECT_ONLY or not self._makes_sum(p, int(c[p]))
                           else frozenset((u,)))
                continue
            if state == 0:
                stack.append((u, 1))
                stack.extend((v, 0) for v in ins if v not in memo)
                continue
            memo[u] = frozenset().union(*(memo[v] for v in ins))
        seen_a = np.array(seen, np.int64)
        cache[t] = (seen_a, vec[seen_a].copy(), memo[t])
        return memo[t]

    def _split_axes(self, p: int, choice: int) -> frozenset:
        """The mesh axes op `p`'s option `choice` splits some operand dimension by."""
        memo = self._sh.setdefault("split_axes", {})
        key = (p, choice)
        got = memo.get(key)
        if got is None:
            got = memo[key] = frozenset(a for w in self.op_strategies[p][choice].inputs for a in w.axes)
        return got

    def _makes_sum(self, p: int, choice: int) -> bool:
        """Whether op `p`'s option `choice` makes a partial sum of non-partial operands: some
        partial axis of its result splits an operand (a dot or reduction contracting a split dim).
        One whose partial axes are only wanted partial on operands makes none of those: fed
        non-partial values (local selects) it is a select itself, never partial in the program
        (mlp-real: the label gradient's scatter-adds into zeros, option R + partial)."""
        st = self.op_strategies[p][choice]
        outs = {a for o in st.outputs for a in o.partial}
        return bool(outs & self._split_axes(p, choice))

    def _gather_ops(self) -> np.ndarray:
        """Per op (and one past the end): whether it is a gather (a lookup)."""
        mask = self._sh.get("gather_ops")
        if mask is None:
            mask = self._sh["gather_ops"] = np.array(
                [op.primitive == "gather" for op in self.graph.ops] + [False], bool)
        return mask

    def _op_kind(self) -> np.ndarray:
        """Per op: 0 a partial root whatever its operands (several outputs, sub-graphs), 2 an
        elementwise or shape-only op (a local select when no operand is partial), 1 any other."""
        sh = self._sh
        kind = sh.get("op_kind")
        if kind is None:
            g = self.graph
            kind = sh["op_kind"] = np.array(
                [0 if op.subgraphs or len(op.outputs) != 1 else 2 if op.primitive in _SELECT_ONLY else 1
                 for op in g.ops] + [0], np.int8)
        return kind

    def _plain_ids(self) -> np.ndarray:
        """Per sharding id: the id of that sharding without its partial axes."""
        interner = self._sh["sh"]
        plain = self._sh.get("plain_ids", np.zeros(0, np.int64))
        if len(plain) < len(interner.items):
            extra = [interner(s.without_partial()) for s in interner.items[len(plain):]]
            plain = self._sh["plain_ids"] = np.concatenate([plain, np.array(extra, np.int64)])
            self._ensure_shards()
        return plain

    def _partial_bits(self) -> np.ndarray:
        """Per sharding id: its partial axes as a bit mask."""
        sh = self._sh
        bits = sh.get("partial_bits", np.zeros(0, np.int64))
        items = sh["sh"].items
        if len(bits) < len(items):
            axis_bit = sh.setdefault("axis_bit", {})
            extra = [sum(1 << axis_bit.setdefault(a, len(axis_bit)) for a in s.partial)
                     for s in items[len(bits):]]
            bits = sh["partial_bits"] = np.concatenate([bits, np.array(extra, np.int64)])
        return bits

    def _partial_mask(self) -> np.ndarray:
        items = self._sh["sh"].items
        pm = getattr(self, "_pm", None)
        if pm is None or len(pm) < len(items):
            pm = self._pm = np.array([bool(s.partial) for s in items], bool)
        return pm

    def _grouped_jobs(self, c: np.ndarray, tsh: np.ndarray) -> tuple:
        """The strategy's reshards, one per (tensor, target sharding) with its consumers grouped:
        (consumers sorted by reshard, start and end of each reshard's run in them, tensor, source,
        target, first and last consumer, price-cache slot) per reshard."""
        jt, js, jd, jc = self._jobs(c, tsh)
        key = jt * (len(self._sh["sh"].items) + 1) + jd
        order = np.lexsort((jc, key))
        key_s, jc_s = key[order], jc[order]
        if key_s.size:
            starts = np.flatnonzero(np.r_[True, key_s[1:] != key_s[:-1]])
            ends = np.r_[starts[1:], key_s.size].astype(np.int64)
        else:
            starts = ends = np.zeros(0, np.int64)
        u = order[starts]
        ut, us, ud = jt[u], js[u], jd[u]
        first, lastc = jc_s[starts], jc_s[ends - 1]
        slots = self._lookup(ut, us, ud) if len(u) else np.zeros(0, np.int64)
        return jc_s, starts, ends, ut, us, ud, first, lastc, slots

    def cost(self, strategy: Strategy, *, overlap: bool = True, per_op: bool = False) -> Cost:
        sh = self._sh
        c, tsh = self._shardings(strategy)
        comp = self._comp[sh["row_base"] + c]
        n_ops = sh["n_ops"]
        jc_s, starts, ends, ut, us, ud, first, lastc, slots = self._grouped_jobs(c, tsh)
        dur, rbytes = self._p_dur[slots], self._p_rbytes[slots]
        kb = self._p_kb[slots].sum(axis=0) if len(ut) else np.zeros(len(KINDS))
        if len(ut):
            kb = self._sliced_all_reduces(kb, slots, ut, us, ud, c, tsh)
            kb = self._shared_gathers(kb, slots, ut, us)
        compute_s = float(comp.sum()) - self._manual_s
        comm_s = float(dur.sum()) + self._manual_s
        kb = kb + self._manual_kb
        live = np.flatnonzero(dur > 0)  # free reshards (local slices) never wait for the network
        if overlap and live.size:
            step = self._schedule(comp, sh["producer"][ut[live]], first[live], dur[live],
                                  self._wait_at()[jc_s], starts[live], ends[live])
        else:
            step = compute_s + comm_s
        peak = self._peak(tsh, first, lastc, rbytes, ut, c)
        extra = {}
        if per_op:
            inc = np.zeros(n_ops + 1)
            np.add.at(inc, jc_s, np.repeat(dur, ends - starts))
            extra["per_op"] = tuple((i, float(comp[i]), float(inc[i])) for i in range(n_ops))
            items = sh["sh"].items
            extra["reshards"] = tuple((int(t), items[s], items[d], self._p_comms[k], float(self._p_dur[k]))
                                      for t, s, d, k in zip(ut.tolist(), us.tolist(), ud.tolist(),
                                                            slots.tolist()))
        return Cost(step_time_s=float(step), compute_s=compute_s, comm_s=comm_s,
                    comm_bytes=int(kb.sum()),
                    comm_bytes_by_kind={k: int(kb[i]) for i, k in enumerate(KINDS)},
                    peak_memory_bytes=int(round(peak)), **extra)

    def _sliced_all_reduces(self, kb, slots, ut, us, ud, c, tsh):
        """XLA:CPU's reduce-scatter is an all-reduce whose every use slices it (`tag_jax.hlo`
        counts it so): a partial sum all-reduced to a layout that every later use only slices
        1/n further, along one dimension by exactly the reduced axes (directly, or after
        elementwise and shape-only ops that keep its layout, which XLA fuses the slice into), is
        counted as a reduce-scatter of the slice. Physically it is still the all-reduce, so its
        time is unchanged. mlp-real random-18: a weight gradient all-reduced to replicated for a
        replicated transpose, whose uses are all column or row slices: 268 MB all-reduce
        predicted, a 33.5 MB reduce-scatter compiled."""
        ar = _KIND_INDEX["all-reduce"]
        pm = self._partial_mask()
        cand = np.flatnonzero((self._p_kb[slots, ar] > 0) & pm[us])
        if not cand.size:
            return kb
        kb = kb.copy()
        rs = _KIND_INDEX["reduce-scatter"]
        sizes = self.mesh.axes
        cache = self._slice_cache
        vec = np.concatenate([c, tsh])  # what a cached answer was derived from, in one array
        keys = list(zip(ut[cand].tolist(), us[cand].tolist(), ud[cand].tolist()))
        hits = [cache.get(k) for k in keys]
        ok = _still_valid(hits, vec)
        for n, j in enumerate(cand.tolist()):
            ans = hits[n][2] if ok[n] else None
            for comm in self._p_comms[int(slots[j])]:
                if comm.kind != "all-reduce":
                    continue
                if ans is None:
                    ans = self._only_sliced(int(ut[j]), int(us[j]), int(ud[j]), comm.axes, c, tsh)
                if ans:
                    k = math.prod(sizes[a] for a in comm.axes)
                    kb[ar] -= comm.bytes
                    kb[rs] += comm.bytes // k
        return kb

    def _only_sliced(self, t: int, src: int, dst: int, axes, c, tsh) -> bool:
        """Whether every use of partial `t` reduced to `dst` slices it 1/n along one dim by
        `axes` (see `_sliced_all_reduces`). Cached per (t, src, dst) with the choices of the ops
        and the shardings of the tensors the walk read."""
        cache = self._slice_cache
        key = (t, src, dst)
        g, items = self.graph, self._sh["sh"].items
        want_ax = set(axes)
        L0 = items[dst]
        seen_ops, seen_t = [], [t]
        outs = self._out_set

        def is_slice(L: TensorSharding, w: TensorSharding) -> bool:
            # one dim split further by exactly the reduced axes; when they land before L's own
            # axes there (``P(b) -> P((a,b))``) XLA slices 1/n locally and permutes the slice
            if w.partial or len(w.dims) != len(L.dims):
                return False
            diff = [(a, b) for a, b in zip(L.dims, w.dims) if a != b]
            if len(diff) == 1:
                old, new = diff[0]
                if (len(new) == len(old) + len(want_ax) and set(new) == set(old) | want_ax
                        and not set(old) & want_ax):
                    return True
            # or a reshard that starts by slicing exactly the reduced axes off one dim, then moves
            # the slice (``P(model,None) -> P(None,(data,model))`` after a reduction over data:
            # slice dim 1 by data, then the all-to-all over model)
            cuts = leading_slices(L, w)
            return len(cuts) == 1 and set(next(iter(cuts.values()))) == want_ax

        def permuted(L: TensorSharding, op) -> TensorSharding:
            perm = op.eqn.params["permutation"]
            return TensorSharding(tuple(L.dims[p] for p in perm), L.partial)

        budget = [24]

        def walk(u: int, L: TensorSharding, chain: bool) -> bool:
            # u holds the reduced value in layout L (chain: u is still partial in the strategy)
            if u in outs or budget[0] <= 0:
                return False
            cons = g.tensors[u].consumers
            if not cons:
                return False
            for k in cons:
                op = g.ops[k]
                budget[0] -= 1
                seen_ops.append(k)
                st = self.op_strategies[k][c[k]]
                w = st.inputs[list(op.inputs).index(u)]
                if is_slice(L, w):
                    continue
                prim = op.primitive
                # ``x ** 1`` (Adam's first moment, optax `update_moment`) is removed by XLA's
                # algebraic simplifier: the identity, whatever its option says
                unit = prim == "integer_pow" and op.eqn.params.get("y") == 1
                if len(op.outputs) != 1 or op.subgraphs or not (prim in _LAYOUT_ONLY or unit):
                    return False  # elementwise compute reads the reduced value whole
                o = op.outputs[0]
                seen_t.append(o)
                same = (prim in _ELEMENTWISE or unit) and g.tensors[o].shape == g.tensors[u].shape
                replicated = not L.axes
                transpose = prim == "transpose"
                if chain and w.partial:
                    if w != items[int(tsh[u])] or not (same or replicated or transpose):
                        return False
                    oo = items[int(tsh[o])]
                    if not oo.partial:
                        return False
                    Lo = (L if same else permuted(L, op) if transpose
                          else TensorSharding.replicated(len(g.tensors[o].shape)))
                    if not walk(o, Lo, True):
                        return False
                    continue
                if w != L:
                    return False
                oo = items[int(tsh[o])]
                if oo.partial or oo.shards(self.mesh.axes) != L.shards(self.mesh.axes):
                    return False
                if transpose and oo != permuted(L, op):
                    return False
                if not (same or replicated or transpose):
                    return False
                if not walk(o, oo, False):
                    return False
            return True

        ans = bool(not L0.partial and walk(t, L0, True))
        idx = np.concatenate([np.array(seen_ops, np.int64), len(c) + np.array(seen_t, np.int64)])
        cache[key] = (idx, np.concatenate([c, tsh])[idx], ans)
        return ans

    def _wait_at(self) -> np.ndarray:
        """Per op (and n_ops for the end of the step): where the compute stream first waits for a
        reshard that op consumes. A layout-only consumer (transpose, reshape, convert, ...) needs
        no compute worth waiting for, and XLA's scheduler places it, with the collective's end,
        just before what uses its result: so the wait moves to its first non-layout dependent
        (gpt2-small's weight gradients are all-reduced, then transposed, then read by the
        optimizer's update at the end of the backward pass: without this the transposes right
        after each all-reduce held the backward pass up and nothing overlapped)."""
        sh = self._sh
        got = sh.get("wait_at")
        if got is None:
            g, n = self.graph, sh["n_ops"]
            got = np.arange(n + 1, dtype=np.int64)
            outs = set(g.outputs)
            for op in reversed(g.ops):
                if op.primitive not in _LAYOUT_ONLY or op.subgraphs:
                    continue
                later = [got[c] for t in op.outputs for c in g.tensors[t].consumers]
                if any(t in outs for t in op.outputs):
                    later.append(n)
                got[op.id] = min(later) if later else n
            sh["wait_at"] = got
        return got

    def _schedule(self, comp, prod, first, dur, jc_s, starts, ends) -> float:
        """Makespan of one compute stream (program order) and one FIFO communication stream.

        Only reshards make the compute stream wait, so op i ends at
        S_i + max(0, max_{j <= i waiting} (R_j - S_{j-1})), S the prefix sums of compute time and R_j
        the time op j's last reshard is done. Reshards run in order of their source's producer, whose
        end needs only the R_j of earlier ops: one pass over the reshards.
        """
        S = np.cumsum(comp)
        Sprev = (S - comp).tolist()
        Sl = S.tolist()
        n_ops = len(comp)
        fifo = np.lexsort((first, prod)).tolist()
        prod, dur = prod.tolist(), dur.tolist()
        cons, starts, ends = jc_s.tolist(), starts.tolist(), ends.tolist()
        ready = [0.0] * (n_ops + 1)
        waiting = sorted(set(cons))
        nw, ptr, best, free = len(waiting), 0, 0.0, 0.0
        for k in fifo:
            p = prod[k]
            while ptr < nw and waiting[ptr] <= p:
                j = waiting[ptr]
                if ready[j] - Sprev[j] > best:
                    best = ready[j] - Sprev[j]
                ptr += 1
            src_ready = Sl[p] + best if p >= 0 else 0.0
            free = (src_ready if src_ready > free else free) + dur[k]
            for j in cons[starts[k]:ends[k]]:
                if ready[j] < free:
                    ready[j] = free
        while ptr < nw and waiting[ptr] < n_ops:
            j = waiting[ptr]
            best = max(best, ready[j] - Sprev[j])
            ptr += 1
        end = (Sl[-1] if n_ops else 0.0) + best
        return max(end, free)

    def _peak(self, tsh, first, lastc, rbytes, ut=None, c=None) -> float:
        always, start, stop, w, _ = self._intervals(tsh, first, lastc, rbytes, ut, c)
        n = self._sh["n_ops"]
        diff = np.bincount(start, w, minlength=n + 2) - np.bincount(stop, w, minlength=n + 2)
        live = np.cumsum(diff)[:n + 1]
        return always + (float(live.max()) if live.size else 0.0)

    def _intervals(self, tsh, first, lastc, rbytes, ut=None, c=None, ud=None, labels=False):
        """(always, start, stop, bytes, what) of every buffer that is not live for the whole step:
        live over op positions [start, stop). `what` labels each: ("result", tensor), ("reshard",
        tensor, target sharding id) or ("cpu", op) (see `live_at`); None unless `labels`."""
        sh = self._sh
        n = sh["n_ops"]
        local = sh["nbytes"] / self._shards[tsh]
        always = float(local[sh["is_input"] | sh["free"]].sum())
        ot = sh["o_t"]
        # graph results sit in XLA's output allocation for the whole step (memory_analysis counts
        # them apart from the reused temporaries), so they count from the start. A result resharded
        # at the end (carried state going back to its argument's layout, a partial result reduced)
        # is allocated in its FINAL layout: the resharded copy counts from the start, and the value
        # as its op made it is an ordinary temporary (producer to the end), e.g. a ZeRO-style
        # sharded update gathered back into replicated parameters (vit-b16 data parallel: 1.0 GB of
        # replicated params + Adam state in the output allocation, not 0.13 GB of shards)
        o_fused, last, gone = sh["o_fused"], sh["last"], None
        if self.lowering == "xla-cpu":
            o_fused, last, kpos, kt, kc, kp, lpos, upos = self._cpu_fusion()
            if kt.size and c is not None:
                # a value materialised only for consumers that take it as a local slice is made in
                # their layout (resnet-50 Megatron: batch norm's x - mean fused into the slice to
                # the backward's channel split, `subtract_dynamic-slice_fusion`): no buffer of its
                # own. A collective cannot fuse its operand: then the value is a buffer as made.
                wanted = sh["want"][sh["in_base"][kc] + c[kc] * sh["nin"][kc] + kp]
                same = wanted == tsh[kt]
                for k in np.flatnonzero(~same).tolist():
                    same[k] = bool(self.price(int(kt[k]), int(tsh[kt[k]]), int(wanted[k]))[1])
                own = np.zeros(len(ot), bool)
                own[kpos[same]] = True
                gone = np.zeros(len(ot), bool)
                gone[kpos] = True
                gone &= ~own
                if gone.any():
                    o_fused = o_fused | gone
                else:
                    gone = None
        o_start = np.where(sh["o_is_out"], 0, sh["producer"][ot])
        o_stop = np.maximum(last[ot], sh["producer"][ot])
        if gone is not None:  # recomputed at its consumers: what it is made from lives until then
            m = gone[lpos]
            np.maximum.at(o_stop, upos[m], o_stop[lpos[m]])
        r_start = first
        if ut is not None and len(ut):
            end = first == n
            if end.any():
                r_start = np.where(end, 0, first)
                pos = sh["o_pos_of"][ut[end]]
                pos = pos[pos >= 0]
                o_start = o_start.copy()
                o_start[pos] = sh["producer"][ot[pos]]
                o_stop = o_stop.copy()  # gathered into the output buffer once made, then freed
                o_stop[pos] = sh["o_last_use"][pos]
            # XLA:CPU's scheduler issues the reshards of arguments that feed lookups (gather ops,
            # e.g. embedding tables all-gathered for their lookups) together, before the first of
            # those lookups, so all the gathered tables are live at once (recommender-real FSDP:
            # the eight row-split tables all-gathered one after another, 8.9 GB live together,
            # where just-in-time copies would hold one table at a time). Other reshards stay
            # just in time.
            arg = sh["is_input"][ut] & self._gather_ops()[np.minimum(first, n)]
            if self.lowering == "xla-cpu" and arg.sum() > 1:
                r_start = np.where(arg, first[arg].min(), r_start)
        start = np.concatenate([o_start, r_start])
        stop = np.concatenate([o_stop, lastc]) + 1
        w = np.concatenate([np.where(o_fused, 0.0, local[ot]), rbytes])
        what = [("result", t) for t in ot.tolist()] if labels else None
        if labels and ut is not None:
            what += [("reshard", t, d) for t, d in zip(ut.tolist(), (ud if ud is not None else
                                                                    np.full(len(ut), -1)).tolist())]
        if self.lowering == "xla-cpu" and c is not None:
            ops, per_row = self._cpu_temps()
            if ops.size:  # live while their op runs
                tb = per_row[self._sh["row_base"][ops] + c[ops]]
                start = np.concatenate([start, ops])
                stop = np.concatenate([stop, ops + 1])
                w = np.concatenate([w, tb])
                if labels:
                    what += [("cpu", i) for i in ops.tolist()]
        return always, start, stop, w, what

    def live_at(self, strategy: Strategy, at: int | None = None) -> dict:
        """Debugging aid: what the memory model has live at op position `at` (default: its peak).
        Returns {"at", "peak", "always" (inputs and constants), "live": [(bytes, what, start,
        stop)] largest first}, `what` as in `_intervals` (results count from 0 when they sit in
        the output allocation)."""
        sh = self._sh
        c, tsh = self._shardings(strategy)
        _, _, _, ut, us, ud, first, lastc, slots = self._grouped_jobs(c, tsh)
        rbytes = self._p_rbytes[slots]
        always, start, stop, w, what = self._intervals(tsh, first, lastc, rbytes, ut, c, ud,
                                                        labels=True)
        n = sh["n_ops"]
        diff = np.bincount(start, w, minlength=n + 2) - np.bincount(stop, w, minlength=n + 2)
        live = np.cumsum(diff)[:n + 1]
        if at is None:
            at = int(live.argmax()) if live.size else 0
        on = np.flatnonzero((start <= at) & (at < stop) & (w > 0))
        rows = sorted(((float(w[k]), what[k], int(start[k]), int(stop[k])) for k in on.tolist()),
                      key=lambda r: -r[0])
        return {"at": at, "peak": always + float(live[at]), "always": always, "live": rows}

    def _cpu_fusion(self) -> tuple:
        """Under XLA:CPU's fusion of reductions (`_fused` with `lowering="xla-cpu"`), once per
        graph: (per op result: fused away, per tensor: last use, and for every consumer that reads
        a value materialised for reductions: the value's position among op results, the value,
        the consumer op, the operand position)."""
        sh = self._sh
        got = sh.get("cpu_fusion")
        if got is None:
            g = self.graph
            out_set = set(g.outputs)
            last = _last_uses(g, out_set)
            kept: list = []
            fused = _fused(g, last, out_set, lowering="xla-cpu", kept=kept)
            kt, kc, kp = (np.array(x, np.int64).reshape(-1) for x in zip(*kept)) if kept else (
                np.zeros(0, np.int64),) * 3
            # the buffers such a value is computed from (through values fused away), which must
            # live until its last consumer when it is recomputed there instead (see `_intervals`)
            lt, lu = [], []
            for t in sorted(set(kt.tolist())):
                todo, seen = list(g.ops[g.tensors[t].producer].inputs), set()
                while todo:
                    u = todo.pop()
                    if u in seen:
                        continue
                    seen.add(u)
                    if fused[u]:
                        todo.extend(g.ops[g.tensors[u].producer].inputs)
                    elif sh["o_pos_of"][u] >= 0:
                        lt.append(t), lu.append(u)
            lt, lu = np.array(lt, np.int64), np.array(lu, np.int64)
            got = sh["cpu_fusion"] = (fused[sh["o_t"]], last, sh["o_pos_of"][kt], kt, kc, kp,
                                      sh["o_pos_of"][lt], sh["o_pos_of"][lu])
        return got

    def _cpu_temps(self) -> tuple[np.ndarray, np.ndarray]:
        """(ops, per (op, option) row: bytes) of the scratch buffers XLA:CPU's lowering of an op
        allocates for the op's duration (`lowering="xla-cpu"`), per device in the option's layouts.
        Read from XLA:CPU's buffer assignment (`--xla_dump_to`, resnet-50):

        - a convolution whose operand or result is not in the layout the CPU kernel takes (input
          batch-major NHWC, kernel HWIO, output NHWC) gets a transposed copy of it: a weight-
          gradient convolution (the activation and the output gradient with batch and feature
          swapped) copies both operands, e.g. f32[56,56,8,256] and f32[256,56,56,8] per device;
        - max-pool's backward (`select_and_scatter_add`) keeps three s32 index buffers and an f32
          copy of its padded operand, each the size of the padded operand.
        """
        got = getattr(self, "_cpu_temp_arrays", None)
        if got is not None:
            return got
        g, sh, sizes = self.graph, self._sh, self.mesh.axes
        canon = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
        ops, per_row = [], np.zeros(len(sh["row_op"]))
        for i, op in enumerate(g.ops):
            if op.primitive not in ("conv_general_dilated", "select_and_scatter_add"):
                continue
            base = int(sh["row_base"][i])
            for k, st in enumerate(self.op_strategies[i]):
                b = 0.0
                if op.primitive == "conv_general_dilated":
                    dn = op.eqn.params.get("dimension_numbers")
                    specs = (dn.lhs_spec, dn.rhs_spec, dn.out_spec) if dn is not None else canon
                    pairs = [(op.inputs[0], st.inputs[0]), (op.inputs[1], st.inputs[1]),
                             (op.outputs[0], st.outputs[0])]
                    for (t, ts), spec, want in zip(pairs, specs, canon):
                        if tuple(spec) != want and len(ts.dims) == 4:
                            b += g.tensors[t].nbytes / max(1, ts.shards(sizes))
                else:
                    t, ts = op.inputs[1], st.inputs[1]
                    pad = op.eqn.params.get("padding") or ((0, 0),) * len(ts.dims)
                    padded = tuple(n + lo + hi for n, (lo, hi) in zip(g.tensors[t].shape, pad))
                    elems = math.prod(-(-n // math.prod(sizes[a] for a in d)) if d else n
                                      for n, d in zip(padded, ts.dims))
                    b += 4 * elems * 4  # 3 s32 index buffers + 1 f32 padded copy
                per_row[base + k] = b
            ops.append(i)
        self._cpu_temp_arrays = (np.array(ops, np.int64), per_row)
        return self._cpu_temp_arrays

    # ---- incremental ----------------------------------------------------------------------------
    def incremental(self, strategy: Strategy):
        """A `tag_jax.cost.incremental.Incremental` for cheap search moves from `strategy`."""
        from tag_jax.cost.incremental import Incremental
        return Incremental(self, strategy)


# XLA's loop fusion (see `_fused`): elementwise producers, shape-only ops, and the consumers they fuse into
_FUSE_INTO = frozenset(ELEMENTWISE) | {"broadcast_in_dim", "reshape", "squeeze", "expand_dims",
                                       "reduce_sum", "reduce_max", "reduce_min", "reduce_prod",
                                       "argmax", "argmin"}
_ELEMENTWISE = frozenset(ELEMENTWISE)
_FUSE_FROM = frozenset(ELEMENTWISE) | {"broadcast_in_dim", "reshape", "squeeze", "expand_dims", "iota"}
# ops XLA lowers to a bitcast/copy/transpose of their operand (`tag_jax.hlo` follows an all-reduce's
# uses through those to the slices that make it a reduce-scatter)
_LAYOUT_ONLY = frozenset({"transpose", "reshape", "squeeze", "expand_dims", "copy", "copy_p"})
# ops that cannot make a partial sum of non-partial operands (no contraction or reduction): a
# partial result of one with no partial operand is a local select of its inputs, which the program
# never makes (GSPMD has no partial sharding; the op runs on the full values). mlp-real random-12:
# a replicated weight gradient transposed "as a select" R -> R+partial, then reduced: 268 MB of
# all-reduce predicted, none compiled (was: only elementwise and reshape-like ops)
_SELECT_ONLY = _FUSE_FROM | {"transpose", "concatenate", "pad", "slice", "rev", "split", "stack",
                             "unstack", "dynamic_slice", "dynamic_update_slice", "copy", "copy_p"}
# ops that update their first operand in place: a broadcast (e.g. the zeros a gather's transpose
# scatter-adds into) is materialised as their output buffer, in the output's sharding, not apart
_IN_PLACE = frozenset({"scatter-add", "scatter_add", "scatter", "dynamic_update_slice"})
# ops XLA's fusion pass treats as expensive: not duplicated into several consumers
_EXPENSIVE = frozenset({"exp", "exp2", "expm1", "log", "log1p", "div", "rem", "pow", "sqrt", "rsqrt",
                        "cbrt", "tanh", "logistic", "erf", "erf_inv", "erfc", "sin", "cos", "tan",
                        "atan2", "lgamma", "digamma", "igamma", "igammac", "acos", "asin", "atan",
                        "acosh", "asinh", "atanh", "cosh", "sinh", "bessel_i0e", "bessel_i1e",
                        "polygamma", "zeta", "random_gamma_grad", "regularized_incomplete_beta",
                        "threefry2x32", "nextafter", "igamma_grad_a"})


# ops that only move or re-type data: a consumer of a reshard among these is not waited for
# (`Simulator._wait_at`)
_LAYOUT_ONLY = frozenset({"transpose", "reshape", "squeeze", "expand_dims", "broadcast_in_dim",
                          "convert_element_type", "copy", "copy_p"})
_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin"})
_SHAPE_ONLY = frozenset({"broadcast_in_dim", "reshape", "squeeze", "expand_dims"})
# XLA:CPU (`lowering="xla-cpu"`): a reduction is one YNNPACK fusion whose operand may be computed
# inside it by at most one multiply/maximum of materialised values (broadcasts and reshapes of
# them fuse too); `neg` is moved past the reduction by the algebraic simplifier. Anything else
# feeding a reduction (a subtract, select, add, exp...) is materialised (see `_fused`).
_CPU_REDUCE_PROLOGUE = frozenset({"mul", "max", "square"})
_CPU_REDUCE_TRANSPARENT = frozenset({"neg", "convert_element_type"}) | _SHAPE_ONLY
_LOOP, _REDUCE_IN, _PROLOGUE = 0, 1, 2  # where a fused value sits in the fusion that absorbs it


def _merged(wants: Sequence[TensorSharding]) -> TensorSharding:
    """The first sharding, each dimension extended by the later ones that extend it (in order),
    with mesh axes not used yet (see `Simulator._merge_targets`)."""
    cur = [list(d) for d in wants[0].dims]
    for w in wants[1:]:
        used = {a for d in cur for a in d}
        for i, d in enumerate(w.dims):
            if len(d) > len(cur[i]) and list(d[:len(cur[i])]) == cur[i]:
                for a in d[len(cur[i]):]:
                    if a in used:
                        break
                    cur[i].append(a)
                    used.add(a)
    return TensorSharding(tuple(tuple(d) for d in cur))


def _true_rank(shape) -> int:
    return sum(1 for d in shape if d > 1)


def _effectively_unary(g: OpGraph, op) -> bool:
    """XLA's `InstructionFusion::EffectivelyAtMostUnary`: at most one operand as large as the result
    (of at least its true rank, dims of size 1 not counted); broadcasts, iotas and scalars do not
    count. Only such a producer is duplicated into some consumers while others read it as a buffer;
    any other producer that cannot fuse into all its consumers is fused into none of them."""
    rank = _true_rank(g.tensors[op.outputs[0]].shape)
    big = 0
    for u in op.inputs:
        p = g.tensors[u].producer
        if p is not None and g.ops[p].primitive in ("broadcast_in_dim", "iota"):
            continue
        big += _true_rank(g.tensors[u].shape) >= rank and rank > 0
    return big <= 1


def _erfc_exps(g: OpGraph) -> set:
    """Results of ``exp(neg(square(x)))`` for an x that also feeds an ``erfc`` (the derivative of
    erfc, e.g. in exact GELU's backward). XLA expands an f32 erfc into a formula that computes
    exp(-x*x) itself, and CSE merges the two: one exp with users in the forward (erfc) and the
    backward, expensive, so never duplicated: a buffer from the erfc to its last use (vit-b16
    Megatron: `negate_exponential_fusion`, op_name `erfc`, f32[32,197,768] per layer)."""
    erfc_in = {op.inputs[0] for op in g.ops if op.primitive == "erfc" and op.inputs}
    out = set()
    for op in g.ops:
        if op.primitive != "exp" or len(op.outputs) != 1:
            continue
        p = g.tensors[op.inputs[0]].producer
        if p is None or g.ops[p].primitive != "neg":
            continue
        q = g.tensors[g.ops[p].inputs[0]].producer
        if q is None:
            continue
        sq = g.ops[q]
        x = (sq.inputs[0] if sq.primitive == "square" else sq.inputs[0]
             if sq.primitive == "mul" and len(set(sq.inputs)) == 1 else None)
        if x is not None and x in erfc_in:
            out.add(op.outputs[0])
    return out


def _fused(g: OpGraph, last: np.ndarray, out_set: set, lowering: str | None = None,
           kept: list | None = None) -> np.ndarray:
    """Which op results XLA never materialises (it fuses their producer into every consumer), as a
    tensor mask; `last` (last use per tensor) is extended in place for the producers' operands,
    which must then live until the fused consumers run.

    Modelled on XLA's instruction fusion: an elementwise or shape-only op (broadcast, reshape) whose
    consumers are all elementwise ops, shape-only ops or reductions is fused into them; with several
    distinct consumers only when it is cheap (XLA duplicates cheap ops, not exp/log/div/...). A
    broadcast feeding in-place updates (scatter-add, dynamic_update_slice) is their output buffer.
    Graph results are always materialised. Without this an elementwise chain over (batch, seq,
    vocab) logits counts one logits-sized buffer per op, and gpt2's peak is over-predicted by ~25%.

    With `lowering="xla-cpu"`, XLA:CPU's reductions (YNNPACK fusions) take less: the reduced value
    may be one multiply/maximum (`_CPU_REDUCE_PROLOGUE`) of materialised operands, which only
    broadcasts/reshapes can fuse into; any other elementwise op feeding a reduction, directly or
    into that multiply, is materialised. Read from the resnet-50 FSDP buffer assignment: batch
    norm's ``x - mean`` (``sub``), used by the forward normalisation and by the backward's
    ``reduce_sum(dy * (x - mean))``, is a fusion of its own (``broadcast_subtract_fusion``) made
    in the forward and live until the backward (53 of them, 336 MB at XLA's peak), where the
    default rule fuses it away and keeps only the convolution output. Every reduction prologue
    in the compiled resnet/gpt2/vit/moe/t5 programs is nothing, a multiply, or a dot. What its
    other consumers do follows XLA's duplication test (`_effectively_unary`): a value with at most
    one large operand (``x - mean``: the mean is broadcast) is still recomputed inside the fusions
    of its other consumers (the resnet ``x - mean`` is both a buffer and recomputed in the ReLU's
    fusion), so its operands live as long as those, and the buffer until its last reduction; a
    value with two large operands (a residual sum ``x + f(x)`` that LayerNorm's mean reduces) is
    fused into none: every consumer reads the one buffer, which lives until the last of them
    (vit-b16 Megatron: `add_add_fusion` per residual, read by the backward's LayerNorm fusions,
    not recomputed there). An ``exp(-x²)`` beside an ``erfc(x)`` is a buffer (`_erfc_exps`).
    `kept`, if given, gets (tensor, consumer op, operand position) of every consumer that reads
    such a buffer.
    """
    fused = np.zeros(len(g.tensors), bool)
    cpu = lowering == "xla-cpu"
    slot = np.zeros(len(g.tensors), np.int8)  # for fused tensors (xla-cpu): _LOOP/_REDUCE_IN/_PROLOGUE
    # (xla-cpu) how long a value is needed where later fusions recompute a consumer of it from it
    ext = np.full(len(g.tensors), -1, np.int64)
    shared_exp = _erfc_exps(g) if cpu else set()
    for op in reversed(g.ops):
        if op.primitive not in _FUSE_FROM or len(op.outputs) != 1 or op.subgraphs:
            continue
        t = op.outputs[0]
        cons = set(g.tensors[t].consumers)
        into = _FUSE_INTO | _IN_PLACE if op.primitive == "broadcast_in_dim" else _FUSE_INTO
        if (t in out_set or not cons or any(g.ops[c].primitive not in into for c in cons)
                or (len(cons) > 1 and op.primitive in _EXPENSIVE) or t in shared_exp):
            continue
        if cpu:
            mine, absorbed, keep, reads = _LOOP, -1, -1, []
            for c in cons:
                out_c = g.ops[c].outputs[0] if len(g.ops[c].outputs) == 1 else None
                end = int(last[out_c]) if out_c is not None and fused[out_c] else c
                if g.ops[c].primitive in _REDUCTIONS:
                    at = _REDUCE_IN
                else:
                    at = int(slot[out_c]) if out_c is not None and fused[out_c] else _LOOP
                if at == _REDUCE_IN and op.primitive in _CPU_REDUCE_PROLOGUE:
                    at = _PROLOGUE
                elif ((at == _REDUCE_IN and op.primitive not in _CPU_REDUCE_TRANSPARENT)
                      or (at == _PROLOGUE and op.primitive not in _SHAPE_ONLY)):
                    keep = max(keep, end)  # this consumer reads a materialised copy
                    reads.append(c)
                    continue
                absorbed = max(absorbed, end)
                mine = max(mine, at)
            if keep >= 0 and absorbed >= 0 and not _effectively_unary(g, op):
                # not duplicated: every consumer reads the buffer, which lives until the last
                last[t] = max(keep, absorbed, int(ext[t]))
                reads = sorted(cons)
            if kept is not None:
                kept.extend((t, c, p) for c in reads for p, u in enumerate(g.ops[c].inputs)
                            if u == t)
            if absorbed < 0 or len(reads) == len(cons):
                continue
            if keep >= 0:  # materialised for the reductions, recomputed inside the other fusions
                last[t] = max(keep, int(ext[t]))
            else:
                slot[t] = mine
                fused[t] = True
                absorbed = max(absorbed, int(ext[t]))  # recomputed where its consumers are
            for u in op.inputs:
                last[u] = max(last[u], absorbed)
                ext[u] = max(ext[u], absorbed)
            continue
        fused[t] = True
        for u in op.inputs:
            last[u] = max(last[u], last[t])
    return fused


def _positions(o_t: np.ndarray, n_t: int) -> np.ndarray:
    """tensor id -> its position in `o_t` (op results), -1 for tensors no op makes."""
    pos = np.full(n_t + 1, -1, np.int64)
    pos[o_t] = np.arange(len(o_t))
    return pos


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} "


def _still_valid(hits: list, vec: np.ndarray) -> np.ndarray:
    """Which cached answers still hold: a hit is (positions in `vec` it was derived from, the
    values they had, answer); it holds where all those positions still have those values."""
    ok = np.zeros(len(hits), bool)
    have = [n for n, h in enumerate(hits) if h is not None]
    if have:
        idx = np.concatenate([hits[n][0] for n in have])
        vals = np.concatenate([hits[n][1] for n in have])
        lens = np.array([len(hits[n][0]) for n in have], np.int64)
        same = np.logical_and.reduceat(vec[idx] == vals, np.r_[0, np.cumsum(lens)[:-1]])
        ok[np.array(have, np.int64)[same]] = True
    return ok


_MATMULS = ("dot_general", "conv_general_dilated")
_FULL_FP32 = ("highest", "float32", "f32_f32_f32")


def _default_precision_matmul(op) -> bool:
    """A dot/conv that JAX runs at its default precision (so TF32 / one bf16 pass where the device
    has it): neither the op nor `jax_default_matmul_precision` asks for full float32."""
    if op.primitive not in _MATMULS:
        return False
    import jax

    names = [str(p).lower().split(".")[-1] for p in _as_tuple(op.params.get("precision"))]
    names.append(str(jax.config.jax_default_matmul_precision or "").lower())
    return not any(n in _FULL_FP32 for n in names)


def _as_tuple(x) -> tuple:
    return () if x is None else tuple(x) if isinstance(x, (tuple, list)) else (x,)
