"""tag_jax.plots draws a plan's timeline and memory as matplotlib Figures."""
import jax
import pytest

import tag_jax
from tag_jax import models

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
from tag_jax import plots  # noqa: E402


@pytest.fixture(scope="module")
def plan():
    ex = models.get("mlp", "toy")
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    topo = tag_jax.Topology.preset("tag-hetero")
    return tag_jax.auto_shard(ex.step, mesh, topology=topo, time_budget_s=0.5).plan(ex.state, ex.batch)


def test_timeline_has_one_compute_and_one_comm_lane_per_device(plan):
    fig = plots.timeline(plan)
    assert isinstance(fig, matplotlib.figure.Figure)
    (ax,) = fig.axes
    assert len(ax.get_yticks()) == 8
    assert len(ax.collections) == 16  # broken_barh: compute + communication per device
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["compute", "communication", "predicted step"]


def test_memory_bars_stack_to_the_predicted_peak(plan):
    fig = plots.memory(plan)
    assert isinstance(fig, matplotlib.figure.Figure)
    (ax,) = fig.axes
    tops = {}
    for bar in ax.patches:
        x = round(bar.get_x() + bar.get_width() / 2)
        tops[x] = max(tops.get(x, 0.0), bar.get_y() + bar.get_height())
    assert len(tops) == 8
    scale = 2 ** -10  # the toy plan's peak is tens of KiB
    for top in tops.values():
        assert top == pytest.approx(plan.cost.peak_memory_bytes * scale, rel=1e-6)
