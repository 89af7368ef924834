"""The joint graph the policy reads: op groups, devices, and the edges that join them (TAG's input).

Op-group nodes are the annealer's decision units (`search.anneal.param_groups`, one per weight
shared across repeated layers, plus one node for the batch). Every op of the program is charged to
one of them: to the group whose tensors it reads directly, else to the group of its largest
labelled input, else to the batch node; so a group's FLOPs and bytes are those of the layer it
parameterises, forward, backward and update. Devices are the mesh's devices.

Op-class nodes (schema 2) are the second stage's decision units (`search.anneal.op_classes`: the
same op in every repeated layer), each with its sharding options (`rules`): the policy scores them
too, so its plan fixes every op's option and not only the arguments' shardings. They are joined to
each other by the tensors between them and to the group that owns them (`assign_ops`). An op
option's features: replicated or not, how far it divides the work and the output, which axes,
partial sums, its compute and output-transfer times, and whether data parallel's propagated plan
picks it (one `propagate` per mesh, in `context`).

Edges (both directions where it says so): op->op (tensor bytes between groups, forward and
backward types), device<->device (bandwidth, latency, same machine), op<->device (the group's
compute time on that device: what joins the two graphs), class<->class (tensor bytes between op
classes), class<->group (a class and the group that owns it). As in TAG, times are divided by the L2
norm of the op-device compute-time matrix and bytes become times on the fastest link, so features
are unit free. Each op node also carries its options (the action set, padded to MAX_OPTIONS and
masked) and the mesh is described by the graph's globals; the network scores both.

Pure numpy; `pad` batches and pads to power-of-two buckets so a jitted network compiles once per
bucket, not once per graph.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jraph
import numpy as np

from tag_jax.hlo.graph import OpGraph, Role

SCHEMA_VERSION = "tag_jax-policy-features-3"
MAX_OPTIONS = 32
NODE_FEATURES = 26
OPTION_FEATURES = 13
EDGE_FEATURES = 4
GLOBAL_FEATURES = 9
RANK_KINDS = ("data_parallel", "fsdp", "megatron", "replicated")  # the seeds the ranking orders
MAX_CANDIDATES = 32
CANDIDATE_FEATURES = 17
EDGE_TYPES = ("op->op", "op<-op", "dev-dev", "op->dev", "dev->op", "cls->cls", "cls<-cls",
              "cls->op", "op->cls")
OP, BATCH, DEVICE, CLASS = 0, 1, 2, 3  # node types (padding nodes are zero rows with type 0 and no options)

_EFF, _MEM_EFF = 0.5, 0.8  # as the simulator's defaults: only ratios matter after normalising


def _lg(x) -> np.ndarray:
    """log10 squashed to about [0, 1] over [1e-6, 1]: normalised quantities span many decades."""
    return np.clip(np.log10(np.asarray(x, np.float64) + 1e-6) / 6.0 + 1.0, -1.0, 2.0)


@dataclasses.dataclass(frozen=True)
class Context:
    """What the features of one (graph, topology, mesh) need from the search: its decision units."""

    groups: tuple  # search.anneal.Group
    batch_sets: tuple  # axis sets for the batch dimension
    op_strategies: tuple = ()  # rules.for_graph(graph, mesh.axes)
    classes: tuple = ()  # search.anneal.op_classes: op ids sharing one option
    dp_choices: tuple = ()  # every op's option propagated from data parallel's arguments


def input_shardings(graph: OpGraph, groups, batch_sets, decision) -> tuple[tuple, tuple]:
    """(storage, compute) sharding of every graph input under a decision vector (the annealer's)."""
    from tag_jax.search.anneal import decision_shardings

    return decision_shardings(graph, groups, batch_sets, decision)


def propagated(graph: OpGraph, op_strategies, mesh, groups, batch_sets, decision,
               prefer=None) -> tuple[int, ...]:
    """Every op's option as the annealer's `evaluate` picks it for a decision vector (`prefer`, a
    bonus in bytes per (op, option), as `search.propagate.propagate` takes it)."""
    from tag_jax.search.propagate import carried_outputs, propagate

    storage, compute = input_shardings(graph, groups, batch_sets, decision)
    by_input = dict(zip(graph.inputs, storage))
    wanted = {out: by_input[src] for out, src in carried_outputs(graph).items()}
    return tuple(propagate(graph, op_strategies, mesh, compute, outputs=wanted, prefer=prefer))


def default_decision(ctx: "Context") -> list[int]:
    """Data parallel: weights replicated, the batch over every axis that divides it."""
    return [0] * len(ctx.groups) + [len(ctx.batch_sets) - 1]


def context(graph: OpGraph, mesh, op_strategies=None) -> Context:
    from tag_jax import rules
    from tag_jax.search.anneal import batch_options, op_classes, param_groups

    ops = tuple(op_strategies if op_strategies is not None else rules.for_graph(graph, mesh.axes))
    groups, batch_sets = param_groups(graph, mesh), batch_options(graph, mesh)
    ctx = Context(groups, batch_sets, ops, op_classes(graph, ops))
    dp = propagated(graph, ops, mesh, groups, batch_sets, default_decision(ctx))
    return dataclasses.replace(ctx, dp_choices=dp)


def assign_ops(graph: OpGraph, groups: Sequence) -> np.ndarray:
    """Node index (0..len(groups), the last being the batch node) of every op."""
    batch = len(groups)
    label: dict[int, int] = {}
    direct: dict[int, int] = {}
    for k, g in enumerate(groups):
        for t in g.tensors:
            direct[t] = label[t] = k
    for tid in graph.inputs:
        label.setdefault(tid, batch)
    out = np.full(len(graph.ops), batch, np.int64)
    for op in graph.ops:
        hit = [direct[t] for t in op.inputs if t in direct]
        if hit:
            k = hit[0]
        else:
            known = [(graph.tensors[t].nbytes, label[t]) for t in op.inputs if t in label]
            k = max(known)[1] if known else batch
        out[op.id] = k
        for t in op.outputs:
            label[t] = k
    return out


def _ring_bw(topology, mesh, axes: tuple[str, ...]) -> float:
    """Slowest ring bandwidth over the device groups that vary along `axes` (0 for no axes)."""
    if not axes:
        return 0.0
    ids = np.asarray(mesh.device_ids).reshape(mesh.shape)
    names = list(mesh.axis_names)
    keep = [names.index(a) for a in axes]
    rest = [i for i in range(len(names)) if i not in keep]
    groups = np.transpose(ids, rest + keep).reshape(-1, math.prod(mesh.shape[i] for i in keep))
    return min(topology.ring_bandwidth(tuple(int(x) for x in g)) for g in groups)


def _option_row(dim, axes, gather, shape, mesh, bw, nbytes, T, max_bw, min_mem, is_batch):
    n = max(mesh.size, 2)
    k = math.prod(mesh.axes[a] for a in axes) if axes else 1
    row = np.zeros(OPTION_FEATURES)
    row[0] = dim is None or not axes
    row[1] = gather
    row[2] = 1.0 / k
    row[3] = math.log2(k) / math.log2(n)
    if dim is not None and axes and shape:
        row[4] = dim == 0
        row[5] = dim == len(shape) - 1
        row[6] = shape[dim] / max(shape)
    row[7] = bw / max_bw
    row[8] = _lg(nbytes / k / min_mem)
    row[9] = "model" in axes
    row[10] = "data" in axes
    row[11] = _lg(nbytes * (k - 1) / k / max(bw, 1.0) / T) if gather and axes else 0.0
    row[12] = is_batch
    return row


_KINDS = {"dot_general": 0, "conv_general_dilated": 0}


def _kind(primitive: str) -> int:
    """0 contraction, 1 elementwise, 2 reduction, 3 data movement (reshape, transpose, gather...)."""
    if primitive in _KINDS:
        return 0
    if primitive.startswith("reduce") or primitive in ("argmax", "argmin", "cumsum"):
        return 2
    if primitive in ("reshape", "transpose", "broadcast_in_dim", "gather", "scatter-add", "scatter",
                     "slice", "dynamic_slice", "dynamic_update_slice", "concatenate", "pad",
                     "squeeze", "expand_dims", "rev", "select_and_scatter_add", "iota"):
        return 3
    return 1


def _op_option_row(j, s, is_dp, mesh, t_c, out_bytes, T, max_bw, ring_bw, out_shape):
    """Features of one op option (an OpStrategy) of an op class."""
    n = max(mesh.size, 2)
    axes = s.split_axes
    k = math.prod(mesh.axes[a] for a in axes) if axes else 1
    out = s.outputs[0] if s.outputs else None
    k_out = math.prod(mesh.axes[a] for a in out.axes) if out is not None and out.axes else 1
    row = np.zeros(OPTION_FEATURES)
    row[0] = j == 0
    row[1] = 1.0 / k
    row[2] = math.log2(k) / math.log2(n)
    row[3] = bool(out is not None and out.partial)
    row[4] = 1.0 / k_out
    row[5] = "model" in axes
    row[6] = "data" in axes
    row[7] = is_dp  # data parallel's choice for the op
    row[8] = _lg(t_c / k)
    row[9] = _lg(out_bytes / k_out / max_bw / T)
    row[10] = bool(out is not None and out.dims and out.dims[0])
    row[11] = ring_bw(tuple(axes)) / max_bw if axes else 0.0
    row[12] = bool(out is not None and out.dims and out.dims[-1]) and len(out_shape) > 1
    return row


def op_times(graph: OpGraph, devs) -> np.ndarray:
    """[ops, devices] compute time of every op on each device (roofline, 16-bit rate for 16-bit
    outputs; float32 dots and convolutions at the device's default-precision matmul rate, as the
    simulator)."""
    flops = np.array([op.flops for op in graph.ops], np.float64)
    nbytes = np.array([op.bytes for op in graph.ops], np.float64)
    half = np.array([bool(op.outputs) and graph.tensors[op.outputs[0]].dtype.itemsize <= 2
                     for op in graph.ops])
    mm = np.array([op.primitive in ("dot_general", "conv_general_dilated") for op in graph.ops])
    rate = np.where(half[:, None], [d.flops for d in devs],
                    np.where(mm[:, None], [d.matmul_flops_fp32 for d in devs],
                             [d.flops_fp32 for d in devs])) * _EFF
    return np.maximum(flops[:, None] / rate,
                      nbytes[:, None] / (np.array([d.memory_bandwidth for d in devs]) * _MEM_EFF))


def build(graph: OpGraph, topology, mesh, ctx: Context, decision: Sequence[int] | None = None,
          labels: Sequence[int] | None = None,
          op_labels: Sequence[int] | None = None,
          candidates: np.ndarray | None = None,
          candidate_best: Sequence[float] | None = None) -> jraph.GraphsTuple:
    """One unpadded GraphsTuple (numpy) for `graph` on `mesh`; `decision` is the current choice
    (default: replicated weights, batch over every axis, i.e. data parallel), `labels` the teacher's
    decision vector and `op_labels` its option for every op class (stored in nodes["label"], not
    read by the network). Nodes: groups, the batch, op classes, devices (in that order).
    `candidates` (`candidate_rows`, for all the problem's meshes; one graph of a problem carries
    them) are the seeds the ranking head scores, `candidate_best` its target (1 for the best)."""
    groups, G = ctx.groups, len(ctx.groups)
    classes, C = ctx.classes, len(ctx.classes)
    decision = list(decision) if decision is not None else default_decision(ctx)
    devs = [topology.device(i) for i in mesh.device_ids]
    D = len(devs)
    F0 = G + 1 + C  # first device node
    owner = assign_ops(graph, groups)

    flops = np.array([op.flops for op in graph.ops], np.float64)
    nbytes = np.array([op.bytes for op in graph.ops], np.float64)
    t_op = op_times(graph, devs)
    t_gd = np.zeros((G + 1, D))
    np.add.at(t_gd, owner, t_op)
    T = float(np.linalg.norm(t_gd)) or 1.0
    bwm = topology.bandwidth_matrix()
    pos = {i: k for k, i in enumerate(topology.ids)}
    sub = bwm[np.ix_([pos[i] for i in mesh.device_ids], [pos[i] for i in mesh.device_ids])]
    max_bw = float(sub.max()) if D > 1 else 1e12
    min_mem = min(d.memory for d in devs)
    max_mbw = max(d.memory_bandwidth for d in devs)

    # ---- op-group nodes -----------------------------------------------------------------------
    role_of = np.zeros(len(graph.ops), np.int64)  # 0 forward, 1 backward, 2 update
    for op in graph.ops:
        r = graph.tensors[op.outputs[0]].role if op.outputs else Role.ACTIVATION
        role_of[op.id] = 1 if r == Role.GRADIENT else 2 if r in (Role.UPDATE, Role.OUTPUT) else 0
    mix = np.zeros((G + 1, 3))
    np.add.at(mix, (owner, role_of), flops + 1.0)
    mix /= mix.sum(1, keepdims=True)
    g_bytes = np.zeros(G + 1)
    np.add.at(g_bytes, owner, nbytes)
    N = F0 + D
    x = np.zeros((N, NODE_FEATURES))
    opt = np.zeros((N, MAX_OPTIONS, OPTION_FEATURES))
    mask = np.zeros((N, MAX_OPTIONS), bool)
    bw_of = {}
    for axes in {o.axes for g in groups for o in g.options} | set(ctx.batch_sets):
        bw_of[axes] = _ring_bw(topology, mesh, axes)
    batch_bytes = float(sum(graph.tensors[t].nbytes for t in graph.inputs
                            if graph.tensors[t].role == Role.BATCH))
    for k in range(G + 1):
        is_batch = k == G
        if is_batch:
            shape, pbytes, count = (), batch_bytes, 1
            rows = [_option_row(0, s, False, (), mesh, bw_of[s], pbytes, T, max_bw, min_mem, True)
                    for s in ctx.batch_sets]
            cur = ctx.batch_sets[decision[-1]]
            cur_row = (not cur, 1.0 / max(1, math.prod(mesh.axes[a] for a in cur)), 0.0)
        else:
            g = groups[k]
            shape = g.shape
            pbytes = float(sum(graph.tensors[t].nbytes for t in g.tensors))
            count = len(g.tensors)
            rows = [_option_row(o.dim, o.axes, o.gather, shape, mesh, bw_of[o.axes], pbytes, T,
                                max_bw, min_mem, False) for o in g.options]
            o = g.options[decision[k]]
            cur_row = (o.dim is None, 1.0 / max(1, math.prod(mesh.axes[a] for a in o.axes)), float(o.gather))
        rows = rows[:MAX_OPTIONS]
        opt[k, :len(rows)] = rows
        mask[k, :len(rows)] = True
        fastest = t_gd[k].min() / T
        x[k, 0] = fastest
        x[k, 1] = _lg(fastest)
        x[k, 2] = _lg(g_bytes[k] / (max_mbw * _MEM_EFF) / T)
        x[k, 3] = _lg(pbytes / min_mem)
        x[k, 4] = _lg(pbytes / max_bw / T)
        x[k, 5:8] = mix[k]
        x[k, 8] = len(shape) / 4
        x[k, 9] = min(count, 64) / 16
        x[k, 10:13] = cur_row
    # ---- op-class nodes -----------------------------------------------------------------------
    def ring_bw(axes):
        key = tuple(sorted(axes))
        if key not in bw_of:
            bw_of[key] = _ring_bw(topology, mesh, key)
        return bw_of[key]

    class_of = np.full(len(graph.ops), -1, np.int64)
    fastest_op = t_op.min(1)
    for c, members in enumerate(classes):
        r = G + 1 + c
        class_of[list(members)] = c
        lead = graph.ops[members[0]]
        options = ctx.op_strategies[lead.id]
        t_c = float(fastest_op[list(members)].sum()) / T
        out_bytes = float(sum(graph.tensors[t].nbytes for t in lead.outputs)) * len(members)
        in_bytes = float(sum(graph.tensors[t].nbytes for t in lead.inputs)) * len(members)
        x[r, 0] = t_c
        x[r, 1] = _lg(t_c)
        x[r, 2] = _lg(float(nbytes[list(members)].sum()) / (max_mbw * _MEM_EFF) / T)
        x[r, 4] = _lg(out_bytes / max_bw / T)
        x[r, 5 + role_of[lead.id]] = 1.0
        x[r, 8] = (len(graph.tensors[lead.outputs[0]].shape) if lead.outputs else 0) / 4
        x[r, 9] = min(len(members), 64) / 16
        x[r, 20] = min(len(options), MAX_OPTIONS) / MAX_OPTIONS
        x[r, 21] = _lg(in_bytes / max_bw / T)
        x[r, 22 + _kind(lead.primitive)] = 1.0
        dp = ctx.dp_choices[lead.id] if ctx.dp_choices else -1
        for j, s in enumerate(options[:MAX_OPTIONS]):
            opt[r, j] = _op_option_row(j, s, j == dp, mesh, t_c, out_bytes, T, max_bw, ring_bw,
                                       graph.tensors[lead.outputs[0]].shape if lead.outputs else ())
        mask[r, :min(len(options), MAX_OPTIONS)] = True
    # ---- device nodes -------------------------------------------------------------------------
    node_size = {}
    for d in devs:
        node_size[d.node] = node_size.get(d.node, 0) + 1
    max_fl = max(d.flops for d in devs)
    max_m = max(d.memory for d in devs)
    for j, d in enumerate(devs):
        r = F0 + j
        x[r, 13] = d.flops / max_fl
        x[r, 14] = d.matmul_flops_fp32 / max(e.matmul_flops_fp32 for e in devs)
        x[r, 15] = d.memory / max_m
        x[r, 16] = d.memory_bandwidth / max_mbw
        x[r, 17] = node_size[d.node] / D
        x[r, 18] = len(node_size) / D
        x[r, 19] = _lg(min_mem / d.memory)
    types = np.array([OP] * G + [BATCH] + [CLASS] * C + [DEVICE] * D, np.int32)
    # ---- edges --------------------------------------------------------------------------------
    snd, rcv, typ, ef = [], [], [], []

    def edge(s, r, t, f):
        snd.append(s), rcv.append(r), typ.append(t), ef.append(f)

    flow: dict[tuple[int, int], float] = {}
    cflow: dict[tuple[int, int], float] = {}
    for op in graph.ops:
        for t in op.inputs:
            p = graph.tensors[t].producer
            if p is None:
                continue
            if owner[p] != owner[op.id]:
                key = (int(owner[p]), int(owner[op.id]))
                flow[key] = flow.get(key, 0.0) + graph.tensors[t].nbytes
            a, b = int(class_of[p]), int(class_of[op.id])
            if a >= 0 and b >= 0 and a != b:
                cflow[(a, b)] = cflow.get((a, b), 0.0) + graph.tensors[t].nbytes
    for (a, b), v in sorted(flow.items()):
        tt = v / max_bw / T
        f = (min(tt, 10.0), _lg(tt), 0.0, 0.0)
        edge(a, b, 0, f)
        edge(b, a, 1, f)
    for i in range(D):
        for j in range(D):
            if i != j:
                link = topology.link(mesh.device_ids[i], mesh.device_ids[j])
                same = devs[i].node == devs[j].node
                edge(F0 + i, F0 + j, 2, (link.bandwidth / max_bw, _lg(link.bandwidth / max_bw),
                                         _lg(link.latency / T), float(same)))
    for k in range(G + 1):
        for j in range(D):
            tt = t_gd[k, j] / T
            f = (tt, _lg(tt), t_gd[k, j] / max(t_gd[k].min(), 1e-30) - 1.0, 0.0)
            edge(k, F0 + j, 3, f)
            edge(F0 + j, k, 4, f)
    for (a, b), v in sorted(cflow.items()):
        tt = v / max_bw / T
        f = (min(tt, 10.0), _lg(tt), 0.0, 0.0)
        edge(G + 1 + a, G + 1 + b, 5, f)
        edge(G + 1 + b, G + 1 + a, 6, f)
    for c, members in enumerate(classes):
        k = int(owner[members[0]])
        f = (x[G + 1 + c, 0], x[G + 1 + c, 1], 0.0, 0.0)
        edge(G + 1 + c, k, 7, f)
        edge(k, G + 1 + c, 8, f)
    lab = np.zeros(N, np.int32)
    has = np.zeros(N, np.float32)
    if labels is not None:
        # Imitation weight: the groups holding most bytes decide most of the step time; the choice
        # for a small bias or norm scale is close to arbitrary, so it counts a quarter.
        sizes = [float(sum(graph.tensors[t].nbytes for t in g.tensors)) for g in groups]
        top = max(sizes, default=1.0) or 1.0
        for k, v in enumerate(labels):
            if v < MAX_OPTIONS:
                lab[k], has[k] = v, (0.25 + 0.75 * sizes[k] / top) if k < G else 1.0
    if op_labels is not None:
        # Op classes: many, each choice cheap to get wrong alone; weighted by their share of the
        # time (compute on the fastest device and their outputs on the fastest link), at least 0.2.
        w = np.array([x[G + 1 + c, 0] + min(10 ** (6 * (x[G + 1 + c, 4] - 1.0)), 10.0)
                      for c in range(C)]) if C else np.zeros(0)
        w = 0.2 + 0.8 * w / max(float(w.max(initial=0.0)), 1e-30)
        for c, v in enumerate(op_labels):
            if 0 <= v < MAX_OPTIONS:
                lab[G + 1 + c], has[G + 1 + c] = v, w[c]
    glob = np.zeros((1, GLOBAL_FEATURES))
    names = list(mesh.axis_names)
    n = max(mesh.size, 2)
    dsz = mesh.axes.get("data", 1) if "data" in names else (mesh.shape[0] if len(names) == 1 else 1)
    msz = mesh.axes.get("model", 1)
    glob[0] = (math.log2(dsz) / math.log2(n), math.log2(msz) / math.log2(n), len(names) > 1,
               _ring_bw(topology, mesh, (names[0],)) / max_bw,
               _ring_bw(topology, mesh, (names[-1],)) / max_bw if len(names) > 1 else 0.0,
               mesh.size / 16, len(node_size) / D,
               # which share of the cluster the mesh uses, and how much faster its slowest device
               # is than the cluster's (meshes of the faster devices only, on mixed clusters)
               mesh.size / len(topology.devices),
               math.log10(min(d.flops_fp32 for d in devs)
                          / min(d.flops_fp32 for d in topology.devices)))
    return jraph.GraphsTuple(
        nodes={"x": x.astype(np.float32), "type": types, "opt": opt.astype(np.float32),
               "mask": mask, "label": lab, "has_label": has},
        edges={"x": np.asarray(ef, np.float32).reshape(-1, EDGE_FEATURES),
               "type": np.asarray(typ, np.int32)},
        senders=np.asarray(snd, np.int32), receivers=np.asarray(rcv, np.int32),
        n_node=np.array([N], np.int32), n_edge=np.array([len(snd)], np.int32),
        globals={"x": glob.astype(np.float32), "inst": np.zeros(1, np.int32),
                 **_candidate_globals(candidates, candidate_best),
                 "best": np.zeros(1, np.float32), "value": np.zeros(1, np.float32),
                 "valid": np.ones(1, np.float32)})


def seed_candidates(meshes: Sequence) -> list[tuple[int, str]]:
    """(mesh index, kind) of the seeds the ranking head orders, as the search seeds them: data
    parallel and FSDP on 1-D meshes, Megatron on 2-D ones, the replicated plan (every device
    computing everything) once per set of devices."""
    out, sets = [], set()
    for k, m in enumerate(meshes):
        kinds = ("megatron",) if len(m.shape) == 2 else ("data_parallel", "fsdp")
        if frozenset(m.device_ids) not in sets:
            sets.add(frozenset(m.device_ids))
            kinds += ("replicated",)
        out += [(k, kind) for kind in kinds]
    return out[:MAX_CANDIDATES]


def candidate_rows(graph: OpGraph, topology, meshes: Sequence,
                   cands: Sequence[tuple[int, str]]) -> np.ndarray:
    """[len(cands), CANDIDATE_FEATURES]: each seed's mesh (axis sizes, ring bandwidths of its axes
    on the cluster's fastest link, share and speed of the devices it uses), its kind, and two
    ratios a person would look at first: the bytes it keeps per device (parameters, gradients
    and Adam moments, split as the kind splits them) over the mesh's smallest memory, and its
    parameter bytes over its data axis's ring bandwidth against its compute per device (what
    data parallel's gradient all-reduce costs next to the work), its compute per device (the
    optimizer update repeated on every device or split, as the kind does it) against the least
    of any seed and the update's share of it, and that compute and that all-reduce in seconds
    (the only absolute scales: on small problems latency decides)."""
    n_all = max(len(topology.devices), 2)
    bwm = topology.bandwidth_matrix()
    max_bw = float(bwm.max()) or 1.0
    params = float(sum(graph.tensors[t].nbytes for t in graph.inputs
                       if graph.tensors[t].role == Role.PARAMETER))
    slowest_fp32 = min(d.flops_fp32 for d in topology.devices)
    # Compute on each set of devices at its slowest device's pace (one SPMD program), apart for
    # the optimizer update, which data parallel repeats on every device and FSDP splits.
    update = np.array([bool(op.outputs) and graph.tensors[op.outputs[0]].role
                       in (Role.UPDATE, Role.OUTPUT) for op in graph.ops])
    work: dict[tuple, tuple[float, float]] = {}  # (forward and backward, update) on all devices
    for k in {k for k, _ in cands}:
        key = tuple(sorted(meshes[k].device_ids))
        if key not in work:
            t = op_times(graph, [topology.device(i) for i in key]).max(1)
            work[key] = (float(t[~update].sum()), float(t[update].sum()))
    least = min((f + u) / len(key) for key, (f, u) in work.items()) if work else 1.0
    rows = np.zeros((len(cands), CANDIDATE_FEATURES))
    for r, (k, kind) in enumerate(cands):
        m = meshes[k]
        devs = [topology.device(i) for i in m.device_ids]
        key = tuple(sorted(m.device_ids))
        names = list(m.axis_names)  # the first axis carries the batch, a second the model
        dsz, msz = m.shape[0], (m.shape[1] if len(names) > 1 else 1)
        data_bw = _ring_bw(topology, m, (names[0],))
        split = {"data_parallel": 1, "fsdp": m.size, "megatron": msz, "replicated": 1}[kind]
        held = 4.0 * params / split  # parameters, gradients, two Adam moments
        sync = params * 2.0 * (dsz - 1) / max(dsz, 1) / max(msz if kind == "megatron" else 1, 1)
        fwd, upd = work[key]
        own = {"data_parallel": fwd / m.size + upd, "fsdp": (fwd + upd) / m.size,
               "megatron": fwd / m.size + upd / msz, "replicated": fwd + upd}[kind]
        if kind == "replicated":
            sync = 0.0  # no communication; each device does the whole batch
        rows[r] = (math.log2(dsz) / math.log2(n_all), math.log2(msz) / math.log2(n_all),
                   len(names) > 1, data_bw / max_bw,
                   _ring_bw(topology, m, (names[1],)) / max_bw if len(names) > 1 else 0.0,
                   m.size / n_all, math.log10(min(d.flops_fp32 for d in devs) / slowest_fp32),
                   *(float(kind == x) for x in RANK_KINDS),
                   _lg(held / min(d.memory for d in devs)),
                   _lg(sync / max(data_bw, 1.0) / max(own, 1e-12) / 1e3),
                   _lg(least / max(own, 1e-30)), _seconds(own), _seconds(sync / max(data_bw, 1.0)),
                   _lg(upd / split / max(own, 1e-30)))
    return rows


def _seconds(t: float) -> float:
    """An absolute time on about [0, 1] over [1 us, 1 s]: whether latency or bandwidth and compute
    dominate depends on scale, which the unit-free features leave out."""
    return float(np.clip((math.log10(max(t, 1e-9)) + 6.0) / 6.0, -0.5, 1.5))


def _candidate_globals(rows: np.ndarray | None, best: Sequence[float] | None) -> dict:
    cand = np.zeros((1, MAX_CANDIDATES, CANDIDATE_FEATURES), np.float32)
    mask = np.zeros((1, MAX_CANDIDATES), bool)
    target = np.zeros((1, MAX_CANDIDATES), np.float32)
    if rows is not None:
        n = min(len(rows), MAX_CANDIDATES)
        cand[0, :n], mask[0, :n] = rows[:n], True
        if best is not None:
            target[0, :n] = np.asarray(best, np.float32)[:n]
    return {"cand": cand, "cand_mask": mask, "cand_best": target}


def _bucket(n: int, least: int) -> int:
    return max(least, 1 << max(0, int(n - 1).bit_length()))


def pad(graphs: Sequence[jraph.GraphsTuple], n_graph: int | None = None) -> jraph.GraphsTuple:
    """Batch and pad to power-of-two node/edge counts (and `n_graph` graphs, default a power of 2),
    so a jitted network sees few distinct shapes."""
    g = jraph.batch_np(list(graphs))
    nodes = _bucket(int(g.n_node.sum()) + 1, 64)
    edges = _bucket(int(g.n_edge.sum()), 256)
    n_graph = n_graph or _bucket(len(graphs) + 1, 2)
    real_nodes, real_edges = int(g.n_node.sum()), int(g.n_edge.sum())
    out = jraph.pad_with_graphs(g, nodes, edges, n_graph)
    # jraph points padding edges at node 0, a real node: point them at a padding node instead.
    snd, rcv = out.senders.copy(), out.receivers.copy()
    snd[real_edges:] = rcv[real_edges:] = real_nodes
    return out._replace(senders=snd, receivers=rcv)
