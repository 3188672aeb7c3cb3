"""The Ray runner (tasks/rayrun.py) on this 2-core machine without a GPU: a local Ray cluster
that declares one GPU, started once for the module, which `doit ray=<its address>` joins.
Skipped where Ray is not installed (`pip install 'modelkiln[ray]'`)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from workspace import Workspace, overlap, slow_data_recipe, write_rows

from tasks.errors import PreflightError
from tasks.graph import load_graph
from tasks.hostinfo import resolve_device
from tasks.jobs import check_command, ray_address
from tasks.rayrun import asks
from tasks.runs import STEP_FAILED
from tasks.slots import GPUS_VARIABLE

# ---- without a cluster ----------------------------------------------------------------------


def test_the_ray_address_comes_from_the_variable_else_the_environment():
    assert ray_address(None, {}) == ""
    assert ray_address(None, {"MODELKILN_RAY": "auto"}) == "auto"
    assert ray_address("local", {"MODELKILN_RAY": "auto"}) == "local"
    assert ray_address("", {"MODELKILN_RAY": "auto"}) == ""  # ray= turns it off for one run


@pytest.mark.parametrize("argv", [["-P", "process"], ["-Pprocess"], ["--parallel-type=process"]])
def test_process_workers_are_refused_with_ray(argv):
    with pytest.raises(PreflightError, match="thread workers"):
        check_command(["-n", "4", *argv])
    check_command(["-n", "4", "-P", "thread"])


def test_a_step_asks_ray_for_its_resources_or_one_cpu(tmp_path: Path):
    rows = write_rows(tmp_path, rows=10)
    (tmp_path / "r.toml").write_text(slow_data_recipe(rows))
    graph = load_graph(tmp_path / "r.toml", tmp_path / "artifacts")
    assert [asks(graph, f"data.{n}") for n in ("gpu-a", "gpu-b", "cpu")] == [(1, 1), (1, 1), (1, 0)]


@pytest.mark.skipif(Path("/proc/driver/nvidia/gpus").exists(), reason="a real GPU is here")
def test_the_cuda_visible_devices_of_a_fake_ray_gpu_does_not_make_a_gpu(monkeypatch):
    """Ray sets CUDA_VISIBLE_DEVICES=0 for a task on a GPU it was only told about: "auto" still
    means the CPU, as the driver's key said."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert resolve_device("auto") == "cpu"


def test_without_ray_installed_ray_says_how_to_install_it(tmp_path: Path):
    rows = write_rows(tmp_path, rows=10)
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    ws.write(slow_data_recipe(rows, [("cpu", 0.3, "")]))
    hide = tmp_path / "noray"
    (hide / "ray").mkdir(parents=True)
    (hide / "ray" / "__init__.py").write_text("raise ImportError('no ray here')\n")
    proc = ws.doit("ray=local", "data", check=False,
                   env={"PYTHONPATH": f"{hide}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})  # fmt: skip
    assert proc.returncode == STEP_FAILED, proc.stderr
    assert "pip install 'modelkiln[ray]'" in proc.stdout + proc.stderr


# ---- on a local cluster ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> str:
    """A local cluster with 2 CPUs and one declared GPU; its address for `ray=`."""
    ray = pytest.importorskip("ray")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
             logging_level="WARNING")  # fmt: skip
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("rows"))


def summary(ws: Workspace) -> dict:
    return json.loads((ws.artifacts / "recipe" / "runs" / "latest.json").read_text())


def entries(ws: Workspace, stage: str = "data") -> dict[str, tuple[str, dict]]:
    """Each step's key and its files' digests, from the links of a workspace."""
    found = {}
    for link in sorted((ws.artifacts / "recipe" / stage).iterdir()):
        key = link.resolve().name
        manifest = json.loads(link.resolve().with_name(key + ".json").read_text())
        found[link.name] = (key, {f["path"]: f["xxh3"] for f in manifest["files"]})
    return found


def test_gpu_and_cpu_steps_build_on_ray_as_they_do_in_doit(tmp_path: Path, cluster: str, rows):
    """Same keys and files as the plain runner; the GPU steps one at a time on the one GPU,
    the CPU step beside them."""
    on_ray, plain = Workspace(tmp_path / "ray"), Workspace(tmp_path / "plain")
    for ws in (on_ray, plain):
        ws.root.mkdir()
        ws.write(slow_data_recipe(rows))
    proc = on_ray.doit(f"ray={cluster}", "-n", "3", "data", timeout=300)
    plain.doit("-n", "3", "data", env={GPUS_VARIABLE: "1"}, timeout=300)
    assert entries(on_ray) == entries(plain)
    steps = summary(on_ray)["steps"]
    assert {t: s["status"] for t, s in steps.items()} == dict.fromkeys(steps, "built")
    a, b, cpu = steps["data:gpu-a"], steps["data:gpu-b"], steps["data:cpu"]
    assert a["gpus"] == b["gpus"] == [0] and "gpus" not in cpu
    assert overlap(a, b) < 0, (a, b)  # Ray frees the GPU once its worker has ended
    assert max(overlap(cpu, a), overlap(cpu, b)) > 0.3, (cpu, a, b)
    assert all(s["node"] for s in steps.values())
    assert "Traceback" not in proc.stderr
    again = on_ray.doit(f"ray={cluster}", "data")
    assert "-- data:cpu" in again.stdout and "ray:" not in again.stderr  # no-op: Ray untouched


def test_a_failing_step_and_an_impossible_request_fail_and_the_rest_is_built(
    tmp_path: Path, cluster: str, rows
):
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\tnot-a-number\tsome words\n")
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    ws.write(
        slow_data_recipe(rows, [("ok", 0.3, ""), ("huge", 0.4, "resources = { cpus = 64 }")])
        + slow_data_recipe(bad, [("bad", 0.3, "")]).split("\n", 2)[2]
    )
    started = time.monotonic()
    proc = ws.doit(f"ray={cluster}", "-n", "3", "data", check=False, timeout=300)
    assert time.monotonic() - started < 120  # the impossible step did not wait
    assert proc.returncode == STEP_FAILED, proc.stdout + proc.stderr
    steps = summary(ws)["steps"]
    assert {t: s["status"] for t, s in steps.items()} == {
        "data:ok": "built", "data:huge": "failed", "data:bad": "failed",
    }  # fmt: skip
    assert "no node of the cluster has them" in steps["data:huge"]["error"]
    assert steps["data:bad"]["error"].startswith("data:bad: record 1: score = 'not-a-number'")
    assert "Traceback" not in proc.stderr


def _build_workers() -> list[int]:
    """Processes running a step for this module's cluster (Ray names them after the function;
    they descend from this process, which started the cluster)."""
    parents, names = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            names[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    ours, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        children = [c for c, p in parents.items() if p == pid and c not in ours]
        ours.update(children)
        todo += children
    return [pid for pid in ours if names.get(pid, b"").startswith(b"ray::build_on_node")]


def test_a_killed_worker_fails_its_step_and_leaves_nothing_complete(
    tmp_path: Path, cluster: str, rows
):
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    ws.write(slow_data_recipe(rows, [("slow", 0.3, "")]))
    proc = ws.popen(f"ray={cluster}", "data:slow")
    tmp_root = ws.artifacts / "store" / ".tmp"
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_root.glob("*.*[0-9]")):
        time.sleep(0.02)
    workers = _build_workers()
    assert workers, "no Ray worker found"
    for pid in workers:
        os.kill(pid, 9)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the run hung after its Ray worker was killed") from None
    assert proc.returncode == STEP_FAILED, out + err
    step = summary(ws)["steps"]["data:slow"]
    assert step["status"] == "failed" and "Ray worker building it died" in step["error"]
    assert not (ws.artifacts / "recipe" / "data" / "slow").exists()
    assert ws.doit("verify").returncode == 0  # nothing half-built looks complete
    ws.doit(f"ray={cluster}", "data:slow", timeout=300)  # and the next run builds it
    assert summary(ws)["steps"]["data:slow"]["status"] == "built"
