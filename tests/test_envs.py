"""Isolated stage environments: installed from a hashed lock and nothing else, built once and
reused, keyed by their lock, never trusted half made, removed by gc when unused, and a step
inside one reports like any other."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from workspace import ROOT, Workspace

from tasks import envs, pipconfig
from tasks.envs import Environment
from tasks.errors import StageError
from tasks.requirement import normalize_name
from tasks.stages import StepContext
from tasks.stages.quantize import inc_dynamic, inc_weight_only, nvmo
from tasks.stages.quantize.inc_dynamic import Config

# Its lock: python tools/lock_envs.py tests.test_envs:SMALL (six has one wheel and one sdist)
SMALL = Environment(
    "small", ("six==1.17.0",), "a test environment", Path(__file__).with_name("locks") / "small.txt"
)
STAGE_ENVS = (inc_dynamic.INC, nvmo.MODELOPT, nvmo.MODELOPT_CUDA)


def log(message: str) -> None:
    print(message, file=sys.stderr)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """An artifacts root whose small environment is built once for this module."""
    root = tmp_path_factory.mktemp("artifacts")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("UV_CACHE_DIR", raising=False)  # uv's cache: the default, artifacts/cache/uv
        envs.ensure(root, SMALL, log)
    return root


def test_an_environment_is_built_once_then_reused_without_uv(artifacts, monkeypatch):
    folder = envs.env_path(artifacts, SMALL)
    assert envs.is_ready(folder) and folder.name.startswith("small-")
    marker = json.loads((folder / envs.MARKER).read_text())
    assert marker["key"] == SMALL.key and "six==1.17.0" in marker["installed"]
    ran = []
    monkeypatch.setattr(envs.subprocess, "run", lambda *a, **k: ran.append(a))
    assert envs.ensure(artifacts, SMALL, log) == folder and ran == []  # no uv, no venv
    # exactly the lock: no pip or setuptools the lock does not pin, every module compiled
    assert not list(folder.glob("lib/python*/site-packages/pip"))
    assert list(folder.glob("lib/python*/site-packages/__pycache__/six.*.pyc"))
    # uv's cache lies beside the environments, on their file system: files are hardlinked
    six = next(folder.glob("lib/python*/site-packages/six.py"))
    assert six.stat().st_nlink > 1 and (artifacts / "cache" / "uv").is_dir()


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
    lock = tmp_path / "broken.txt"
    lock.write_text(f"modelkiln-no-such-package==0.0.1 --hash=sha256:{'0' * 64}\n")
    broken = Environment("broken", ("modelkiln-no-such-package==0.0.1",), "never builds", lock)
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
        "import sys; from pathlib import Path; from tasks import envs; envs.ensure(Path("
        "sys.argv[1]), envs.Environment('small', ('six==1.17.0',), 'x', Path(sys.argv[2])), print)"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(SMALL.lock)],
                             cwd=ROOT, start_new_session=True)  # fmt: skip
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


@pytest.mark.parametrize("env", (*STAGE_ENVS, SMALL), ids=lambda env: env.name)
def test_every_lock_pins_and_hashes_every_package_and_agrees_with_its_pins(env):
    entry = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==\S+( --hash=sha256:[0-9a-f]{64})+$")
    lines = envs.lock_lines(env)
    assert lines and [line for line in lines if not entry.match(line)] == []
    assert envs.lock_mismatches(env) == []  # every hand pin, at the same version
    locked = envs.locked_versions(env)
    assert len(locked) == len(lines)  # one pin per package
    assert {normalize_name(name) for name in env.from_source} <= set(locked)
    # packaged with modelkiln, so an installed copy finds it
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = package_data["package-data"]["tasks.stages.quantize"]
    if env is not SMALL:
        assert any(env.lock.match(f"tasks/stages/quantize/{glob}") for glob in globs)


def test_the_environment_key_is_the_digest_of_what_its_lock_installs(tmp_path, monkeypatch):
    text = SMALL.lock.read_text()
    lock = tmp_path / "small.txt"

    def key_with(content: str) -> str:
        lock.write_text(content)
        return dataclasses.replace(SMALL, lock=lock).key

    assert key_with(text) == SMALL.key  # the content, not where it lies
    assert key_with("# refreshed\n" + text.rstrip() + "  # a note\n    # via x\n") == SMALL.key
    assert key_with(text.replace("--hash=sha256:4", "--hash=sha256:5")) != SMALL.key
    assert key_with(text.replace("six==1.17.0", "six==1.16.0")) != SMALL.key
    before = SMALL.key
    monkeypatch.setattr(envs, "ENV_VERSION", "0")
    assert dataclasses.replace(SMALL).key != before  # a fresh one: a key is read once
    with pytest.raises(StageError, match=r"(?s)no-such\.txt.*fix: generate it .*lock_envs\.py"):
        dataclasses.replace(SMALL, lock=tmp_path / "no-such.txt").identity()


def _fake_uv(monkeypatch, failing: str = "") -> list[list[str]]:
    """Record the commands _build runs instead of running them; the one naming `failing` fails."""
    ran = []

    def run(cmd, *args, **kwargs):
        ran.append([str(a) for a in cmd])
        if "-r" in cmd:  # what uv would read, read now: a later pass may rewrite nothing
            ran[-1].append(Path(cmd[cmd.index("-r") + 1]).read_text())
        code = 1 if failing and failing in cmd else 0
        out = "six 1.17.0 requires nothing-here, which is not installed." if code else ""
        return subprocess.CompletedProcess(cmd, code, stdout=out, stderr="")

    monkeypatch.setattr(envs.subprocess, "run", run)
    return ran


def test_a_build_installs_the_lock_with_hashes_and_resolves_nothing(tmp_path, monkeypatch):
    ran = _fake_uv(monkeypatch)
    (tmp_path / "small").mkdir()
    envs._build(tmp_path / "small", SMALL, time.time(), tmp_path / "cache")
    installs = [cmd for cmd in ran if "install" in cmd]
    assert len(installs) == 1
    cmd = installs[0]
    assert {"--require-hashes", "--no-deps", "--compile-bytecode", "--no-config"} <= set(cmd)
    assert cmd[cmd.index("-r") + 1] == str(SMALL.lock)
    assert cmd[cmd.index("--only-binary") + 1] == ":all:"  # no sdist, no unlocked build tools
    assert not [arg for arg in cmd[:-1] if "==" in arg]  # no bare requirement strings
    python = str(envs.python_of(tmp_path / "small"))
    assert any(cmd[1:3] == ["pip", "check"] and cmd_value(cmd, "--python") == python for cmd in ran)
    assert cmd_value(ran[0], "--python") == sys.executable and "--seed" not in ran[0]  # no pip


def test_uv_is_given_pips_indexes_and_looks_for_each_pin_on_every_one():
    settings = pipconfig.Settings(
        indexes=("https://pypi.org/simple/", "file:///opt/pypi/simple", "file:///more"),
        find_links=("/opt/wheels",),
    )
    args = envs._index_args(settings)
    assert cmd_value(args, "--index-strategy") == "unsafe-best-match"  # as pip, not first-hit
    assert cmd_value(args, "--index-url") == "https://pypi.org/simple/"
    assert [args[i + 1] for i, a in enumerate(args) if a == "--extra-index-url"] == [
        "file:///opt/pypi/simple",
        "file:///more",
    ]
    assert cmd_value(args, "--find-links") == "/opt/wheels"
    no_index = envs._index_args(pipconfig.Settings(indexes=(), find_links=("/w",)))
    assert no_index == ["--no-index", "--find-links", "/w"]
    environ = envs._uv_environ(Path("/c"), pipconfig.Settings(cert="/ca.pem", timeout=180))
    assert environ["UV_CACHE_DIR"] == "/c" and "VIRTUAL_ENV" not in environ
    assert environ["UV_HTTP_TIMEOUT"] == "180"
    assert environ["SSL_CERT_FILE"] == os.environ.get("SSL_CERT_FILE", "/ca.pem")


def test_packages_without_wheels_are_built_last_by_the_locked_tools(tmp_path, monkeypatch):
    ran = _fake_uv(monkeypatch)
    (tmp_path / "modelopt").mkdir()
    envs._build(tmp_path / "modelopt", nvmo.MODELOPT, time.time(), tmp_path / "cache")
    wheels, sources = [cmd for cmd in ran if "install" in cmd]
    for cmd in (wheels, sources):
        assert {"--require-hashes", "--no-deps"} <= set(cmd)
    assert cmd_value(wheels, "--only-binary") == ":all:"
    assert cmd_value(sources, "--no-binary") == "cppimport" and "--no-build-isolation" in sources
    wheel_lines, source_lines = wheels[-1].splitlines(), sources[-1].splitlines()
    assert [line.split("==")[0] for line in source_lines] == ["cppimport"]
    assert sorted(wheel_lines + source_lines) == envs.lock_lines(nvmo.MODELOPT)
    assert any(line.startswith("setuptools-scm==") for line in wheel_lines)  # built by them


def cmd_value(cmd: list[str], option: str) -> str:
    return cmd[cmd.index(option) + 1]


def test_a_stale_or_incomplete_lock_is_refused(tmp_path, monkeypatch):
    ran = _fake_uv(monkeypatch, failing="check")
    (tmp_path / "env").mkdir()
    stale = dataclasses.replace(SMALL, requirements=("six==1.16.0",))
    with pytest.raises(StageError, match=r"does not match its pins: six==1\.16\.0 \(the lock has"):
        envs._build(tmp_path / "env", stale, time.time(), tmp_path / "cache")
    assert ran == []  # before any venv or uv
    with pytest.raises(StageError, match=r"(?s)lock is incomplete\nsix 1\.17\.0 requires"):
        envs._build(tmp_path / "env", SMALL, time.time(), tmp_path / "cache")


def test_a_torch_build_pypi_lacks_is_named_with_where_it_comes_from():
    output = (  # uv 0.13's words
        "Using Python 3.11.7 environment at: /x\n"
        "error: No solution found when resolving dependencies\n"
        "  cause: Because there is no version of torch==2.13.0+cpu and you require "
        "torch==2.13.0+cpu, we can conclude that your requirements are unsatisfiable.\n"
    )
    message = envs.uv_failure(nvmo.MODELOPT, output)
    assert "'torch==2.13.0+cpu' failed" in message and "Using Python" not in message
    assert "not on PyPI" in message and "https://download.pytorch.org/whl/cpu" in message
    built = "error: Failed to build `cppimport==22.8.2`\n  cause: The build backend failed\n"
    assert "'cppimport==22.8.2' failed" in envs.uv_failure(nvmo.MODELOPT, built)
    assert "uv failed\nerror: something new" in envs.uv_failure(SMALL, "error: something new")


def test_a_file_that_is_not_the_locked_one_is_refused_and_named(tmp_path):
    lock = tmp_path / "small.txt"
    lock.write_text(f"six==1.17.0 --hash=sha256:{'0' * 64}\n")
    with pytest.raises(StageError) as err:
        envs.ensure(tmp_path, dataclasses.replace(SMALL, lock=lock), log)
    assert "'six==1.17.0' failed" in str(err.value)
    assert "Hash mismatch" in str(err.value) and "another file under the locked name" in str(
        err.value
    )
    assert not envs.managed_envs(tmp_path)


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


def test_a_changed_lock_changes_its_environment_and_only_the_steps_that_use_it(
    tmp_path, tiny_model, monkeypatch
):
    from tasks.graph import load_graph

    ws = Workspace(tmp_path)
    _recipe(ws, tiny_model)
    before = load_graph(ws.recipe, ws.artifacts).keys
    # a package nobody pins by hand moves: the pins are the same, the environment is not
    text = inc_dynamic.INC.lock.read_text()
    assert "\nwcwidth==0.9.4 " in text and "wcwidth" not in " ".join(inc_dynamic.INC.requirements)
    (tmp_path / "inc.txt").write_text(text.replace("\nwcwidth==0.9.4 ", "\nwcwidth==0.9.3 "))
    changed = dataclasses.replace(inc_dynamic.INC, lock=tmp_path / "inc.txt")
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
