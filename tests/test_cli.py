"""The `tag-jax` command line: happy paths write and print what they say; bad input is one line.

In-process through `tag_jax.cli.main` (conftest gives 8 CPU devices); two subprocess tests run the
installed console script, one of them to check that the entry point itself starts the simulated
devices.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

import tag_jax
from tag_jax import cli, models

TOPO = "2x4-v100-25gbe"
FAST = ["--budget", "0.5", "-q"]

USER_MODULE = '''
import jax, jax.numpy as jnp

def step(w, x):
    loss = lambda w: jnp.mean((x @ w) ** 2)
    return w - 0.1 * jax.grad(loss)(w), loss(w)

def example():
    return (jax.ShapeDtypeStruct((16, 8), jnp.float32), jax.ShapeDtypeStruct((32, 16), jnp.float32))

not_callable = 3
'''


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def fails(capsys, *argv, status=2):
    """Run, expect `status`, and return the single stderr line (no traceback)."""
    rc, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert rc == status, (rc, out, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module in the working directory, as a user's own script would be."""
    (tmp_path / "cli_user_step.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    yield "cli_user_step"
    sys.modules.pop("cli_user_step", None)


# ---- plan ----------------------------------------------------------------------------------------

def test_plan_zoo_model_prints_summary_and_saves_loadable_plan(tmp_path, capsys):
    out_file = tmp_path / "plan.json"
    rc = cli.main(["plan", "--model", "mlp", "--size", "toy", "--topology", TOPO, "--budget", "0.5",
                   "--out", str(out_file)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Plan 'tag_jax" in out and "predicted: step" in out and "state/params/head/kernel" in out
    assert f"saved the plan to {out_file}" in out
    assert "[tag_jax" in err  # the search's progress
    ex = models.get("mlp", "toy")
    plan = tag_jax.Plan.load(str(out_file), ex.step, ex.state, ex.batch,
                             topology=tag_jax.Topology.preset(TOPO))
    assert plan.summary().splitlines()[1:] == out.split("\n\nplanned in")[0].splitlines()[1:]
    assert sorted(plan.strategy.mesh.device_ids) == list(range(8))


def test_plan_user_function_on_fixed_mesh(tmp_path, capsys, user_module):
    out_file = tmp_path / "user.json"
    rc, out, err = run(capsys, "plan", "--function", f"{user_module}:step", "--args",
                       f"{user_module}:example", "--mesh-shape", "4,2", "--axis-names", "dp,mp",
                       "--out", str(out_file), *FAST)
    assert rc == 0, err
    assert err == ""  # --quiet
    saved = json.loads(out_file.read_text())
    assert saved["mesh"]["shape"] == [4, 2] and saved["mesh"]["axis_names"] == ["dp", "mp"]
    mod = sys.modules[user_module]
    plan = tag_jax.Plan.load(str(out_file), mod.step, *mod.example())
    assert plan.strategy.mesh.axes == {"dp": 4, "mp": 2}
    assert "Plan 'tag_jax" in out


# ---- compare -------------------------------------------------------------------------------------

def test_compare_prints_a_row_per_plan(capsys):
    rc, out, err = run(capsys, "compare", "--model", "mlp", "--topology", TOPO, *FAST)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[1].split() == ["plan", "mesh", "predicted", "step", "vs", "tag_jax",
                                "peak", "memory/device", "planning", "time"]
    rows = {line.split()[0]: line.split() for line in lines[2:] if line.startswith("  ")}
    assert set(rows) == {"tag_jax"} | {name for name, _ in cli.compare.available()}
    assert {"data_parallel", "fsdp", "megatron"} <= set(rows)
    assert rows["tag_jax"][4] == "1.00x"
    for name, row in rows.items():
        assert row[-1] == "s" and float(row[-2]) > 0  # planning time
    for name in ("data_parallel", "fsdp", "megatron"):  # the planner's seeds: tag_jax is no slower
        assert float(rows[name][4].rstrip("x")) >= 1.0, rows[name]


def test_compare_picks_up_ilp_and_reports_a_baseline_that_cannot_plan(capsys, monkeypatch):
    def ilp(fn, mesh, topology=None):
        raise ValueError("no solver for this case")

    monkeypatch.setattr(tag_jax.baselines, "ilp", ilp, raising=False)
    rc, out, err = run(capsys, "compare", "--model", "mlp", "--topology", TOPO, "--budget", "0.3",
                       "-q")
    assert rc == 0, err
    assert any(line.split()[:2] == ["ilp", "-"] and "n/a" in line for line in out.splitlines())
    assert "ilp: no plan (ValueError: no solver for this case)" in out


# ---- topology ------------------------------------------------------------------------------------

def test_topology_lists_presets(capsys):
    rc, out, _ = run(capsys, "topology")
    assert rc == 0
    for name in tag_jax.Topology.presets():
        assert f"  {name}  " in out


def test_topology_shows_preset_and_file_and_json_roundtrips(tmp_path, capsys):
    rc, out, _ = run(capsys, "topology", "tag-hetero")
    assert rc == 0 and out.strip() == tag_jax.Topology.preset("tag-hetero").summary()
    rc, text, _ = run(capsys, "topology", "tag-hetero", "--json")
    path = tmp_path / "mine.json"
    path.write_text(text)
    assert tag_jax.Topology.from_json(str(path)).fingerprint() == \
        tag_jax.Topology.preset("tag-hetero").fingerprint()
    rc, out, _ = run(capsys, "topology", str(path))
    assert rc == 0 and "Topology 'tag-hetero': 8 devices on 3 node(s)" in out
    rc, out, _ = run(capsys, "topology", "--validate", str(path))
    assert rc == 0 and out.startswith(f"OK: {path}: topology 'tag-hetero', 8 devices on 3 node(s)")


def test_topology_validate_names_the_bad_field(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"devices": [{"kind": "v100"}, {"kind": "v100", "memory": -1}],
                                "intra_node": {"bandwidth": 1e11, "latency": 1e-6}}))
    line = fails(capsys, "topology", "--validate", str(path), status=1)
    assert line == (f"tag-jax topology: error: {path}: devices[1].memory: expected a positive "
                    "number of bytes, got -1")


def test_topology_validate_unreadable_and_malformed(tmp_path, capsys):
    line = fails(capsys, "topology", "--validate", str(tmp_path / "none.json"), status=1)
    assert "cannot read topology file" in line and "none.json" in line
    (tmp_path / "broken.json").write_text("{\"devices\": [")
    line = fails(capsys, "topology", "--validate", str(tmp_path / "broken.json"), status=1)
    assert "broken.json is not valid JSON" in line


def test_topology_unknown_preset(capsys):
    line = fails(capsys, "topology", "no-such-cluster")
    assert line.startswith("tag-jax topology: error: unknown topology 'no-such-cluster': not a "
                           "preset (1x8-a100-nvlink, ") and line.endswith("and not a JSON file")


# ---- bad input for plan and compare ----------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--model", "nope"], "no model 'nope' in the zoo; models: ['mlp', "),
    (["--model", "mlp", "--size", "huge"], "model 'mlp' has no size 'huge'; sizes: ['toy', "),
    (["--model", "mlp", "--topology", "no-such-cluster"], "unknown topology 'no-such-cluster'"),
    (["--model", "mlp", "--mesh-shape", "3,x"],
     "--mesh-shape '3,x': expected positive whole numbers separated by commas, like 8 or 4,2"),
    (["--model", "mlp", "--mesh-shape", "4,0"], "--mesh-shape '4,0': expected positive whole"),
    (["--model", "mlp", "--mesh-shape", "2,2"],
     "--mesh-shape 2,2: 4 devices, but the plan is for the 8 devices of topology "
     "'2x4-v100-25gbe'; give sizes that multiply to 8"),
    (["--model", "mlp", "--mesh-shape", "4,4"],
     "--mesh-shape 4,4: a mesh of 16 devices is larger than topology '2x4-v100-25gbe' (8 devices)"),
    (["--model", "mlp", "--mesh-shape", "4,2", "--axis-names", "data"],
     "--axis-names 'data': expected 2 distinct names (one per mesh dimension), like data,model"),
    (["--model", "mlp", "--axis-names", "data"], "--axis-names needs --mesh-shape"),
    (["--model", "mlp", "--topology", "tag-hetero-16"],
     "topology 'tag-hetero-16' describes 16 devices but JAX has 8; pass --devices 16"),
    (["--model", "mlp", "--args", "m:f"], "--args goes with --function, not with --model"),
    (["--function", "os:getcwd"], "--function os:getcwd needs --args MODULE:FACTORY"),
    (["--function", "no_such_module_xyz:step", "--args", "os:getcwd"],
     "--function 'no_such_module_xyz:step': cannot import module 'no_such_module_xyz' "
     "(ModuleNotFoundError: No module named 'no_such_module_xyz')"),
    (["--function", "os:no_such_function", "--args", "os:getcwd"],
     "--function 'os:no_such_function': module 'os' has no attribute 'no_such_function'"),
    (["--function", "step", "--args", "os:getcwd"],
     "--function 'step': expected MODULE:NAME, like mypkg.train:train_step"),
    (["--function", "os:sep", "--args", "os:getcwd"], "--function 'os:sep': 'sep' is a str"),
])
@pytest.mark.parametrize("command", ["plan", "compare"])
def test_bad_input_is_one_line_and_status_2(capsys, command, argv, message):
    line = fails(capsys, command, *argv, "-q")
    assert line.startswith(f"tag-jax {command}: error: {message}"), line


def test_bad_topology_files_for_plan(tmp_path, capsys):
    line = fails(capsys, "plan", "--model", "mlp", "--topology", str(tmp_path / "missing.json"))
    assert line.startswith(f"tag-jax plan: error: cannot read topology file "
                           f"'{tmp_path / 'missing.json'}'")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"devices": [{"kind": "v100", "node": "zero"}],
                               "intra_node": {"bandwidth": 1e11, "latency": 1e-6}}))
    line = fails(capsys, "plan", "--model", "mlp", "--topology", str(bad))
    assert line == (f"tag-jax plan: error: {bad}: devices[0].node: expected a whole number >= 0, "
                    "got 'zero'")


def test_plan_out_folder_missing_is_reported_before_search(tmp_path, capsys):
    line = fails(capsys, "plan", "--model", "mlp", "--out", str(tmp_path / "no" / "plan.json"))
    assert line == f"tag-jax plan: error: --out {tmp_path / 'no' / 'plan.json'}: folder " \
                   f"{tmp_path / 'no'} does not exist"


def test_user_module_errors(capsys, user_module):
    line = fails(capsys, "plan", "--function", f"{user_module}:not_callable", "--args",
                 f"{user_module}:example")
    assert line.endswith(f"--function '{user_module}:not_callable': 'not_callable' is a int, "
                         "not a function")


@pytest.mark.parametrize("argv, message", [
    ([], "tag-jax: error: the following arguments are required: COMMAND (see tag-jax --help)"),
    (["deploy"], "tag-jax: error: argument COMMAND: invalid choice: 'deploy'"),
    (["plan"], "tag-jax plan: error: one of the arguments --model --function is required"),
    (["plan", "--model", "mlp", "--function", "m:f"],
     "tag-jax plan: error: argument --function: not allowed with argument --model"),
    (["plan", "--model", "mlp", "--budget", "soon"],
     "tag-jax plan: error: argument --budget: expected a number, got 'soon'"),
    (["compare", "--model", "mlp", "--devices", "0"],
     "tag-jax compare: error: argument --devices: expected at least 1, got 0"),
])
def test_usage_errors_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith(message), err


@pytest.mark.parametrize("command", ["plan", "compare", "topology", "train-policy"])
def test_each_command_help_has_an_example(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert f"usage: tag-jax {command}" in out and "examples:" in out
    assert f"\n  tag-jax {command} " in out


# ---- train-policy --------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--problems", "1"], "--problems 1: need at least 2 (one is held out for validation)"),
    (["--epochs", "0"], "--budget, --epochs and --max-minutes must be positive"),
    (["--out", "/no/such/folder/w.npz"], "--out /no/such/folder/w.npz: folder /no/such/folder does not exist"),
    (["--seed-problems", "-1"], "--seed-problems -1: must be 0 or more"),
])
def test_train_policy_bad_options(capsys, argv, message):
    assert fails(capsys, "train-policy", *argv) == f"tag-jax train-policy: error: {message}"


def test_train_policy_writes_weights_the_planner_loads(tmp_path, capsys):
    from tag_jax.policy import Policy, resolve

    out = tmp_path / "mine.npz"
    rc, _, err = run(capsys, "train-policy", "--problems", "2", "--budget", "0.3", "--epochs", "1",
                     "--seed-problems", "2", "--out", str(out), "--cache", str(tmp_path / "cache"),
                     "--seed-cache", str(tmp_path / "seeds"))
    assert rc == 0 and out.exists() and "training" in err and "pricing seeds" in err  # progress shown
    assert isinstance(resolve(str(out)), Policy)
    assert len(list((tmp_path / "seeds").glob("*.json"))) == 2
    assert resolve(str(out)).meta["seed_problems"] >= 1


# ---- the installed entry point -------------------------------------------------------------------

def _console_script() -> str:
    path = shutil.which("tag-jax")
    assert path, "the tag-jax console script is missing: python3 -m pip install -q -e ."
    return path


def test_console_script_help():
    r = subprocess.run([_console_script(), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for command in ("plan", "compare", "topology"):
        assert f"    {command} " in r.stdout


def test_console_script_starts_the_simulated_devices(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out_file = tmp_path / "plan16.json"
    r = subprocess.run([_console_script(), "plan", "--model", "mlp", "--topology", "2x8-v100-p3",
                        "--devices", "16", "--budget", "0.3", "-q", "--out", str(out_file)],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(json.loads(out_file.read_text())["mesh"]["device_ids"]) == list(range(16))
