"""Reading compiled HLO: replica-group forms, the XLA:CPU reduce-scatter rewrite, and hand-sharded programs.

Expected groups and bytes are computed here by hand from shapes and meshes, never by the library.
"""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from tag_jax.hlo.compiled import (
    Collective, collective_bytes_by_kind, collectives, compiled_flops, compiled_memory)

F32 = 4
DEVS = np.array(jax.devices())


def mesh(devices, names):
    return Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))


def norm(groups):
    """Groups as a set-like canonical form (order inside a group and of groups ignored)."""
    return sorted(tuple(sorted(g)) for g in groups)


def hand_groups(shape, axes, names):
    """Mesh positions grouped by varying ``axes`` and fixing the others, by nested loops."""
    fixed = [i for i, n in enumerate(names) if n not in axes]
    groups = {}
    for pos in itertools.product(*(range(s) for s in shape)):
        lin = 0
        for p, s in zip(pos, shape):
            lin = lin * s + p
        groups.setdefault(tuple(pos[i] for i in fixed), []).append(lin)
    return norm(groups.values())


def module(*instrs, header="num_partitions=8", comps=""):
    body = "\n".join("  " + i for i in instrs)
    return (f"HloModule m, is_scheduled=true, {header}\n\n%add (a: f32[], b: f32[]) -> f32[] {{\n"
            "  %a = f32[] parameter(0)\n  %b = f32[] parameter(1)\n  ROOT %s = f32[] add(%a, %b)\n}\n\n"
            f"{comps}ENTRY %main (p: f32[64]) -> f32[64] {{\n  %p = f32[64]{{0}} parameter(0)\n{body}\n}}\n")


def one(text, **kw):
    colls = collectives(text, **kw)
    assert len(colls) == 1, colls
    return colls[0]


AR = "ROOT %ar = f32[64]{0} all-reduce(%p), channel_id=1, replica_groups=%s, use_global_device_ids=true, to_apply=%add"


# ----------------------------------------------------------------------------- literal replica-group forms


@pytest.mark.parametrize("groups_text, expected", [
    ("{{0,4},{1,5},{2,6},{3,7}}", ((0, 4), (1, 5), (2, 6), (3, 7))),
    ("{{0,1,2,3,4,5,6,7}}", ((0, 1, 2, 3, 4, 5, 6, 7),)),
    ("{}", ((0, 1, 2, 3, 4, 5, 6, 7),)),
    # iota: arange(8).reshape(2,4).T = [[0,4],[1,5],[2,6],[3,7]]
    ("[4,2]<=[2,4]T(1,0)", ((0, 4), (1, 5), (2, 6), (3, 7))),
    ("[2,4]<=[8]", ((0, 1, 2, 3), (4, 5, 6, 7))),
    # arange(8).reshape(2,2,2).transpose(0,2,1).ravel() = 0,2,1,3,4,6,5,7
    ("[4,2]<=[2,2,2]T(0,2,1)", ((0, 2), (1, 3), (4, 6), (5, 7))),
    # mesh, iota ids: ids[a,b] = 4a+b, vary b / vary a
    ("mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", ((0, 1, 2, 3), (4, 5, 6, 7))),
    ("mesh['axis_0'=2,'axis_1'=1,'axis_2'=4] {'axis_0'}", ((0, 4), (1, 5), (2, 6), (3, 7))),
    ("mesh['axis_0'=8] {'axis_0'}", ((0, 1, 2, 3, 4, 5, 6, 7),)),
    # mesh with ids [0,4,1,5,2,6,3,7] as [4,1,2]: column 0 is 0,1,2,3, column 1 is 4,5,6,7
    ("mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}",
     ((0, 1, 2, 3), (4, 5, 6, 7))),
    # ids 0,2,1,3,4,6,5,7 as [4,1,2]: columns 0,1,4,5 and 2,3,6,7
    ("mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,2,2]T(0,2,1)) {'axis_0'}",
     ((0, 1, 4, 5), (2, 3, 6, 7))),
    # two named axes: a group lists its members in the printed axis order (here 'b' major, 'a' minor)
    ("mesh['a'=2,'b'=4] {'b','a'}", ((0, 4, 1, 5, 2, 6, 3, 7),)),
    ("mesh['a'=2,'b'=4] {'a','b'}", ((0, 1, 2, 3, 4, 5, 6, 7),)),
    # sub-axis x:(1)2 of x=8: x = 4*s + r, vary s in [0,2): pairs (r, r+4)
    ("mesh['x'=8] {'x':(1)2}", ((0, 4), (1, 5), (2, 6), (3, 7))),
    # sub-axis x:(2)2 of x=8: x = 4*p + 2*s + r, vary s: (0,2),(1,3),(4,6),(5,7)
    ("mesh['x'=8] {'x':(2)2}", ((0, 2), (1, 3), (4, 6), (5, 7))),
    # two sub-axes x:(1)2, x:(4)2 of x=8 (= [2,2,2]): vary dims 0 and 2
    ("mesh['x'=8] {'x':(1)2,'x':(4)2}", ((0, 1, 4, 5), (2, 3, 6, 7))),
    # seen from XLA:CPU: rows of ids [4,2] are [0,2],[1,3],[4,6],[5,7]; axis_0 = 2*p + s, vary s
    ("mesh['axis_0'=4,'axis_1'=2], device_ids=([2,2,2]T(0,2,1)) {'axis_0':(2)2}",
     ((0, 1), (2, 3), (4, 5), (6, 7))),
])
def test_replica_group_forms(groups_text, expected):
    c = one(module(AR.replace("%s", groups_text)))
    assert c.groups == expected
    assert (c.kind, c.bytes, c.dtype, c.shape, c.name, c.computation) == ("all-reduce", 256, "f32", (64,), "ar", "main")
    assert c.fused_from is None and c.trip_count == 1


def test_empty_groups_need_a_device_count():
    text = module(AR.replace("%s", "{}"), header="is_scheduled=true")
    with pytest.raises(ValueError, match="'ar'.*num_devices"):
        collectives(text)
    assert one(text, num_devices=4).groups == ((0, 1, 2, 3),)


def test_unparseable_groups_name_the_instruction_and_text():
    with pytest.raises(ValueError, match=r"all-reduce 'ar' in computation 'main'.*replica_groups=\?\?"):
        collectives(module(AR.replace("%s", "??{0,1}")))


def test_stablehlo_is_refused():
    lowered = jax.jit(lambda a: a * 2).lower(jnp.ones(4))
    with pytest.raises(ValueError, match="StableHLO"):
        collectives(lowered.as_text())


def test_device_ids_map_to_physical_ids():
    c = one(module(AR.replace("%s", "{{0,1},{2,3}}")), device_ids=[7, 6, 5, 4])
    assert c.groups == ((7, 6), (5, 4))
    with pytest.raises(ValueError, match="device_ids"):
        collectives(module(AR.replace("%s", "{{0,1},{2,3}}")), device_ids=[0, 1])


def test_permute_tuples_and_async_pairs():
    text = module(
        "%cp = f32[64]{0} collective-permute(%p), channel_id=1, source_target_pairs={{0,1},{1,2},{2,0}}",
        "%a2a = (f32[2,4]{1,0}, f32[2,4]{1,0}, /*index=2*/bf16[2,4]{1,0}) all-to-all(%p, %p, %p), channel_id=2, "
        "replica_groups={{0,1,2}}",
        "%ags = (f32[8]{0}, f32[64]{0}) all-gather-start(%p), channel_id=3, replica_groups=[1,8]<=[8], "
        "dimensions={0}, use_global_device_ids=true",
        "%agd = f32[64]{0} all-gather-done(%ags)",
        "%ars = f32[64]{0} all-reduce-start(%p), channel_id=4, replica_groups={{0,1}}, to_apply=%add",
        "%ard = f32[64]{0} all-reduce-done(%ars)",
        "%cps = (f32[64]{0}, f32[64]{0}, u32[], u32[]) collective-permute-start(%p), channel_id=5, "
        "source_target_pairs={{0,4}}",
        "ROOT %cpd = f32[64]{0} collective-permute-done(%cps)")
    cs = collectives(text)
    got = [(c.kind, c.bytes, c.name, c.groups) for c in cs]
    assert got == [
        ("collective-permute", 256, "cp", ((0, 1), (1, 2), (2, 0))),
        ("all-to-all", 2 * 8 * F32 + 8 * 2, "a2a", ((0, 1, 2),)),
        ("all-gather", 256, "ags", (tuple(range(8)),)),
        ("all-reduce", 256, "ars", ((0, 1),)),
        ("collective-permute", 256, "cps", ((0, 4),)),
    ]
    assert cs[1].dtype == "f32,bf16" and cs[1].shape == ((2, 4), (2, 4), (2, 4))


WHILE_COMPS = """%inner (q: f32[64]) -> f32[64] {
  %q = f32[64]{0} parameter(0)
  ROOT %ag = f32[64]{0} all-reduce(%q), channel_id=1, replica_groups={{0,1}}, to_apply=%add
}

%cond (c: f32[64]) -> pred[] {
  %c = f32[64]{0} parameter(0)
  ROOT %t = pred[] constant(true)
}

%outer (o: f32[64]) -> f32[64] {
  %o = f32[64]{0} parameter(0)
  %w2 = f32[64]{0} while(%o), condition=%cond, body=%inner, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %ar2 = f32[64]{0} all-reduce(%w2), channel_id=2, replica_groups={{0,1}}, to_apply=%add
}

%unknown (u: f32[64]) -> f32[64] {
  %u = f32[64]{0} parameter(0)
  ROOT %ar3 = f32[64]{0} all-reduce(%u), channel_id=3, replica_groups={{0,1}}, to_apply=%add
}

"""


def test_trip_counts_of_nested_and_unknown_loops():
    text = module(
        '%w1 = f32[64]{0} while(%p), condition=%cond, body=%outer, backend_config={"known_trip_count":{"n":"5"}}',
        "ROOT %w3 = f32[64]{0} while(%w1), condition=%cond, body=%unknown", comps=WHILE_COMPS)
    cs = {c.name: c for c in collectives(text)}
    assert {n: (c.computation, c.trip_count) for n, c in cs.items()} == {
        "ag": ("inner", 15), "ar2": ("outer", 5), "ar3": ("unknown", 1)}
    assert all(c.bytes == 256 for c in cs.values())  # bytes are never multiplied
    assert collective_bytes_by_kind(cs.values()) == {
        "all-reduce": 256 * (15 + 5 + 1), "all-gather": 0, "reduce-scatter": 0, "all-to-all": 0,
        "collective-permute": 0}


# ----------------------------------------------------------------------------- reduce-scatter rewrite (literal)

# What XLA:CPU 0.10.2 prints for jit(sum over a 'b'-sharded batch, out P('b')) on a 2x4 ('a','b') mesh.
RS_FUSION = """%fused (param_0: f32[64], param_1: u32[8], param_2: u32[]) -> f32[16] {
  %param_0 = f32[64]{0} parameter(0)
  %lo = u32[1]{0} constant({0})
  %param_1 = u32[8]{0} parameter(1)
  %param_2 = u32[] parameter(2)
  %ds.4 = u32[1]{0} dynamic-slice(%param_1, %param_2), dynamic_slice_sizes={1}
  %hi = u32[1]{0} constant({3})
  %clamp = u32[1]{0} clamp(%lo, %ds.4, %hi)
  %convert = s32[1]{0} convert(%clamp)
  %c16 = s32[1]{0} constant({16})
  %mul = s32[1]{0} multiply(%convert, %c16)
  %bitcast = s32[] bitcast(%mul)
  ROOT %ds.3 = f32[16]{0} dynamic-slice(%param_0, %bitcast), dynamic_slice_sizes={16}
}

"""
RS_GROUPS = "mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}"
RS_AR = f"%all-reduce = f32[64]{{0}} all-reduce(%p), channel_id=1, replica_groups={RS_GROUPS}, to_apply=%add"


def test_reduce_scatter_rewrite_through_fusion_and_table_lookup():
    text = module("%pid = u32[] partition-id()", "%table = u32[8]{0} constant({0, 1, 2, 3, 0, 1, 2, 3})",
                  RS_AR, "ROOT %f = f32[16]{0} fusion(%all-reduce, %table, %pid), kind=kLoop, calls=%fused",
                  comps=RS_FUSION)
    c = one(text)
    assert (c.kind, c.bytes, c.shape, c.fused_from) == ("reduce-scatter", 16 * F32, (16,), "all-reduce+dynamic-slice")
    assert c.groups == ((0, 1, 2, 3), (4, 5, 6, 7)) and c.name == "all-reduce"


def test_reduce_scatter_rewrite_through_bitcast_in_entry():
    text = module("%pid = u32[] partition-id()", "%off = s32[] convert(%pid)",
                  "%ar = f32[64]{0} all-reduce(%p), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add",
                  "%bc = f32[8,8]{1,0} bitcast(%ar)", "%z = s32[] constant(0)",
                  "ROOT %ds = f32[1,8]{1,0} dynamic-slice(%bc, %off, %z), dynamic_slice_sizes={1,8}")
    c = one(text)
    assert (c.kind, c.bytes, c.shape) == ("reduce-scatter", 32, (1, 8))


@pytest.mark.parametrize("why, instrs", [
    ("also used whole", ["%pid = u32[] partition-id()", "%off = s32[] convert(%pid)", AR.replace("ROOT ", "").replace(
        "%s", "{{0,1,2,3,4,5,6,7}}"), "%ds = f32[8]{0} dynamic-slice(%ar, %off), dynamic_slice_sizes={8}",
        "ROOT %t = (f32[8]{0}, f32[64]{0}) tuple(%ds, %ar)"]),
    ("slice is not 1/n", ["%pid = u32[] partition-id()", "%off = s32[] convert(%pid)", AR.replace("ROOT ", "").replace(
        "%s", "{{0,1,2,3,4,5,6,7}}"), "ROOT %ds = f32[16]{0} dynamic-slice(%ar, %off), dynamic_slice_sizes={16}"]),
    ("offset not from the device id", ["%off = s32[] constant(3)", AR.replace("ROOT ", "").replace(
        "%s", "{{0,1,2,3,4,5,6,7}}"), "ROOT %ds = f32[8]{0} dynamic-slice(%ar, %off), dynamic_slice_sizes={8}"]),
])
def test_all_reduce_that_is_not_a_reduce_scatter(why, instrs):
    c = one(module(*instrs))
    assert (c.kind, c.bytes, c.fused_from) == ("all-reduce", 256, None), why


# ----------------------------------------------------------------------------- real programs: group forms

MESHES = {  # name: (devices, axis names)
    "1d": (DEVS, ("x",)),
    "2x4": (DEVS.reshape(2, 4), ("a", "b")),
    "4x2-permuted": (DEVS.reshape(4, 2).T, ("a", "b")),
    "2x2x2": (DEVS.reshape(2, 2, 2), ("a", "b", "c")),
    "2x2x2-permuted": (DEVS[[0, 2, 4, 6, 1, 3, 5, 7]].reshape(2, 2, 2), ("a", "b", "c")),
}
CASES = [(m, axes) for m, (d, names) in MESHES.items()
         for r in range(1, len(names) + 1) for axes in itertools.combinations(names, r)]


@pytest.mark.parametrize("mesh_name, axes", CASES)
def test_real_groups_jit_and_shard_map_agree_with_hand(mesh_name, axes):
    devices, names = MESHES[mesh_name]
    m = mesh(devices, names)
    expected = hand_groups(devices.shape, axes, names)  # logical ids: positions in the mesh
    x = jnp.ones((16, 64))
    rest = tuple(n for n in names if n not in axes)
    jitted = jax.jit(lambda a: a.sum(0), in_shardings=NamedSharding(m, P(axes)),
                     out_shardings=NamedSharding(m, P()))
    sm = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, axes), mesh=m, in_specs=P(names),
                               out_specs=P(rest or None), check_vma=False))
    for f in (jitted, sm):
        c = one(f.lower(x).compile())
        assert c.kind == "all-reduce" and norm(c.groups) == expected
    c = one(jitted.lower(x).compile())
    assert c.bytes == 64 * F32 and c.shape == (64,)
    physical = one(jitted.lower(x).compile(), device_ids=[d.id for d in devices.flat])
    assert norm(physical.groups) == norm([[devices.flat[i].id for i in g] for g in expected])


def test_real_texts_use_the_mesh_and_iota_forms():
    m = mesh(DEVS.reshape(2, 4), ("a", "b"))
    f = jax.jit(lambda a: a.sum(0), in_shardings=NamedSharding(m, P("b")), out_shardings=NamedSharding(m, P()))
    assert "device_ids=([2,4]T(1,0)) {'axis_0'}" in f.lower(jnp.ones((16, 64))).compile().as_text()
    # re-sharding rows from 'b' to 'a': XLA:CPU permutes, then all-gathers pairs inside each 'a' row
    g = jax.jit(lambda a: a + 1, in_shardings=NamedSharding(m, P("b")), out_shardings=NamedSharding(m, P("a")))
    compiled = g.lower(jnp.ones((16, 32))).compile()
    assert "replica_groups=[4,2]<=[2,2,2]T(0,2,1)" in compiled.as_text()
    kinds = {c.kind: c for c in collectives(compiled)}
    assert kinds["all-gather"].groups == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert kinds["all-gather"].bytes == 8 * 32 * F32  # 16 rows over 'a'=2, 32 cols
    assert kinds["collective-permute"].bytes == 4 * 32 * F32
    assert sorted(s for s, _ in kinds["collective-permute"].groups) == list(range(8))


def test_real_sub_axis_all_to_all():
    m = mesh(DEVS.reshape(2, 4), ("a", "b"))
    f = jax.jit(lambda a: a * 2, in_shardings=NamedSharding(m, P("a", "b")), out_shardings=NamedSharding(m, P("b", "a")))
    compiled = f.lower(jnp.ones((16, 32))).compile()
    assert "{'axis_0':(2)2}" in compiled.as_text()
    a2a = [c for c in collectives(compiled) if c.kind == "all-to-all"]
    assert len(a2a) == 1
    assert a2a[0].groups == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert a2a[0].bytes == 16 * 32 // 8 * F32  # every device sends/receives its whole 8x8 block


def test_real_reduce_scatters():
    m = mesh(DEVS.reshape(2, 4), ("a", "b"))
    sm = jax.jit(jax.shard_map(lambda a: jax.lax.psum_scatter(a, "b", tiled=True), mesh=m,
                               in_specs=P(), out_specs=P("b"), check_vma=False))
    c = one(sm.lower(jnp.ones((16, 32))).compile())  # a native reduce-scatter
    assert (c.kind, c.bytes, c.fused_from) == ("reduce-scatter", 4 * 32 * F32, None)
    assert c.groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    jitted = jax.jit(lambda a: a.sum(0), in_shardings=NamedSharding(m, P("b")), out_shardings=NamedSharding(m, P("b")))
    c = one(jitted.lower(jnp.ones((16, 64))).compile())  # all-reduce + dynamic-slice on XLA:CPU
    assert (c.kind, c.bytes, c.shape, c.fused_from) == ("reduce-scatter", 64 // 4 * F32, (16,), "all-reduce+dynamic-slice")
    assert norm(c.groups) == [(0, 1, 2, 3), (4, 5, 6, 7)]


def test_real_scan_reports_trip_count():
    m = mesh(DEVS, ("x",))

    def body(c, xi):
        g = jax.lax.with_sharding_constraint(jnp.tanh(xi @ c).T @ xi, NamedSharding(m, P()))
        return c + 0.1 * g.T, None

    f = jax.jit(lambda w, xs: jax.lax.scan(body, w, xs)[0],
                in_shardings=(NamedSharding(m, P()), NamedSharding(m, P(None, "x"))))
    cs = collectives(f.lower(jnp.ones((32, 32)), jnp.ones((5, 16, 32))).compile())
    assert [(c.kind, c.bytes, c.trip_count) for c in cs] == [("all-reduce", 32 * 32 * F32, 5)]
    assert collective_bytes_by_kind(cs)["all-reduce"] == 5 * 32 * 32 * F32


# ----------------------------------------------------------------------------- hand-sharded training steps

IN, HID, OUT, BATCH = 16, 32, 8, 64
PARAMS = {"w1": (IN, HID), "b1": (HID,), "w2": (HID, OUT), "b2": (OUT,)}


def mlp_loss(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)


def sgd_step(p, x, y):
    loss, g = jax.value_and_grad(mlp_loss)(p, x, y)
    return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), loss


def mlp_args():
    return ({k: jnp.ones(s) for k, s in PARAMS.items()}, jnp.ones((BATCH, IN)), jnp.ones((BATCH, OUT)))


def element_bytes(c):
    shapes = c.shape if c.shape and isinstance(c.shape[0], tuple) else (c.shape,)
    return sorted(math.prod(s) * F32 for s in shapes)


def test_data_parallel_all_reduces_each_gradient():
    m = mesh(DEVS, ("dp",))
    rep, batch = NamedSharding(m, P()), NamedSharding(m, P("dp"))
    f = jax.jit(sgd_step, in_shardings=(rep, batch, batch), out_shardings=(rep, rep))
    cs = collectives(f.lower(*mlp_args()).compile())
    grads = sorted(math.prod(s) * F32 for s in PARAMS.values())
    expected = sorted(grads + [F32])  # every gradient whole, and the scalar loss
    assert {c.kind for c in cs} == {"all-reduce"}
    assert sorted(b for c in cs for b in element_bytes(c)) == expected
    assert collective_bytes_by_kind(cs) == {"all-reduce": sum(expected), "all-gather": 0, "reduce-scatter": 0,
                                            "all-to-all": 0, "collective-permute": 0}
    assert all(c.groups == (tuple(range(8)),) for c in cs)


def test_fsdp_gathers_params_and_reduce_scatters_grads():
    m = mesh(DEVS, ("fsdp",))
    shard, rep = NamedSharding(m, P("fsdp")), NamedSharding(m, P())
    params = {k: shard for k in PARAMS}
    f = jax.jit(sgd_step, in_shardings=(params, shard, shard), out_shardings=(params, rep))
    cs = collectives(f.lower(*mlp_args()).compile())
    full = sorted(math.prod(s) * F32 for s in PARAMS.values())
    by_kind = {k: [c for c in cs if c.kind == k] for k in ("all-gather", "reduce-scatter", "all-reduce")}
    assert sorted(b for c in by_kind["all-gather"] for b in element_bytes(c)) == full
    assert sorted(b for c in by_kind["reduce-scatter"] for b in element_bytes(c)) == sorted(b // 8 for b in full)
    assert all(c.fused_from == "all-reduce+dynamic-slice" for c in by_kind["reduce-scatter"])
    assert [c.bytes for c in by_kind["all-reduce"]] == [F32]  # the loss
    assert collective_bytes_by_kind(cs) == {"all-gather": sum(full), "reduce-scatter": sum(full) // 8,
                                            "all-reduce": F32, "all-to-all": 0, "collective-permute": 0}
    assert all(c.groups == (tuple(range(8)),) for c in cs)


@pytest.mark.parametrize("devices", [DEVS.reshape(2, 4), DEVS.reshape(4, 2).T], ids=["iota", "permuted"])
def test_megatron_all_reduces_activations_over_model_axis(devices):
    m = mesh(devices, ("data", "model"))
    S = lambda *s: NamedSharding(m, P(*s))  # noqa: E731
    d, h, b = 16, 64, 8

    def fwd(w1, w2, x):  # column-parallel then row-parallel linear
        return jax.nn.relu(x @ w1) @ w2

    model_groups = hand_groups((2, 4), ("model",), ("data", "model"))
    data_groups = hand_groups((2, 4), ("data",), ("data", "model"))
    ids = [dev.id for dev in devices.flat]

    f = jax.jit(fwd, in_shardings=(S(None, "model"), S("model", None), S("data", None)), out_shardings=S("data", None))
    compiled = f.lower(jnp.ones((d, h)), jnp.ones((h, d)), jnp.ones((b, d))).compile()
    c = one(compiled)
    assert (c.kind, c.bytes, c.shape) == ("all-reduce", b // 2 * d * F32, (b // 2, d))
    assert norm(c.groups) == model_groups
    assert norm(one(compiled, device_ids=ids).groups) == norm([[ids[i] for i in g] for g in model_groups])

    def step(params, x, y):
        loss, g = jax.value_and_grad(lambda p: jnp.mean((fwd(*p, x) - y) ** 2))(params)
        return jax.tree.map(lambda a, gr: a - 0.1 * gr, params, g), loss

    ps = (S(None, "model"), S("model", None))
    f = jax.jit(step, in_shardings=(ps, S("data", None), S("data", None)), out_shardings=(ps, S()))
    cs = collectives(f.lower((jnp.ones((d, h)), jnp.ones((h, d))), jnp.ones((b, d)), jnp.ones((b, d))).compile())
    over_model = [c for c in cs if norm(c.groups) == model_groups]
    over_data = [c for c in cs if norm(c.groups) == data_groups]
    assert len(over_model) + len(over_data) == len(cs) and {c.kind for c in cs} == {"all-reduce"}
    assert sum(c.bytes for c in over_model) == b // 2 * d * F32  # the forward activation, once
    # weight-gradient shards (each weight split 4 ways over 'model') summed over 'data', and the loss
    assert sorted(x for c in over_data for x in element_bytes(c)) == [F32, d * h // 4 * F32, h * d // 4 * F32]


# ----------------------------------------------------------------------------- flops and memory


def test_compiled_flops_per_device_and_ignoring_trip_counts():
    m = mesh(DEVS, ("x",))
    S = lambda *s: NamedSharding(m, P(*s))  # noqa: E731
    f = jax.jit(lambda a, b: a @ b, in_shardings=(S("x"), S()), out_shardings=S("x"))
    assert compiled_flops(f.lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile()) == 2 * (64 // 8) * 32 * 16

    def loop(w, xs):
        return jax.lax.scan(lambda c, x: (c @ x, None), w, xs)[0]

    two, five = (compiled_flops(jax.jit(loop).lower(jnp.ones((32, 32)), jnp.ones((n, 32, 32))).compile())
                 for n in (2, 5))
    assert two == five and 2 * 32 ** 3 <= five < 2 * 2 * 32 ** 3  # one body's worth, whatever the trip count


class _FakeCompiled:
    def __init__(self, ca):
        self.ca = ca

    def cost_analysis(self):
        return self.ca


def test_compiled_flops_accepts_lists_and_says_when_missing():
    assert compiled_flops(_FakeCompiled([{"flops": 3.0}, {"flops": 4.0}])) == 7.0
    # Only transcendentals: XLA omits the key, which means zero FLOPs.
    assert compiled_flops(_FakeCompiled({"transcendentals": 10.0, "bytes accessed": 8.0})) == 0.0
    with pytest.raises(ValueError, match="reported nothing"):
        compiled_flops(_FakeCompiled([{}]))


def test_compiled_memory():
    m = mesh(DEVS, ("x",))
    S = lambda *s: NamedSharding(m, P(*s))  # noqa: E731
    f = jax.jit(lambda a, b: a @ b, in_shardings=(S("x"), S()), out_shardings=S("x"))
    mem = compiled_memory(f.lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile())
    assert mem["argument"] == (8 * 32 + 32 * 16) * F32 and mem["output"] == 8 * 16 * F32 and mem["alias"] == 0
    assert mem["peak"] == mem["argument"] + mem["output"] + mem["temp"]
    g = jax.jit(lambda a: a * 2, donate_argnums=0, in_shardings=S("x"), out_shardings=S("x"))
    mem = compiled_memory(g.lower(jnp.ones((64, 32))).compile())
    assert mem["argument"] == mem["output"] == mem["alias"] == 8 * 32 * F32
    assert mem["peak"] == 8 * 32 * F32 + mem["temp"]
    assert set(mem) >= {"argument", "output", "temp", "alias", "generated_code", "peak"}


def test_collective_is_frozen():
    c = Collective("all-reduce", 4, "f32", (), ((0, 1),), "ar", "main")
    with pytest.raises(Exception):
        c.bytes = 8
