"""Isolated stage environments: built once and reused, keyed by their pins, never trusted half
made, removed by gc when unused, and a step inside one reports like any other."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from workspace import ROOT, Workspace

from tasks import envs
from tasks.envs import Environment
from tasks.errors import StageError
from tasks.stages import StepContext
from tasks.stages.quantize import inc_dynamic, inc_weight_only
from tasks.stages.quantize.inc_dynamic import Config

SMALL = Environment("small", ("six==1.17.0",), "a test environment")


def log(message: str) -> None:
    print(message, file=sys.stderr)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """An artifacts root whose small environment is built once for this module."""
    root = tmp_path_factory.mktemp("artifacts")
    envs.ensure(root, SMALL, log)
    return root


def test_an_environment_is_built_once_then_reused_without_pip(artifacts, monkeypatch):
    folder = envs.env_path(artifacts, SMALL)
    assert envs.is_ready(folder) and folder.name.startswith("small-")
    marker = json.loads((folder / envs.MARKER).read_text())
    assert marker["key"] == SMALL.key and "six==1.17.0" in marker["installed"]
    ran = []
    monkeypatch.setattr(envs.subprocess, "run", lambda *a, **k: ran.append(a))
    assert envs.ensure(artifacts, SMALL, log) == folder and ran == []  # no pip, no venv


def test_a_step_in_an_environment_reports_back(artifacts, tmp_path, capfd):
    ctx = StepContext(task="quantize:x", out=tmp_path, artifacts=artifacts)
    value = envs.call(SMALL, "tests.env_helpers:where", Config(), ctx, {"value": 21})
    assert value["value"] == 42 and value["six"] == "1.17.0"
    assert Path(value["prefix"]) == envs.env_path(artifacts, SMALL)
    captured = capfd.readouterr()
    assert "quantize:x: working in" in captured.err  # its output reaches the terminal
    # ...on stderr: doit's stdout lists the tasks, and an open progress bar there would hide one
    assert "Progress" in captured.err and "Progress" not in captured.out
    with pytest.raises(StageError, match="the quantizer refused the model\n  fix: quantize"):
        envs.call(SMALL, "tests.env_helpers:fail", Config(), ctx)


def test_a_failed_build_names_the_package_and_leaves_nothing(tmp_path):
    broken = Environment("broken", ("modelkiln-no-such-package==0.0.1",), "never builds")
    with pytest.raises(StageError) as err:
        envs.ensure(tmp_path, broken, log)
    message = str(err.value)
    assert "cannot build the broken environment" in message
    assert "'modelkiln-no-such-package==0.0.1' failed" in message
    left = [p for p in envs.envs_dir(tmp_path).rglob("*") if ".locks" not in p.parts]
    assert left == [envs.envs_dir(tmp_path) / ".tmp"]  # an empty folder: nothing to trust
    assert envs.managed_envs(tmp_path) == {}


def test_a_killed_build_is_rebuilt_on_the_next_run(tmp_path):
    script = (
        "import sys; from pathlib import Path; from tasks import envs; "
        "envs.ensure(Path(sys.argv[1]), envs.Environment('small', ('six==1.17.0',), 'x'), print)"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT,
                             start_new_session=True)  # fmt: skip
    tmp_root = envs.envs_dir(tmp_path) / ".tmp"
    deadline = time.time() + 60
    while not (tmp_root.is_dir() and any(tmp_root.glob("*/bin/python"))):
        assert time.time() < deadline and child.poll() is None, "the build never started"
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert not envs.is_ready(envs.env_path(tmp_path, SMALL))
    assert envs.managed_envs(tmp_path) == {}  # the half-made one is not an environment
    folder = envs.ensure(tmp_path, SMALL, log)
    assert envs.is_ready(folder) and not list(tmp_root.iterdir())  # stale build removed


def _recipe(ws: Workspace, tiny_model: Path) -> None:
    ws.write(f"""
[model]
source = "{tiny_model}"

[capture.fp32]

[quantize.int8]
algorithm = "ort-dynamic"
from = "capture.fp32"

[quantize.inc-int8]
algorithm = "inc-dynamic"
from = "capture.fp32"

[quantize.inc-rtn]
algorithm = "inc-weight-only"
from = "capture.fp32"
""")


def test_a_changed_pin_changes_its_environment_and_only_the_steps_that_use_it(
    tmp_path, tiny_model, monkeypatch
):
    from tasks.graph import load_graph

    ws = Workspace(tmp_path)
    _recipe(ws, tiny_model)
    before = load_graph(ws.recipe, ws.artifacts).keys
    pins = tuple(
        p if not p.startswith("scipy==") else "scipy==1.16.0" for p in inc_dynamic.INC.requirements
    )
    changed = dataclasses.replace(inc_dynamic.INC, requirements=pins)
    assert changed.key != inc_dynamic.INC.key
    for module in (inc_dynamic, inc_weight_only):
        monkeypatch.setattr(module, "SPEC", dataclasses.replace(module.SPEC, environment=changed))
    after = load_graph(ws.recipe, ws.artifacts).keys
    moved = {ref for ref in before if before[ref] != after[ref]}
    assert moved == {"quantize.inc-int8", "quantize.inc-rtn"}


def test_gc_removes_an_environment_nothing_uses(tmp_path, tiny_model):
    ws = Workspace(tmp_path)
    _recipe(ws, tiny_model)
    envs.ensure(ws.artifacts, SMALL, log)  # no step of the recipe uses it
    unmanaged = envs.envs_dir(ws.artifacts) / "bench-peer"  # made by hand: never touched
    (unmanaged / "bin").mkdir(parents=True)
    dry = ws.doit("gc", "--dry-run").stdout
    assert "would remove environment small-" in dry and envs.managed_envs(ws.artifacts)
    out = ws.doit("gc").stdout
    assert "removing environment small-" in out
    assert envs.managed_envs(ws.artifacts) == {} and unmanaged.is_dir()
