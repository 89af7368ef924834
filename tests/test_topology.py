"""Topology: presets, JSON, detection, and collective times against hand-computed alpha-beta values.

Expected times are written out with the preset's literal figures (from REFERENCE.md), not computed
with the library's helpers, so a wrong formula or a wrong figure fails.
"""
import json
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from tag_jax.topology import Device, Link, Topology, TopologyError
from tag_jax.topology.hardware import match_kind

EXPECTED_PRESETS = {  # name: (devices, node sizes)
    "1x8-a100-nvlink": (8, [8]),
    "2x4-v100-25gbe": (8, [4, 4]),
    "2x8-v100-p3": (16, [8, 8]),
    "tag-hetero": (8, [2, 4, 2]),
    "tag-hetero-16": (16, [4, 8, 4]),
    "tpu-v4-2x2x2": (8, [8]),
    "4xa100-4xv100": (8, [4, 4]),
    "8x8-a100-ib": (64, [8] * 8),
    "32x8-h100-ib": (256, [8] * 32),
}

SAMPLE = {
    "name": "sample",
    "devices": [{"kind": "v100", "flops": 1.25e14, "memory": 1.6e10, "node": k // 4}
                for k in range(8)],
    "intra_node": {"bandwidth": 1.5e11, "latency": 2e-6},
    "inter_node": {"bandwidth": 3.125e9, "latency": 1e-5},
}


# ---- presets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_preset_device_count_and_nodes(name):
    t = Topology.preset(name)
    count, sizes = EXPECTED_PRESETS[name]
    assert t.num_devices == count
    assert [len(g) for g in t.nodes] == sizes
    assert t.ids == tuple(range(count))
    assert [i for g in t.nodes for i in g] == list(range(count))  # nodes hold consecutive ids
    assert name in t.summary()


def test_presets_listing_and_unknown_name():
    listing = Topology.presets()
    assert set(EXPECTED_PRESETS) <= set(listing)
    assert all(isinstance(d, str) and d for d in listing.values())
    with pytest.raises(TopologyError, match="unknown topology preset 'dgx'.*2x4-v100-25gbe"):
        Topology.preset("dgx")


def test_preset_figures_are_vendor_dense_peaks():
    h = Topology.preset("32x8-h100-ib").device(255)
    assert (h.kind, h.flops, h.flops_fp32, h.memory, h.node) == ("h100", 989e12, 67e12, 80e9, 31)
    t = Topology.preset("tag-hetero-16")
    assert [t.device(i).kind for i in (0, 4, 12)] == ["v100", "1080ti", "p100"]
    assert t.device_flops(0) == 125e12 and t.device_memory(4) == 11e9
    assert t.link(0, 1) == Link(20e9, 5e-6)   # V100 machine on fast PCIe
    assert t.link(4, 5) == Link(8e9, 5e-6)    # 1080Ti machine on slow PCIe
    assert t.link(0, 4).bandwidth == 2.81e9   # between machines


def test_hashable_fingerprint_and_matrix():
    a, b = Topology.preset("tag-hetero"), Topology.preset("tag-hetero")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != Topology.preset("2x4-v100-25gbe").fingerprint()
    m = a.bandwidth_matrix()
    assert m.shape == (8, 8) and np.array_equal(m, m.T) and np.all(np.diag(m) == 0)
    assert (m[0, 1], m[2, 3], m[0, 2], m[5, 7]) == (20e9, 8e9, 2.81e9, 2.81e9)


def test_subset_keeps_ids_and_nodes():
    t = Topology.preset("2x4-v100-25gbe")
    s = t.subset([5, 1, 4])
    assert s.ids == (5, 1, 4) and s.nodes == ((1,), (5, 4))
    assert s.link(5, 1) == t.inter_node and s.link(5, 4) == t.intra_node
    with pytest.raises(TopologyError, match=r"device id 0 is not in topology .*3 devices"):
        s.link(0, 1)
    sub = Topology.preset("tag-hetero").subset([2, 3])
    assert sub.link(2, 3) == Link(8e9, 5e-6)  # per-pair override survives


# ---- JSON ----------------------------------------------------------------------------------------
def test_sample_json_parses_with_known_kind_defaults():
    t = Topology.from_json(SAMPLE)
    assert t.num_devices == 8 and t.nodes == ((0, 1, 2, 3), (4, 5, 6, 7))
    d = t.device(3)
    assert (d.kind, d.flops, d.flops_fp32, d.memory, d.memory_bandwidth) == (
        "v100", 1.25e14, 15.7e12, 1.6e10, 900e9)
    assert t.link(0, 3) == Link(1.5e11, 2e-6) and t.link(3, 4) == Link(3.125e9, 1e-5)


def test_json_links_override_and_torus():
    d = dict(SAMPLE, links=[{"a": 0, "b": 5, "bandwidth": 2.5e10, "latency": 3e-6}])
    t = Topology.from_json(d)
    assert t.link(5, 0) == Link(2.5e10, 3e-6) and t.link(1, 5) == Link(3.125e9, 1e-5)
    tpu = Topology.from_json({"devices": [{"kind": "TPU v4"}] * 8, "torus": {"shape": [2, 2, 2]},
                              "intra_node": {"bandwidth": 5e10, "latency": 1e-6}})
    assert tpu.device(5).coords == (1, 0, 1) and tpu.device(0).kind == "tpu-v4"
    assert tpu.link(0, 7) == Link(5e10, 3e-6)  # 3 hops


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_json_round_trip(name, tmp_path):
    t = Topology.preset(name)
    assert Topology.from_json(t.to_json()) == t
    path = tmp_path / "topo.json"
    t.to_json(path)
    back = Topology.from_json(path)
    assert back == t and back.fingerprint() == t.fingerprint()
    assert json.loads(path.read_text())["name"] == name


def _bad(**change):
    d = json.loads(json.dumps(SAMPLE))
    for key, value in change.items():
        d[key] = value
    return d


@pytest.mark.parametrize("make, message", [
    (lambda d: d["devices"][3].update(memory=-1),
     "devices[3].memory: expected a positive number of bytes, got -1"),
    (lambda d: d["devices"][2].update(kind="mystery", flops=None),
     "devices[2].flops: expected a positive number of FLOP/s, got None"),
    (lambda d: d["devices"][6].update(kind="mystery"),
     "devices[6].memory_bandwidth: missing, and kind 'mystery' is not a known kind"),
    (lambda d: d["devices"][1].update(node=-2),
     "devices[1].node: expected a whole number >= 0, got -2"),
    (lambda d: d["devices"][4].update(memroy=1),
     "devices[4]: unknown key 'memroy'"),
    (lambda d: d["devices"][7].update(id=0),
     "devices[7].id: id 0 is already used by devices[0]"),
    (lambda d: d.update(links=[{"a": 0, "b": 9, "bandwidth": 1e9, "latency": 0}]),
     "links[0].b: expected a device id (one of [0, 1, 2, 3, 4, 5, 6, 7]), got 9"),
    (lambda d: d.pop("inter_node"),
     "inter_node: expected an object like"),
    (lambda d: d["intra_node"].update(latency=-1e-6),
     "intra_node.latency: expected a number of seconds >= 0, got -1e-06"),
    (lambda d: d.update(torus={"shape": [2, 3]}),
     "torus shape [2, 3] holds 6 devices but node 0 has 4; give each device its 'coords'"),
    (lambda d: d.update(devices=[]),
     "devices: expected a non-empty list"),
])
def test_bad_json_names_field_and_device(make, message):
    d = json.loads(json.dumps(SAMPLE))
    make(d)
    with pytest.raises(TopologyError) as info:
        Topology.from_json(d)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_file_names_the_path(tmp_path):
    path = tmp_path / "cluster.json"
    d = json.loads(json.dumps(SAMPLE))
    d["devices"][3]["memory"] = -1
    path.write_text(json.dumps(d))
    with pytest.raises(TopologyError, match=r"cluster\.json: devices\[3\]\.memory"):
        Topology.from_json(path)
    path.write_text("{not json")
    with pytest.raises(TopologyError, match="cluster.json is not valid JSON"):
        Topology.from_json(str(path))


# ---- collectives ---------------------------------------------------------------------------------
A100 = Topology.preset("1x8-a100-nvlink")     # NVLink 3: 300e9 B/s per direction, 2e-6 s
V100X2 = Topology.preset("2x4-v100-25gbe")    # NVLink 2: 150e9, 2e-6; 25 GbE: 3.125e9, 30e-6
TPU = Topology.preset("tpu-v4-2x2x2")         # ICI: 50e9, 1e-6 per hop


def test_intra_node_ring_closed_forms():
    g = range(8)
    assert A100.collective_time("all-reduce", 1e9, g) == pytest.approx(
        14 * (2e-6 + 1e9 / (8 * 300e9)), rel=1e-12)
    assert A100.collective_time("all-gather", 8e8, g) == pytest.approx(
        7 * (2e-6 + 8e8 / (8 * 300e9)), rel=1e-12)
    assert A100.collective_time("reduce-scatter", 1e8, g) == pytest.approx(
        7 * (2e-6 + 1e8 / 300e9), rel=1e-12)
    assert A100.collective_time("all-to-all", 8e8, g) == pytest.approx(
        7 * (2e-6 + 1e8 / 300e9), rel=1e-12)
    assert A100.collective_time("permute", 1e8, g) == pytest.approx(2e-6 + 1e8 / 300e9, rel=1e-12)
    assert A100.collective_time("all_reduce", 1e9, [0, 1]) == pytest.approx(
        2 * (2e-6 + 1e9 / (2 * 300e9)), rel=1e-12)
    assert A100.collective_time("all-reduce", 1e9, [3]) == 0.0
    assert A100.collective_time("all-gather", 0, g) == 0.0


def test_cross_node_all_reduce_is_hierarchical():
    S = 1e8
    # reduce-scatter in each node (k=4) + all-reduce across m=2 nodes on S/4, four rings sharing
    # one 25 GbE NIC per node (3.125e9 / 4 each) + all-gather in each node
    inside = 3 * (2e-6 + S / (4 * 150e9))
    across = 2 * 1 * (30e-6 + (S / 4) / (2 * (3.125e9 / 4)))
    expected = inside + across + inside
    assert expected < 14 * (30e-6 + S / (8 * 3.125e9))  # beats the flat ring over 25 GbE
    assert V100X2.collective_time("all-reduce", S, range(8)) == pytest.approx(expected, rel=1e-12)
    # all-gather: across nodes on S/4, then inside nodes on S
    assert V100X2.collective_time("all-gather", S, range(8)) == pytest.approx(
        1 * (30e-6 + (S / 4) / (2 * 3.125e9 / 4)) + 3 * (2e-6 + S / (4 * 150e9)), rel=1e-12)
    # reduce-scatter to shard s: inside nodes to shard 2s, then across nodes to s
    s = 1e7
    assert V100X2.collective_time("reduce-scatter", s, range(8)) == pytest.approx(
        3 * (2e-6 + 2 * s / 150e9) + 1 * (30e-6 + s / (3.125e9 / 4)), rel=1e-12)
    # one NIC per GPU (8x8-a100-ib, HDR 25e9, 5e-6): the 8 cross-node rings do not share
    ib = Topology.preset("8x8-a100-ib")
    inside = 7 * (2e-6 + S / (8 * 300e9))
    across = 2 * 1 * (5e-6 + (S / 8) / (2 * 25e9))
    assert ib.collective_time("all-reduce", S, range(16)) == pytest.approx(
        2 * inside + across, rel=1e-12)


def test_uneven_groups_fall_back_to_the_flat_ring():
    t = Topology.preset("tag-hetero")  # 2 + 4 + 2 devices, 2.81e9 and 30e-6 between machines
    assert t.collective_time("all-reduce", 1e8, range(8)) == pytest.approx(
        14 * (30e-6 + 1e8 / (8 * 2.81e9)), rel=1e-12)
    # within the 1080Ti machine: its own 8e9 PCIe link
    assert t.collective_time("all-gather", 4e8, [2, 3, 4, 5]) == pytest.approx(
        3 * (5e-6 + 4e8 / (4 * 8e9)), rel=1e-12)


def test_device_order_matters_across_nodes():
    natural, interleaved = (0, 1, 2, 3, 4, 5, 6, 7), (0, 4, 1, 5, 2, 6, 3, 7)
    assert V100X2.ring_bandwidth(natural) == 3.125e9
    assert V100X2.ring_bandwidth(interleaved) == 3.125e9 / 4  # 4 hops share each node's NIC
    assert V100X2.ring_bandwidth([0, 1, 2, 3]) == 150e9
    assert V100X2.collective_time("permute", 1e8, interleaved) == pytest.approx(
        30e-6 + 1e8 / (3.125e9 / 4), rel=1e-12)


def test_all_to_all_across_nodes_is_bounded_by_the_nic():
    S = 1e8  # each node pushes 4 devices x S x 4/8 through one 3.125e9 NIC
    assert V100X2.collective_time("all-to-all", S, range(8)) == pytest.approx(
        30e-6 + 4 * S * 4 / (8 * 3.125e9), rel=1e-12)


def test_torus_bidirectional_rings_per_dimension():
    S = 1e9
    # all 8 chips: three dimensions of 2, 2 * (1+1+1) latency steps, (n-1)/n S / B
    assert TPU.collective_time("all-reduce", S, range(8)) == pytest.approx(
        6 * 1e-6 + 7 / 8 * S / 50e9, rel=1e-12)
    # chips 0,1 differ in the last coordinate only: one dimension of 2
    assert TPU.collective_time("all-reduce", S, [0, 1]) == pytest.approx(
        2 * 1e-6 + 1 / 2 * S / 50e9, rel=1e-12)
    # chips 0..3 fill a 2x2 plane
    assert TPU.collective_time("all-gather", S, [0, 1, 2, 3]) == pytest.approx(
        2 * 1e-6 + 3 / 4 * S / (2 * 50e9), rel=1e-12)
    assert TPU.collective_time("reduce-scatter", S / 8, range(8)) == pytest.approx(
        3 * 1e-6 + 7 * (S / 8) / (2 * 50e9), rel=1e-12)
    # chips 0,1,2 fill no dimension: flat ring 0->1 (1 hop), 1->2 (2 hops), 2->0 (1 hop)
    assert TPU.collective_time("all-reduce", S, [0, 1, 2]) == pytest.approx(
        4 * (2e-6 + S / (3 * 50e9)), rel=1e-12)


def test_collective_errors_name_the_problem():
    with pytest.raises(TopologyError, match="unknown collective kind 'allreduce'.*all-reduce"):
        A100.collective_time("allreduce", 1.0, [0, 1])
    with pytest.raises(TopologyError, match=r"device id 9 is not in topology '1x8-a100-nvlink' "
                                            r"\(8 devices, ids 0\.\.7\)"):
        A100.collective_time("all-reduce", 1.0, [0, 9])
    with pytest.raises(TopologyError, match="device id 1 appears twice"):
        A100.collective_time("all-gather", 1.0, [0, 1, 1])
    with pytest.raises(TopologyError, match="nbytes must be a finite number >= 0, got -5"):
        A100.collective_time("all-gather", -5, [0, 1])


def test_constructor_validates():
    d = Device(0, "v100", 1.0, 1.0, 1.0, 1.0, 0)
    with pytest.raises(TopologyError, match=r"link \(0, 3\): device 3 is not in topology"):
        Topology((d,), Link(1, 0), Link(1, 0), links=((0, 3, Link(1, 0)),))
    with pytest.raises(TopologyError, match="at least one device"):
        Topology((), Link(1, 0), Link(1, 0))
    with pytest.raises(TopologyError, match="bandwidth must be > 0"):
        Link(0.0, 1e-6)


# ---- detection -----------------------------------------------------------------------------------
def test_detect_on_cpu_devices():
    t = Topology.detect()
    assert t.num_devices == len(jax.devices()) == 8
    assert t.ids == tuple(range(8)) and t.nodes == (tuple(range(8)),)
    assert all(d.kind == "cpu" and d.flops > 0 and d.memory > 0 for d in t.devices)
    assert any("guess" in n for n in t.notes)
    assert t.collective_time("all-reduce", 1e6, range(8)) > 0
    sub = Topology.detect(jax.devices()[2:4])
    assert sub.ids == (2, 3)
    assert Topology.from_json(t.to_json()) == t


def _fake(platform, kind, id, process_index=0, coords=None, limit=None):
    """Stand-ins for jax devices of hardware this CPU test machine does not have."""
    stats = {"bytes_limit": limit} if limit else None
    return SimpleNamespace(platform=platform, device_kind=kind, id=id, process_index=process_index,
                           coords=coords, memory_stats=lambda: stats)


@pytest.mark.parametrize("text, kind", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA A100-SXM4-40GB", "a100"), ("Tesla V100-SXM2-32GB", "v100-32gb"),
    ("Tesla V100-SXM2-16GB", "v100"), ("Tesla P100-PCIE-16GB", "p100"),
    ("NVIDIA GeForce GTX 1080 Ti", "1080ti"), ("Tesla T4", "t4"), ("NVIDIA L4", "l4"),
    ("TPU v4", "tpu-v4"), ("TPU v5 lite", "tpu-v5e"), ("v100", "v100"), ("Quantum X9", None),
])
def test_kind_strings(text, kind):
    assert match_kind(text) == kind


def test_detect_gpu_hosts_and_tpu_torus():
    gpus = [_fake("gpu", "NVIDIA H100 80GB HBM3", k, process_index=k // 4, limit=79e9)
            for k in range(8)]
    t = Topology.detect(gpus)
    assert t.nodes == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert t.device(5).kind == "h100" and t.device(5).memory == 79e9  # from memory_stats
    assert t.device_flops(5) == 989e12 and t.link(0, 1).bandwidth == 450e9  # NVLink 4 guessed
    assert any("guessed" in n for n in t.notes)
    tpus = [_fake("tpu", "TPU v4", k, coords=(k % 2, k // 2 % 2, k // 4)) for k in range(8)]
    t = Topology.detect(tpus)
    assert t.torus == (2, 2, 2) and t.device(6).coords == (0, 1, 1)
    assert t.collective_time("all-reduce", 1e9, range(8)) == pytest.approx(
        6 * 1e-6 + 7 / 8 * 1e9 / 50e9, rel=1e-12)
    odd = Topology.detect([_fake("gpu", "Quantum X9", 0)])
    assert odd.device(0).kind == "Quantum X9" and "not known" in " ".join(odd.notes)
