"""Every notebook in notebooks/ runs top to bottom on CPU (a failing cell fails the test), and the
values the notebooks print say what they claim (the policy's loss goes down, its plan is used)."""
import pathlib
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def _text(nb) -> str:
    """Everything the notebook printed, in order."""
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if o.get("output_type") == "stream")


def _check_quickstart(text: str) -> None:
    assert text.startswith("cpu 8 devices")  # the CPU fallback: 8 simulated devices
    assert "per device (busy" in text          # the per-device table of the summary
    first, after = map(float, re.search(r"first loss (\S+) after 4 sharded steps (\S+)", text).groups())
    assert after < first


def _check_train_policy(text: str) -> None:
    assert text.startswith("cpu 8 devices")
    assert int(re.search(r"searched (\d+) problems", text).group(1)) == 5
    first, last = map(float, re.search(r"first loss (\S+), last loss ([0-9.]+)", text).groups())
    assert last < 0.5 * first
    steps = [float(x) for x in re.findall(r"step +\d+ +loss ([0-9.]+)", text)]
    assert len(steps) >= 5 and steps[-1] < steps[0]
    acc = [float(x) for x in re.findall(r"option accuracy ([0-9.]+)", text)]
    assert acc[-1] > acc[0]
    # the saved weights were loaded by auto_shard and their plan used alone (time_budget_s=0)
    assert re.search(r"Policy\(\S+policy\.npz, \{'hidden': 32, 'layers': 2, 'heads': 4\}\)", text)
    assert re.search(r"plan 'tag_jax \((policy|data_parallel|fsdp|megatron|replicated) \(mesh choice \d\)\)'", text)
    policy_ms, dp_ms, ratio = map(float, re.search(
        r"zero-shot policy step ([0-9.]+) ms, data parallel ([0-9.]+) ms \(([0-9.]+)x\)", text).groups())
    assert policy_ms > 0 and dp_ms > 0 and ratio == pytest.approx(dp_ms / policy_ms, rel=0.01)
    assert "per device (busy" in text and "1080ti" in text  # its summary, on tag-hetero


CHECKS = {"quickstart": _check_quickstart, "train_policy": _check_train_policy}


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "heterogeneous.ipynb",
                                          "train_policy.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    # the kernel is a fresh process: the notebook itself must ask for its CPU devices
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell that failed
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    check = CHECKS.get(path.stem)
    if check is not None:  # what the notebook printed says what it claims
        check(_text(nb))
