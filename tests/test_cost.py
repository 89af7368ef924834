"""The simulator: reshard collectives, compute and communication time, overlap, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tag_jax
from tag_jax.cost import (COMPUTE_EFFICIENCY, Comm, Simulator, comm_time, fits,
                          reshard_collectives, simulate)
from tag_jax.strategy import MeshSpec, OpStrategy, Strategy, TensorSharding as TS
from tag_jax.topology import Device, Link, Topology

S = jax.ShapeDtypeStruct
F32 = np.float32
MESH = MeshSpec((2, 4), ("a", "b"), tuple(range(8)))
LINEAR = {"mul", "div", "neg", "transpose", "reshape", "convert_element_type", "reduce_sum",
          "broadcast_in_dim", "squeeze", "add_any", "copy", "copy_p"}


def P(*dims, partial=()):
    return TS(tuple(() if d is None else (d,) if isinstance(d, str) else tuple(d) for d in dims),
              tuple(partial))


# ------------------------------------------------------------------------------------ reshard
# Expected collectives are what XLA's SPMD partitioner emitted for these reshards of an f32
# [64, 128] array on a 2x4 mesh (read from compiled HLO on 8 CPU devices).
RESHARDS = [
    (P("a", None), P("a", None), []),
    # one dim split wanted split on another dim by one other axis: the whole gathered (step 0c)
    (P(None, "b"), P("a", None), [("all-gather", ("b",), 64 * 128 * 4)]),
    (P("b", None), P(None, "b"), [("all-to-all", ("b",), 16 * 128 * 4)]),
    (P(("a", "b"), None), P("a", None), [("all-gather", ("b",), 32 * 128 * 4)]),
    (P("a", None), P(None, None), [("all-gather", ("a",), 64 * 128 * 4)]),
    (P("a", None), P(None, "a"), [("all-to-all", ("a",), 32 * 128 * 4)]),
    (P("a", "b"), P(None, None), [("all-gather", ("b",), 32 * 128 * 4),
                                  ("all-gather", ("a",), 64 * 128 * 4)]),
    (P("a", None), P(("a", "b"), None), []),
    (P(None, None), P("a", "b"), []),
    (P("a", None), P("b", None), [("collective-permute", ("a", "b"), 16 * 128 * 4)]),
    (P("b", None), P("a", None), [("collective-permute", ("b", "a"), 16 * 128 * 4),
                                  ("all-gather", ("b",), 32 * 128 * 4)]),
    (P(("a", "b"), None), P("b", None), [("collective-permute", ("a", "b"), 8 * 128 * 4),
                                         ("all-gather", ("a",), 16 * 128 * 4)]),
    (P("a", "b"), P("b", None), [("all-gather", ("a",), 64 * 32 * 4),
                                 ("all-to-all", ("b",), 16 * 128 * 4)]),
    (P(None, "a"), P("b", None), [("all-gather", ("a",), 64 * 128 * 4)]),
    (P(("a", "b"), None), P(("b", "a"), None), [("collective-permute", ("a", "b"), 8 * 128 * 4)]),
    (P("a", None), P(("b", "a"), None), [("collective-permute", ("a", "b"), 8 * 128 * 4)]),
    (P("b", None), P(("a", "b"), None), [("collective-permute", ("b", "a"), 8 * 128 * 4)]),
    # one axis leaving a dim that other axes also split (step 0a of reshard.py)
    (P(None, ("a", "b")), P("a", None), [("all-gather", ("a", "b"), 64 * 128 * 4)]),
    (P(None, ("b", "a")), P("b", None), [("all-gather", ("b", "a"), 64 * 128 * 4)]),
    (P(("b", "a"), None), P(None, "b"), [("all-gather", ("b", "a"), 64 * 128 * 4)]),
    (P(None, ("a", "b")), P("b", None), [("all-gather", ("a", "b"), 64 * 128 * 4)]),  # step 0c
    (P(None, ("b", "a")), P("a", None), [("all-gather", ("b", "a"), 64 * 128 * 4)]),  # step 0c
    (P(None, ("a", "b")), P("a", "b"), [("all-to-all", ("a",), 32 * 32 * 4),
                                        ("collective-permute", ("a", "b"), 32 * 32 * 4)]),
    (P(("b", "a"), None), P("a", "b"), [("all-to-all", ("b",), 32 * 32 * 4),
                                        ("collective-permute", ("b", "a"), 32 * 32 * 4)]),
    (P("a", "b"), P(None, "a"), [("collective-permute", ("a", "b"), 32 * 32 * 4),
                                 ("all-gather", ("a",), 64 * 32 * 4), ("all-gather", ("b",), 64 * 64 * 4)]),
    (P("b", "a"), P(None, "b"), [("all-gather", ("a",), 16 * 128 * 4), ("all-to-all", ("b",), 64 * 32 * 4)]),
    # partial sums (the output of a matmul whose contracting dim is split)
    (P(None, None, partial="b"), P(None, None), [("all-reduce", ("b",), 64 * 128 * 4)]),
    (P(None, None, partial="b"), P("b", None), [("reduce-scatter", ("b",), 16 * 128 * 4)]),
    (P(None, None, partial=("a", "b")), P(None, None), [("all-reduce", ("a", "b"), 64 * 128 * 4)]),
    (P(None, None, partial=("a", "b")), P(("a", "b"), None),
     [("reduce-scatter", ("a", "b"), 8 * 128 * 4)]),
    (P(None, None, partial=("a", "b")), P("b", None), [("reduce-scatter", ("b",), 16 * 128 * 4),
                                                        ("all-reduce", ("a",), 16 * 128 * 4)]),
    (P(None, None, partial=("a", "b")), P(None, "b"), [("reduce-scatter", ("b",), 64 * 32 * 4),
                                                        ("all-reduce", ("a",), 64 * 32 * 4)]),
    (P(None, None, partial="b"), P("a", None), [("all-reduce", ("b",), 32 * 128 * 4)]),
    (P("a", None, partial="b"), P("a", "b"), [("reduce-scatter", ("b",), 32 * 32 * 4)]),
    (P("a", None, partial="b"), P(None, "b"), [("reduce-scatter", ("b",), 32 * 32 * 4),
                                               ("all-gather", ("a",), 64 * 32 * 4)]),
    (P("a", None, partial="b"), P(None, None), [("all-reduce", ("b",), 32 * 128 * 4),
                                                ("all-gather", ("a",), 64 * 128 * 4)]),
    (P("a", None, partial="b"), P("b", None), [("all-reduce", ("b",), 32 * 128 * 4),
                                               ("collective-permute", ("a", "b"), 16 * 128 * 4)]),
    (P(None, None), P(None, None, partial="a"), []),  # becoming partial is a local select
    # an axis changes dimension but each new piece lies inside one old piece: one permute
    (P(None, "a"), P("a", "b"), [("collective-permute", ("a", "b"), 32 * 32 * 4)]),
    (P("a", None), P("b", "a"), [("collective-permute", ("a", "b"), 16 * 64 * 4)]),
    # an axis leaving a dimension moves before that dimension is sliced
    (P(None, "b"), P("b", "a"), [("all-to-all", ("b",), 64 * 32 * 4)]),
    # a swap: an all-to-all, then a permute of the same bytes
    (P("a", "b"), P("b", "a"), [("all-to-all", ("a",), 32 * 32 * 4),
                                ("collective-permute", ("b",), 32 * 32 * 4)]),
    # moved axes landing in the wrong order are permuted after the all-to-all
    (P("a", None), P(None, ("a", "b")), [("all-to-all", ("a",), 32 * 32 * 4),
                                         ("collective-permute", ("a", "b"), 32 * 32 * 4)]),
]


@pytest.mark.parametrize("src,dst,expected", RESHARDS, ids=[f"{s}->{d}" for s, d, _ in RESHARDS])
def test_reshard_collectives_match_xla(src, dst, expected):
    got = reshard_collectives(src, dst, (64, 128), F32, MESH)
    assert [(c.kind, c.axes, c.bytes) for c in got] == expected


def test_reshard_bytes_follow_dtype_and_errors():
    (c,) = reshard_collectives(P("a", None), P(None, None), (64, 128), jnp.bfloat16, MESH)
    assert c == Comm("all-gather", ("a",), 64 * 128 * 2)
    with pytest.raises(ValueError, match="mesh axis 'z'"):
        reshard_collectives(P("z", None), P(None, None), (64, 128), F32, MESH)
    with pytest.raises(ValueError, match="2 dims"):
        reshard_collectives(P("a", None), P(None), (64, 128, 2), F32, MESH)


def two_node_topology(flops=(100e12,) * 8, fp32=(10e12,) * 8, mem_bw=1e12, memory=16e9):
    devs = tuple(Device(i, "x", flops[i], fp32[i], memory, mem_bw, node=i // 4) for i in range(8))
    return Topology(devs, intra_node=Link(100e9, 1e-6), inter_node=Link(1e9, 1e-5))


def test_comm_time_is_the_slowest_group():
    topo = two_node_topology()
    mesh = MeshSpec((2, 4), ("a", "b"), tuple(range(8)))  # a crosses nodes, b stays inside one
    c = Comm("all-reduce", ("b",), 1 << 20)
    assert comm_time(c, mesh, topo) == pytest.approx(topo.collective_time("all-reduce", 1 << 20, (0, 1, 2, 3)))
    # a group mixing nodes is the slowest: reorder devices so one b-group spans both nodes
    mixed = MeshSpec((2, 4), ("a", "b"), (0, 1, 2, 4, 3, 5, 6, 7))
    slow = topo.collective_time("all-reduce", 1 << 20, (0, 1, 2, 4))
    assert comm_time(c, mixed, topo) == pytest.approx(slow)
    assert slow > comm_time(c, mesh, topo)


# ------------------------------------------------------------------------------------ fixtures
def data_parallel(graph, batch: int, axis: str = "a"):
    """(op_strategies, dp choices): per op [replicated, batch-split], by propagating a batch dim.

    A dimension of size `batch` is the batch dimension; a tensor without one computed from batched
    tensors (weight gradient, loss) is a partial sum over `axis`, which linear ops carry along.
    """
    state = {}  # tensor -> "B" | "P"
    for t in graph.inputs:
        if batch in graph.tensors[t].shape:
            state[t] = "B"

    def split(t):
        shape = graph.tensors[t].shape
        return TS(tuple((axis,) if k == shape.index(batch) else () for k in range(len(shape))))

    def repl(t):
        return TS.replicated(len(graph.tensors[t].shape))

    strategies = []
    for op in graph.ops:
        r = OpStrategy("R", tuple(repl(t) for t in op.inputs), tuple(repl(t) for t in op.outputs))
        ins = [state.get(t) for t in op.inputs]
        if "B" in ins:
            i_sh = tuple(split(t) if state.get(t) == "B" else repl(t) for t in op.inputs)
            o_sh = []
            for t in op.outputs:
                if batch in graph.tensors[t].shape:
                    state[t] = "B"
                    o_sh.append(split(t))
                else:
                    state[t] = "P"
                    o_sh.append(TS(repl(t).dims, (axis,)))
        elif "P" in ins and op.primitive in LINEAR and ins.count("P") == 1:
            i_sh = tuple(TS(repl(t).dims, (axis,)) if state.get(t) == "P" else repl(t) for t in op.inputs)
            o_sh = [TS(repl(t).dims, (axis,)) for t in op.outputs]
            state.update({t: "P" for t in op.outputs})
        elif any(batch in graph.tensors[t].shape for t in op.outputs):
            i_sh = tuple(repl(t) for t in op.inputs)
            o_sh = [split(t) if batch in graph.tensors[t].shape else repl(t) for t in op.outputs]
            state.update({t: "B" for t in op.outputs if batch in graph.tensors[t].shape})
        else:
            strategies.append((r, r))
            continue
        strategies.append((r, OpStrategy("DP", i_sh, tuple(o_sh))))
    return tuple(strategies), tuple(1 for _ in graph.ops)


def dp_inputs(graph, batch, axis="a"):
    out = []
    for t in graph.inputs:
        shape = graph.tensors[t].shape
        out.append(TS(tuple((axis,) if batch in shape and k == shape.index(batch) else ()
                            for k in range(len(shape)))))
    return tuple(out)


def mlp_step(params, batch):
    def loss(p):
        h = jnp.tanh(batch["x"] @ p["w1"])
        return jnp.mean((h @ p["w2"] - batch["y"]) ** 2)
    g = jax.grad(loss)(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, g)


@pytest.fixture(scope="module")
def mlp():
    params = {"w1": S((8, 32), F32), "w2": S((32, 4), F32)}
    batch = {"x": S((16, 8), F32), "y": S((16, 4), F32)}
    return tag_jax.trace(mlp_step, params, batch)


# ------------------------------------------------------------------------------------ simulate
def test_data_parallel_all_reduces_exactly_the_gradients(mlp):
    mesh = MeshSpec((8,), ("a",), tuple(range(8)))
    strats, dp = data_parallel(mlp, 16)
    strategy = Strategy(mesh, dp, dp_inputs(mlp, 16))
    cost = simulate(mlp, strats, strategy, two_node_topology(), overlap=False)
    param_bytes = sum(t.nbytes for t in mlp.by_role("parameter"))
    assert param_bytes == (8 * 32 + 32 * 4) * 4
    assert cost.comm_bytes_by_kind == {"all-reduce": param_bytes, "all-gather": 0, "reduce-scatter": 0,
                                       "all-to-all": 0, "collective-permute": 0}
    assert cost.comm_bytes == param_bytes
    topo = two_node_topology()
    expected = sum(topo.collective_time("all-reduce", t.nbytes, range(8)) for t in mlp.by_role("parameter"))
    assert cost.comm_s == pytest.approx(expected)
    # all replicated: no communication at all
    repl = Strategy(mesh, (0,) * len(mlp.ops), tuple(TS.replicated(len(mlp.tensors[t].shape))
                                                       for t in mlp.inputs))
    assert simulate(mlp, strats, repl, topo).comm_bytes == 0


def matmul_graph(m=512, k=4096, n=512, dtype=F32):
    return tag_jax.trace(lambda x, w: x @ w, S((m, k), dtype), S((k, n), dtype))


@pytest.mark.parametrize("dtype", [F32, jnp.bfloat16])
def test_compute_time_is_flops_over_shards_rate_and_efficiency(dtype):
    g = matmul_graph(dtype=dtype)
    mesh = MeshSpec((8,), ("a",), tuple(range(8)))
    split = OpStrategy("S", (P("a", None), P(None, None)), (P("a", None),))
    repl = OpStrategy("R", (P(None, None), P(None, None)), (P(None, None),))
    topo = two_node_topology(mem_bw=1e15)  # compute-bound
    flops = 2.0 * 512 * 4096 * 512
    rate = 100e12 if dtype == jnp.bfloat16 else 10e12
    sim = Simulator(g, ((repl, split),), topo, mesh)
    cost = sim.cost(Strategy(mesh, (1,), (P("a", None), P(None, None))))
    assert cost.compute_s == pytest.approx(flops / (8 * rate * COMPUTE_EFFICIENCY))
    assert cost.comm_s == 0 and cost.step_time_s == pytest.approx(cost.compute_s)
    cost = sim.cost(Strategy(mesh, (0,), (P(None, None), P(None, None))))
    assert cost.compute_s == pytest.approx(flops / (rate * COMPUTE_EFFICIENCY))


def test_memory_bound_ops_use_bandwidth():
    g = tag_jax.trace(lambda x: x * 2.0, S((1024, 1024), F32))
    mesh = MeshSpec((8,), ("a",), tuple(range(8)))
    op = g.ops[0]
    strats = [[OpStrategy("R", tuple(P(*[None] * len(g.tensors[t].shape)) for t in op.inputs),
                          (P(None, None),))] for op in g.ops]
    sim = Simulator(g, strats, two_node_topology(mem_bw=1e9), mesh, memory_efficiency=1.0)
    cost = sim.cost(Strategy(mesh, (0,), (P(None, None),)))
    assert cost.compute_s == pytest.approx(op.bytes / 1e9)


def test_a_fused_elementwise_chain_pays_its_memory_traffic_once():
    """sin -> mul -> exp -> add over 4 MiB: XLA fuses the chain into one kernel that reads x and
    writes the result once (8 MiB), not 8 MiB per op (32 MiB); the roofline charges the former."""
    from tag_jax.cost.simulate import memory_traffic

    g = tag_jax.trace(lambda x: jnp.exp(jnp.sin(x) * 2.0) + 1.0, S((1024, 1024), F32))
    assert [op.primitive for op in g.ops] == ["sin", "mul", "exp", "add"]
    mesh = MeshSpec((8,), ("a",), tuple(range(8)))
    strats = [[OpStrategy("R", tuple(P(*[None] * len(g.tensors[t].shape)) for t in op.inputs),
                          (P(None, None),))] for op in g.ops]
    sim = Simulator(g, strats, two_node_topology(mem_bw=1e9), mesh, memory_efficiency=1.0)
    cost = sim.cost(Strategy(mesh, (0,) * 4, (P(None, None),)))
    whole = 1024 * 1024 * 4
    assert sum(op.bytes for op in g.ops) == pytest.approx(8 * whole, rel=1e-3)  # each op alone
    assert cost.compute_s == pytest.approx(2 * whole / 1e9, rel=1e-3)
    assert memory_traffic(g) == pytest.approx(2 * whole, rel=1e-3)
    # a value read twice (by the chain and as a result) is written once and read once more
    g2 = tag_jax.trace(lambda x: (jnp.sin(x), jnp.sin(x) * 2.0), S((1024, 1024), F32))
    assert memory_traffic(g2) > 2.5 * whole


def test_a_local_select_of_a_whole_value_holds_no_copy():
    """A transpose that takes its replicated operand as a partial sum (a local select the program
    never makes: partial layouts are not constraints) reads the operand where it lies: the same
    peak memory and no communication as the plain transpose."""
    g = tag_jax.trace(lambda x: x.T * 2.0, S((1024, 1024), F32))
    assert [op.primitive for op in g.ops] == ["transpose", "mul"]
    mesh = MeshSpec((8,), ("a",), tuple(range(8)))
    plain = OpStrategy("R", (P(None, None),), (P(None, None),))
    select = OpStrategy("R +partial(a)", (P(None, None, partial="a"),), (P(None, None, partial="a"),))
    mul = OpStrategy("R", (P(None, None), P()), (P(None, None),))
    sim = Simulator(g, ((plain, select), (mul,)), two_node_topology(), mesh)
    a = sim.cost(Strategy(mesh, (0, 0), (P(None, None),)))
    b = sim.cost(Strategy(mesh, (1, 0), (P(None, None),)))
    assert b.comm_bytes == a.comm_bytes == 0
    assert b.peak_memory_bytes == a.peak_memory_bytes


def test_heterogeneous_mesh_is_bounded_by_the_slowest_device():
    g = matmul_graph()
    split = OpStrategy("S", (P("a", None), P(None, None)), (P("a", None),))
    fp32 = (10e12,) * 7 + (2e12,)
    topo = two_node_topology(fp32=fp32)
    flops = 2.0 * 512 * 4096 * 512
    inputs = (P("a", None), P(None, None))
    fast = MeshSpec((4,), ("a",), (0, 1, 2, 3))
    slow = MeshSpec((4,), ("a",), (4, 5, 6, 7))
    t_fast = simulate(g, ((split,),), Strategy(fast, (0,), inputs), topo).compute_s
    t_slow = simulate(g, ((split,),), Strategy(slow, (0,), inputs), topo).compute_s
    assert t_fast == pytest.approx(flops / (4 * 10e12 * COMPUTE_EFFICIENCY))
    assert t_slow == pytest.approx(flops / (4 * 2e12 * COMPUTE_EFFICIENCY))
    preset = Topology.preset("tag-hetero")
    mesh = MeshSpec((8,), ("a",), preset.ids)
    t = simulate(g, ((split,),), Strategy(mesh, (0,), inputs), preset).compute_s
    assert t == pytest.approx(flops / (8 * min(d.flops_fp32 for d in preset.devices) * COMPUTE_EFFICIENCY))


def test_overlap_lies_between_max_and_sum(mlp):
    mesh = MeshSpec((8,), ("a",), tuple(range(8)))
    strats, dp = data_parallel(mlp, 16)
    strategy = Strategy(mesh, dp, dp_inputs(mlp, 16))
    for fp32 in (1e9, 1e8, 1e7):  # comm-bound to compute-bound
        topo = two_node_topology(fp32=(fp32,) * 8)
        sim = Simulator(mlp, strats, topo, mesh)
        c = sim.cost(strategy)
        serial = sim.cost(strategy, overlap=False)
        assert serial.step_time_s == pytest.approx(c.compute_s + c.comm_s)
        assert max(c.compute_s, c.comm_s) - 1e-15 <= c.step_time_s <= c.compute_s + c.comm_s + 1e-15
    # the first gradient's all-reduce (w2) overlaps with the rest of the backward pass
    assert c.step_time_s < c.compute_s + c.comm_s


def test_peak_memory_is_a_hand_count():
    # y = tanh(x @ w) * 2: ops dot -> a, tanh -> b, mul(b, 2.0) -> c (output)
    g = tag_jax.trace(lambda x, w: jnp.tanh(x @ w) * 2.0, S((16, 8), F32), S((8, 32), F32))
    assert [op.primitive for op in g.ops] == ["dot_general", "tanh", "mul"]
    mesh = MeshSpec((2,), ("a",), (0, 1))
    act = 16 * 32 * 4
    const = sum(t.nbytes for t in g.tensors if t.producer is None and t.id not in g.inputs)
    x, w = 16 * 8 * 4, 8 * 32 * 4

    def strat(ins, outs):
        return OpStrategy("s", ins, outs)

    dot_r = strat((P(None, None), P(None, None)), (P(None, None),))
    dot_s = strat((P("a", None), P(None, None)), (P("a", None),))
    ew_r = strat((P(None, None),), (P(None, None),))
    ew_s = strat((P("a", None),), (P("a", None),))
    mul_r = strat((P(None, None), P()), (P(None, None),))
    mul_s = strat((P("a", None), P()), (P("a", None),))
    if g.ops[2].inputs[0] != g.ops[1].outputs[0]:
        mul_r, mul_s = (strat(s.inputs[::-1], s.outputs) for s in (mul_r, mul_s))
    strats = ((dot_r, dot_s), (ew_r, ew_s), (mul_r, mul_s))
    topo = two_node_topology()
    repl_in = (P(None, None), P(None, None))
    # replicated: live a | a+b | b+c | c
    c = simulate(g, strats, Strategy(mesh, (0, 0, 0), repl_in), topo)
    assert c.peak_memory_bytes == x + w + const + 2 * act
    # batch-split: every activation and x halve
    c = simulate(g, strats, Strategy(mesh, (1, 1, 1), (P("a", None), P(None, None))), topo)
    assert c.peak_memory_bytes == x // 2 + w + const + act
    # split dot, replicated tanh: a (half) is gathered into a full copy for tanh, which lives
    # during tanh only: at tanh a/2 + copy + b; at mul b + c
    c = simulate(g, strats, Strategy(mesh, (1, 0, 0), (P("a", None), P(None, None))), topo)
    assert c.peak_memory_bytes == x // 2 + w + const + act // 2 + 2 * act
    assert c.comm_bytes_by_kind["all-gather"] == act


def test_partial_graph_output_is_all_reduced():
    g = matmul_graph(m=16, k=64, n=32)
    mesh = MeshSpec((8,), ("a",), tuple(range(8)))
    contract = OpStrategy("K", (P(None, "a"), P("a", None)), (P(None, None, partial="a"),))
    c = simulate(g, ((contract,),), Strategy(mesh, (0,), (P(None, "a"), P("a", None))),
                 two_node_topology(), overlap=True)
    assert c.comm_bytes_by_kind["all-reduce"] == 16 * 32 * 4 and c.comm_bytes == 16 * 32 * 4
    assert c.step_time_s == pytest.approx(c.compute_s + c.comm_s)  # nothing to overlap with
    assert "all-reduce" in c.summary()


def test_incremental_matches_full_no_overlap(mlp):
    mesh = MeshSpec((8,), ("a",), tuple(range(8)))
    strats, dp = data_parallel(mlp, 16)
    strategy = Strategy(mesh, dp, dp_inputs(mlp, 16))
    sim = Simulator(mlp, strats, two_node_topology(), mesh)
    inc = sim.incremental(strategy)
    assert inc.time == pytest.approx(sim.cost(strategy, overlap=False).step_time_s)
    rng = np.random.default_rng(0)
    for _ in range(30):
        ops = rng.choice(len(mlp.ops), size=rng.integers(1, 4), replace=False)
        move = {int(i): int(rng.integers(len(strats[i]))) for i in ops}
        guess = inc.propose(move)
        after = inc.commit(move)
        assert guess == pytest.approx(after)
        full = sim.cost(inc.strategy, overlap=False)
        assert after == pytest.approx(full.step_time_s)



def test_incremental_knows_ops_that_make_no_sum():
    """A scatter-add whose option only wants its operands as partial selects (R + partial, no
    operand split, `Simulator._makes_sum`) fed non-partial values is a select itself: nothing is
    reduced. Incremental priced an all-reduce of its result (it took only elementwise and
    shape-only ops for selects); moved there op by op, it now agrees with the full no-overlap cost."""
    def f(u, w):
        z = jnp.zeros((64, 1), jnp.float32).at[:, 0].add(u * 2.0)
        return (z * 3.0) @ w

    g = tag_jax.trace(f, S((64,), F32), S((1, 32), F32))
    mesh = MeshSpec((8,), ("a",), tuple(range(8)))
    seen, strats = {}, []
    for op in g.ops:
        k = seen[op.primitive] = seen.get(op.primitive, -1) + 1
        shapes = [len(g.tensors[t].shape) for t in op.inputs], [len(g.tensors[t].shape) for t in op.outputs]
        repl = OpStrategy("R", tuple(TS.replicated(n) for n in shapes[0]),
                          tuple(TS.replicated(n) for n in shapes[1]))
        picked = None
        if op.primitive == "scatter-add":
            picked = ([TS.replicated(len(g.tensors[t].shape)) if g.tensors[t].dtype.kind == "i"
                       else TS(((),) * len(g.tensors[t].shape), ("a",)) for t in op.inputs],
                      [P(None, None, partial="a")])
        elif op.primitive == "mul" and k == 0:
            picked = ([P("a"), P()], [P("a")])
        elif op.primitive == "broadcast_in_dim" and g.tensors[op.outputs[0]].shape == (64, 1):
            picked = ([P()], [P("a", None)])
        strats.append((repl,) if picked is None else
                      (repl, OpStrategy("picked", tuple(picked[0]), tuple(picked[1]))))
    sim = Simulator(g, tuple(strats), two_node_topology(), mesh)
    strategy = Strategy(mesh, (0,) * len(g.ops), (P("a"), P(None, None)))
    inc = sim.incremental(strategy)
    assert inc.time == pytest.approx(sim.cost(strategy, overlap=False).step_time_s)
    for i in [i for i, s in enumerate(strats) if len(s) > 1]:
        guess = inc.propose({i: 1})
        assert guess == pytest.approx(inc.commit({i: 1}))
        assert guess == pytest.approx(sim.cost(inc.strategy, overlap=False).step_time_s)
    full = sim.cost(inc.strategy, overlap=False)
    assert full.comm_bytes_by_kind["all-reduce"] == 0 < full.comm_bytes


def test_errors_and_fits(mlp):
    mesh = MeshSpec((8,), ("a",), tuple(range(8)))
    strats, dp = data_parallel(mlp, 16)
    topo = two_node_topology(memory=16e9)
    sim = Simulator(mlp, strats, topo, mesh)
    with pytest.raises(ValueError, match="choices"):
        sim.cost(Strategy(mesh, dp[:-1], dp_inputs(mlp, 16)))
    with pytest.raises(ValueError, match="strategies"):
        sim.cost(Strategy(mesh, (5,) + dp[1:], dp_inputs(mlp, 16)))
    with pytest.raises(ValueError, match="with_mesh"):
        sim.cost(Strategy(MeshSpec((8,), ("a",), tuple(range(7, -1, -1))), dp, dp_inputs(mlp, 16)))
    cost = sim.cost(Strategy(mesh, dp, dp_inputs(mlp, 16)))
    assert fits(cost, topo, mesh)
    assert not fits(cost, two_node_topology(memory=cost.peak_memory_bytes / 0.95), mesh)
    assert sim.with_mesh(MeshSpec((8,), ("a",), tuple(range(7, -1, -1)))).cost(
        Strategy(MeshSpec((8,), ("a",), tuple(range(7, -1, -1))), dp, dp_inputs(mlp, 16))).comm_bytes \
        == cost.comm_bytes


def test_carried_outputs_come_back_as_they_went_in():
    g = tag_jax.trace(lambda w: w * 2.0, S((64, 128), F32))
    mesh = MeshSpec((8,), ("a",), tuple(range(8)))
    w, out = g.inputs[0], g.outputs[0]
    k = g.ops[0].inputs.index(w)
    ins = [P()] * 2
    ins[k] = P("a", None)
    odd = OpStrategy("odd", tuple(ins), (P(None, "a"),))  # produces the result split on dim 1
    strategy = Strategy(mesh, (0,), (P("a", None),))
    assert simulate(g, ((odd,),), strategy, two_node_topology()).comm_bytes == 0
    sim = Simulator(g, ((odd,),), two_node_topology(), mesh, carried={out: w})
    cost = sim.cost(strategy)
    assert cost.comm_bytes_by_kind["all-to-all"] == 64 * 128 * 4 // 8 == cost.comm_bytes
    assert sim.incremental(strategy).time == pytest.approx(sim.cost(strategy, overlap=False).step_time_s)
    with pytest.raises(ValueError, match="graph outputs"):
        Simulator(g, ((odd,),), two_node_topology(), mesh, carried={w: out})


# ------------------------------------------------------------------------------------ against XLA
def _spec(ts):
    return jax.sharding.PartitionSpec(*ts.to_partition_spec())


@pytest.fixture(scope="module")
def cpu_mesh():
    from jax.sharding import AxisType
    return jax.make_mesh((2, 4), ("a", "b"), axis_types=(AxisType.Auto,) * 2)


@pytest.mark.parametrize("src,dst,expected", [r for r in RESHARDS if not r[1].partial],
                         ids=[f"{s}->{d}" for s, d, _ in RESHARDS if not d.partial])
def test_reshard_collectives_against_compiled_hlo(src, dst, expected, cpu_mesh):
    from jax.sharding import NamedSharding
    from tag_jax.hlo import collectives
    out = NamedSharding(cpu_mesh, _spec(dst))
    if src.partial:  # a matmul whose contracting dim is split over the partial axes
        k = src.partial if len(src.partial) > 1 else src.partial[0]
        lhs = NamedSharding(cpu_mesh, jax.sharding.PartitionSpec(src.dims[0] or None, k))
        rhs = NamedSharding(cpu_mesh, jax.sharding.PartitionSpec(k, None))
        f = jax.jit(lambda x, w: x @ w, in_shardings=(lhs, rhs), out_shardings=out)
        compiled = f.lower(S((64, 256), F32), S((256, 128), F32)).compile()
    else:
        # pinned as in an emitted program (a constrained copy; left to propagation, XLA slices
        # first where step 0c gathers the whole)
        f = jax.jit(lambda x: jax.lax.with_sharding_constraint(x, out) * 2,
                    in_shardings=NamedSharding(cpu_mesh, _spec(src)), out_shardings=out)
        compiled = f.lower(S((64, 128), F32)).compile()
    got = [(c.kind, c.bytes) for c in collectives(compiled)]
    predicted = reshard_collectives(src, dst, (64, 128), F32, MESH)
    if src == P(None, None, partial=("a", "b")) and dst == P(None, None):
        assert got == [("all-reduce", 64 * 128 * 4)]  # XLA: one all-reduce over all 8 devices
    assert got == [(c.kind, c.bytes) for c in predicted]


def test_data_parallel_prediction_matches_compiled_collectives(mlp, cpu_mesh):
    from jax.sharding import NamedSharding, PartitionSpec
    from tag_jax.hlo import collectives
    mesh = MeshSpec((8,), ("a",), tuple(range(8)))
    strats, dp = data_parallel(mlp, 16)
    cost = simulate(mlp, strats, Strategy(mesh, dp, dp_inputs(mlp, 16)), two_node_topology())
    flat = jax.make_mesh((8,), ("a",), axis_types=(jax.sharding.AxisType.Auto,))
    repl, batch = NamedSharding(flat, PartitionSpec()), NamedSharding(flat, PartitionSpec("a"))
    params = {"w1": S((8, 32), F32), "w2": S((32, 4), F32)}
    data = {"x": S((16, 8), F32), "y": S((16, 4), F32)}
    f = jax.jit(mlp_step, in_shardings=({"w1": repl, "w2": repl}, {"x": batch, "y": batch}),
                out_shardings={"w1": repl, "w2": repl})
    compiled = tag_jax.hlo.collective_bytes_by_kind(collectives(f.lower(params, data).compile()))
    assert {k: v for k, v in compiled.items() if v} == {k: v for k, v in cost.comm_bytes_by_kind.items() if v}


def test_unknown_mesh_axis_in_a_strategy_is_reported():
    g = matmul_graph(m=16, k=64, n=32)
    bad = OpStrategy("bad", (P("z", None), P(None, None)), (P("z", None),))
    with pytest.raises(ValueError, match="mesh axis 'z'"):
        Simulator(g, ((bad,),), two_node_topology(), MeshSpec((8,), ("a",), tuple(range(8))))


def test_free_slices_do_not_wait_for_the_network():
    # y = (x @ w) then z = y * 2 where the mul wants y split: a local slice, no collective
    g = tag_jax.trace(lambda x, w: (x @ w) * 2.0, S((16, 64), F32), S((64, 32), F32))
    mesh = MeshSpec((8,), ("a",), tuple(range(8)))
    dot = OpStrategy("R", (P(None, None), P(None, None)), (P(None, None),))
    mul_ins = [P(), P()]
    mul_ins[g.ops[1].inputs.index(g.ops[0].outputs[0])] = P("a", None)
    mul = OpStrategy("S", tuple(mul_ins), (P("a", None),))
    c = simulate(g, ((dot,), (mul,)), Strategy(mesh, (0, 0), (P(None, None), P(None, None))),
                 two_node_topology())
    assert c.comm_bytes == 0 and c.comm_s == 0
    assert c.step_time_s == pytest.approx(c.compute_s)


def test_unknown_mesh_axis_in_an_input_sharding_is_reported(mlp):
    mesh = MeshSpec((8,), ("a",), tuple(range(8)))
    strats, dp = data_parallel(mlp, 16)
    inputs = list(dp_inputs(mlp, 16))
    inputs[0] = TS((("q",), ()))
    with pytest.raises(ValueError, match="input 0 .* mesh axis 'q'"):
        Simulator(mlp, strats, two_node_topology(), mesh).cost(Strategy(mesh, dp, tuple(inputs)))


def test_partial_result_is_constrained_where_it_is_reduced():
    from tag_jax.cost.reshard import after_reduction
    # reduce-scatter over b, then the all-gather over a happens on the reduced piece
    assert after_reduction(P("a", None, partial="b"), P(None, "b")) == P("a", "b")
    # nothing but the reduction to do: the target itself
    assert after_reduction(P(None, None, partial="b"), P("b", None)) == P("b", None)
    assert after_reduction(P(None, None, partial="b"), P(None, None)) == P(None, None)


def test_fused_elementwise_chains_hold_no_memory():
    """XLA fuses sin -> mul -> add into one loop: only x, the constants and the result are buffers."""
    from tag_jax import rules
    g = tag_jax.trace(lambda x: jnp.sin(x) * 2.0 + 1.0, S((256, 64), F32))
    assert [op.primitive for op in g.ops] == ["sin", "mul", "add"]
    mesh = MeshSpec((2,), ("a",), (0, 1))
    strats = rules.for_graph(g, mesh.axes)
    const = sum(t.nbytes for t in g.tensors if t.producer is None and t.id not in g.inputs)
    c = simulate(g, strats, Strategy(mesh, (0, 0, 0), (P(None, None),)), two_node_topology())
    assert c.peak_memory_bytes == 2 * 256 * 64 * 4 + const


# 3-D and 2-D reshards where one axis changes dimension and a new axis takes a dimension: XLA's
# order of operations (read from compiled HLO; f32, 2x4 mesh a=2, b=4)
MOVES = [
    # the new axis lands where the moved one left: slice it onto the target dim, then swap
    (P("b", None), P("a", "b"), (64, 128), [("all-to-all", 4096), ("collective-permute", 4096)]),
    (P("b", None, None), P("a", None, "b"), (16, 32, 64), [("all-to-all", 16384),
                                                          ("collective-permute", 16384)]),
    (P(None, "b", None), P("b", "a", None), (16, 32, 64), [("all-to-all", 16384),
                                                          ("collective-permute", 16384)]),
    (P(None, None, "b"), P("b", None, "a"), (16, 32, 64), [("all-to-all", 16384),
                                                          ("collective-permute", 16384)]),
    # ... except from the last dim to the one before: all-to-all of the whole piece, then slice
    (P(None, "b"), P("b", "a"), (64, 128), [("all-to-all", 8192)]),
    (P(None, None, "b"), P(None, "b", "a"), (16, 32, 64), [("all-to-all", 32768)]),
    # the new axis on the third dim
    (P("b", None, None), P(None, "a", "b"), (16, 32, 64), [("all-to-all", 16384)]),
    (P(None, "b", None), P("b", None, "a"), (16, 32, 64), [("all-to-all", 32768)]),
    (P(None, None, "b"), P("b", "a", None), (16, 32, 64), [("all-to-all", 16384), ("all-to-all", 16384)]),
    (P("b", None, None), P(None, "b", "a"), (16, 32, 64), [("all-to-all", 16384), ("all-to-all", 16384)]),
]


@pytest.mark.parametrize("src,dst,shape,expected", MOVES, ids=[f"{s}->{d}" for s, d, _, _ in MOVES])
def test_moves_with_a_new_axis_match_compiled_hlo(src, dst, shape, expected, cpu_mesh):
    from jax.sharding import NamedSharding
    from tag_jax.hlo import collectives
    predicted = [(c.kind, c.bytes) for c in reshard_collectives(src, dst, shape, F32, MESH)]
    assert predicted == expected
    f = jax.jit(lambda x: x * 2, in_shardings=NamedSharding(cpu_mesh, _spec(src)),
                out_shardings=NamedSharding(cpu_mesh, _spec(dst)))
    got = [(c.kind, c.bytes) for c in collectives(f.lower(S(shape, F32)).compile())]
    assert got == expected


def test_partial_sums_are_reduced_at_each_root_at_its_size():
    """A position bias shared by 3 layers (t5): data parallel, each layer's bias gradient is a batch
    reduction (partial over devices); the strategy carries the sum through add_any, a reduction
    over the leading 1, a transpose and the gather's scatter-add into a (16, 4) table. XLA reduces
    each of the 3 (4, 16, 16) roots where it is made (a 256-byte table would be priced otherwise)."""
    from tag_jax import baselines, models
    from tag_jax.hlo import collective_bytes_by_kind, collectives
    H, L, B = 4, 16, 16

    def step(params, batch):
        def loss(p):
            idx = jnp.abs(jnp.arange(L)[:, None] - jnp.arange(L)[None, :])
            bias = jnp.transpose(p["table"][idx], (2, 0, 1))[None]
            h = batch["x"]
            for k in range(3):
                h = jnp.tanh(h + bias) * p["w"][k]
            return jnp.mean(h ** 2)
        g = jax.grad(loss)(params)
        return jax.tree.map(lambda a, b: a - 0.1 * b, params, g)

    params = {"table": S((L, H), F32), "w": S((3,), F32)}
    batch = {"x": S((B, H, L, L), F32)}
    mesh = jax.make_mesh((8,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))
    plan = baselines.data_parallel(step, mesh, topology=two_node_topology()).plan(params, batch)
    compiled = plan.jit(compiler_options=models.fast_compile_options()).lower(params, batch).compile()
    real = collective_bytes_by_kind(collectives(compiled))
    assert plan.cost.comm_bytes_by_kind["all-reduce"] == 3 * H * L * L * 4 + 3 * 4
    assert {k: v for k, v in plan.cost.comm_bytes_by_kind.items() if v} == {k: v for k, v in real.items() if v}


def test_partial_sum_wanted_twice_is_reduced_once(cpu_mesh):
    """y = x @ w with the contraction split, wanted as P(a, None) by one consumer and P(None, a) by
    the next: XLA reduce-scatters once towards the first and all-to-alls to the second."""
    from jax.sharding import NamedSharding, PartitionSpec as PS
    from tag_jax.hlo import collectives
    flat = jax.make_mesh((8,), ("a",), axis_types=(jax.sharding.AxisType.Auto,))
    mesh = MeshSpec((8,), ("a",), tuple(range(8)))
    g = tag_jax.trace(lambda x, w: _two_consumers(x @ w), S((64, 256), F32), S((256, 128), F32))
    dot, mul, add = g.ops
    assert (dot.primitive, mul.primitive, add.primitive) == ("dot_general", "mul", "add")
    strats = ((OpStrategy("k", (P(None, "a"), P("a", None)), (P(None, None, partial="a"),)),),
              (OpStrategy("row", (P("a", None), P()), (P("a", None),)),),
              (OpStrategy("col", (P(None, "a"), P()), (P(None, "a"),)),))
    cost = simulate(g, strats, Strategy(mesh, (0, 0, 0), (P(None, "a"), P("a", None))),
                    two_node_topology())
    predicted = {k: v for k, v in cost.comm_bytes_by_kind.items() if v}
    assert predicted == {"reduce-scatter": 64 * 128 * 4 // 8, "all-to-all": 64 * 128 * 4 // 8}
    ns = lambda *p: NamedSharding(flat, PS(*p))  # noqa: E731

    def f(x, w):
        y = x @ w
        return (jax.lax.with_sharding_constraint(y, ns("a", None)) * 2.0,
                jax.lax.with_sharding_constraint(y, ns(None, "a")) + 1.0)

    compiled = jax.jit(f, in_shardings=(ns(None, "a"), ns("a", None)),
                       out_shardings=(ns("a", None), ns(None, "a"))).lower(
        S((64, 256), F32), S((256, 128), F32)).compile()
    got = tag_jax.hlo.collective_bytes_by_kind(collectives(compiled))
    assert {k: v for k, v in got.items() if v} == predicted


def _two_consumers(y):
    return y * 2.0, y + 1.0


def test_root_of_another_shape_is_reduced_along_the_wanted_split():
    """An embedding lookup from a row-split table is a partial sum (each device has its rows); the
    strategy carries it through a reshape to a consumer wanting the batch split. XLA reduce-
    scatters the gathered (64, 2, 8) block along the batch (the recommender's tables), not an
    all-reduce of it followed by a slice."""
    from jax.sharding import NamedSharding, PartitionSpec as PS
    from tag_jax.hlo import collectives
    flat = jax.make_mesh((8,), ("a",), axis_types=(jax.sharding.AxisType.Auto,))
    ns = lambda *p: NamedSharding(flat, PS(*p))  # noqa: E731

    def f(table, ids):
        y = jnp.take(table, ids, axis=0).reshape(64, 16)
        return jax.lax.with_sharding_constraint(y, ns("a", None)) * 2.0

    args = (S((1024, 8), F32), S((64, 2), np.int32))
    g = tag_jax.trace(f, *args)
    mesh = MeshSpec((8,), ("a",), tuple(range(8)))
    strats = []
    for op in g.ops:
        ins = [TS.replicated(len(g.tensors[t].shape)) for t in op.inputs]
        outs = [TS.replicated(len(g.tensors[t].shape)) for t in op.outputs]
        if op.primitive == "gather":
            ins[0], outs[0] = P("a", None), P(None, None, None, partial="a")
        elif op.primitive == "reshape" and len(g.tensors[op.inputs[0]].shape) == 3:
            ins[0], outs[0] = P(None, None, None, partial="a"), P(None, None, partial="a")
        elif op.primitive in ("sharding_constraint", "mul"):
            ins[0], outs[0] = P("a", None), P("a", None)
        strats.append((OpStrategy("x", tuple(ins), tuple(outs)),))
    ins = (P("a", None), P(None, None))
    cost = simulate(g, tuple(strats), Strategy(mesh, (0,) * len(g.ops), ins), two_node_topology())
    assert {k: v for k, v in cost.comm_bytes_by_kind.items() if v} == {"reduce-scatter": 64 * 2 * 8 * 4 // 8}
    compiled = jax.jit(f, in_shardings=(ns("a", None), ns()), out_shardings=ns("a", None)).lower(*args).compile()
    got = tag_jax.hlo.collective_bytes_by_kind(collectives(compiled))
    assert got["reduce-scatter"] == 64 * 2 * 8 * 4 // 8 and got["all-reduce"] == 0


def test_a_layout_only_consumer_does_not_hold_the_compute_stream():
    """y = x.T @ x over a batch split x is a partial sum; its transpose wants it whole, so it is
    all-reduced there (as gpt2's weight gradients before Adam's square); the transposed value is
    read only at the end. XLA's scheduler places the
    transpose (and the all-reduce's end) just before that use: the independent chain in between
    runs meanwhile, so the step is about max(compute, comm), not their sum."""
    from tag_jax import rules
    from tag_jax.search.propagate import propagate

    def f(x, v):
        yt = (x.T @ x).T
        u = v
        for _ in range(6):
            u = jnp.tanh(u @ v)
        return yt ** 2 + u

    g = tag_jax.trace(f, S((64, 256), F32), S((256, 256), F32))
    mesh = MeshSpec((8,), ("a",), tuple(range(8)))
    ops = rules.for_graph(g, mesh.axes)
    ins = (P("a", None), P(None, None))
    choices = list(propagate(g, ops, mesh, ins))
    dot = next(op for op in g.ops if op.primitive == "dot_general")
    xt = g.tensors[dot.inputs[0]].producer  # x.T, split like x: no collective
    choices[xt] = next(k for k, o in enumerate(ops[xt]) if o.inputs[0] == P("a", None))
    made = ops[xt][choices[xt]].outputs[0]
    choices[dot.id] = next(k for k, o in enumerate(ops[dot.id])
                           if o.inputs == (made, P("a", None)) and o.outputs[0].partial == ("a",))
    transpose = next(op.id for op in g.ops if op.primitive == "transpose" and dot.outputs[0] in op.inputs)
    for k in range(dot.id + 1, len(g.ops)):  # the rest replicated: the partial sum is all-reduced
        choices[k] = 0                        # right before the transpose
    strategy = Strategy(mesh, tuple(choices), ins)
    topo = two_node_topology(fp32=(1e12,) * 8)  # the chain takes about as long as the all-reduce
    sim = Simulator(g, ops, topo, mesh)
    c = sim.cost(strategy)
    assert c.comm_bytes_by_kind["all-reduce"] == 256 * 256 * 4
    square = next(op.id for op in g.ops if op.primitive == "integer_pow")
    assert sim._wait_at()[transpose] == square  # waited for where the square needs it
    chain = sum(float(sim._comp[sim._sh["row_base"][op.id] + choices[op.id]])
                for op in g.ops if op.primitive in ("tanh", "dot_general") and op.id > transpose)
    assert 0.5 * c.comm_s < chain < 2 * c.comm_s
    # the all-reduce is hidden behind the chain (up to what is left of it or of the chain)
    assert c.step_time_s == pytest.approx(c.compute_s + c.comm_s - min(chain, c.comm_s), rel=0.05)
    assert c.step_time_s < c.compute_s + 0.5 * c.comm_s
