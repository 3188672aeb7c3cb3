"""Resources per step and GPU slots on one machine (tasks/slots.py), on a machine without a GPU:
MODELKILN_GPUS declares the GPUs, and file locks stand for them as they do for real ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from workspace import ROOT, Workspace, overlap, slow_data_recipe, write_rows

from tasks import slots
from tasks.errors import PreflightError, RecipeError
from tasks.graph import load_graph
from tasks.slots import GPUS_VARIABLE, VISIBLE, GpuSlots, Resources, gpu_ids, gpus_needed, held

CUDA = {"device": {"type": "cuda", "gpus": ["NVIDIA H200"]}}
CPU = {"device": {"type": "cpu"}}

# ---- the recipe's `resources` --------------------------------------------------------------


def recipe_text(data: Path, resources: str = "") -> str:
    return f"""
[model]
source = "{data.parent / "model"}"

[data.rows]
path = "{data}"
format = "text"
{resources}
"""


@pytest.fixture
def small(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    data = tmp_path / "rows.txt"
    data.write_text("one paragraph\n\nanother one\n")
    return data


def test_resources_are_read_from_any_step_and_are_never_part_of_its_key(
    small: Path, tmp_path: Path
):
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text(small))
    plain = load_graph(recipe, tmp_path / "artifacts")
    recipe.write_text(recipe_text(small, "resources = { gpus = 1, cpus = 4 }"))
    graph = load_graph(recipe, tmp_path / "artifacts")
    assert graph.step("data.rows").resources == Resources(gpus=1, cpus=4)
    assert plain.step("data.rows").resources == Resources()
    assert graph.keys == plain.keys


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("{ gpu = 1 }", "unknown key 'gpu' (did you mean gpus?)"),
        ("{ gpus = 1, memory = 2, disk = 3 }", "unknown key 'memory', 'disk'"),
        ("{ gpus = -1 }", "gpus = -1 is not a whole number >= 0"),
        ("{ gpus = true }", "gpus = True is not a whole number >= 0"),
        ('{ cpus = "4" }', "cpus = '4' is not a whole number >= 0"),
        ("{ cpus = 1.5 }", "cpus = 1.5 is not a whole number >= 0"),
        ("{ cpus = 0 }", "cpus = 0 leaves the step no thread"),
        ("2", "resources = 2 is not a table"),
    ],
)
def test_wrong_resources_are_refused_when_the_recipe_loads(
    small: Path, tmp_path: Path, value: str, says: str
):
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text(small, f"resources = {value}"))
    with pytest.raises(RecipeError, match="resources") as err:
        load_graph(recipe, tmp_path / "artifacts")
    assert says in str(err.value) and "[data.rows]" in str(err.value)


def test_a_step_on_cuda_needs_one_gpu_unless_it_says_otherwise():
    assert gpus_needed(Resources(), CUDA) == 1
    assert gpus_needed(None, CUDA) == 1  # the report
    assert gpus_needed(Resources(), CPU) == 0
    assert gpus_needed(Resources(), {}) == 0  # no device setting: a data set, a capture
    assert gpus_needed(Resources(gpus=0), CUDA) == 0
    assert gpus_needed(Resources(gpus=2), CPU) == 2


def test_the_machines_gpus_can_be_declared_and_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr(slots, "gpu_models", lambda: ["NVIDIA H200"] * 4)
    assert gpu_ids({}) == ["0", "1", "2", "3"]
    assert gpu_ids({VISIBLE: "2,3"}) == ["2", "3"]
    assert gpu_ids({GPUS_VARIABLE: "2"}) == ["0", "1"]
    assert gpu_ids({GPUS_VARIABLE: "1", VISIBLE: "3,5"}) == ["3"]
    assert gpu_ids({GPUS_VARIABLE: "0"}) == []
    monkeypatch.setattr(slots, "gpu_models", lambda: [])
    assert gpu_ids({}) == [] and gpu_ids({GPUS_VARIABLE: "3"}) == ["0", "1", "2"]
    with pytest.raises(PreflightError, match="MODELKILN_GPUS='two' is not a number of GPUs"):
        gpu_ids({GPUS_VARIABLE: "two"})


# ---- the slots -----------------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from tasks.slots import GpuSlots
with GpuSlots(Path(sys.argv[1]), ["0"]).take(1):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold_in_another_process(folder: Path, seconds: float = 60) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), str(seconds)], cwd=ROOT,
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


class Taker(threading.Thread):
    """take(count) in a thread: when it got its slots, and whether it was told to wait."""

    def __init__(self, gpu_slots: GpuSlots, count: int = 1) -> None:
        super().__init__(daemon=True)
        self.slots, self.count = gpu_slots, count
        self.waited, self.got, self.release = (
            threading.Event(),
            threading.Event(),
            threading.Event(),
        )
        self.taken: list[int] = []

    def run(self) -> None:
        with self.slots.take(self.count, on_wait=self.waited.set) as taken:
            self.taken = taken
            self.got.set()
            self.release.wait(30)


def test_a_slot_held_by_another_process_is_waited_for_and_a_killed_holder_frees_it(
    tmp_path: Path,
):
    folder = tmp_path / "gpu-slots"
    holder = hold_in_another_process(folder)
    taker = Taker(GpuSlots(folder, ["0"]))
    taker.start()
    try:
        assert taker.waited.wait(5)
        assert not taker.got.wait(1.0)  # still waiting: the other process holds the GPU
        holder.send_signal(signal.SIGKILL)  # no exit handler runs: the kernel drops its lock
        holder.wait(10)
        assert taker.got.wait(5) and taker.taken == [0]
    finally:
        taker.release.set()
        holder.kill()
        holder.wait(10)
    taker.join(5)


def test_a_released_slot_goes_to_the_step_waiting_for_it_and_free_slots_are_taken_at_once(
    tmp_path: Path,
):
    gpu_slots = GpuSlots(tmp_path / "gpu-slots", ["0", "1"])
    with gpu_slots.take(1) as first:
        with gpu_slots.take(1) as second:  # one is still free: no wait
            assert first == [0] and second == [1]
            both = Taker(gpu_slots, count=2)
            both.start()
            assert both.waited.wait(5) and not both.got.is_set()
        time.sleep(0.5)  # GPU 1 is free: two needed, one free, so it holds none meanwhile
        third = Taker(gpu_slots)
        third.start()
        assert third.got.wait(3) and third.taken == [1] and not both.got.is_set()
        third.release.set()
        third.join(5)
    assert both.got.wait(5) and sorted(both.taken) == [0, 1]
    both.release.set()
    both.join(5)


def test_asking_for_more_gpus_than_the_machine_has_fails_at_once(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(GPUS_VARIABLE, "2")
    began = time.monotonic()
    with pytest.raises(PreflightError) as err, held(Resources(gpus=3), CPU, tmp_path, "q:x", {}):
        pass
    assert time.monotonic() - began < 1
    assert "it needs 3 GPUs (resources.gpus) and this machine has 2" in str(err.value)
    monkeypatch.setenv(GPUS_VARIABLE, "0")
    no_gpu = 'needs 1 GPU \\(device "cuda"\\).* has none'
    with pytest.raises(PreflightError, match=no_gpu), held(Resources(), CUDA, tmp_path, "q", {}):
        pass


def test_a_gpu_step_sees_only_its_slots_and_a_cpu_step_waits_for_none(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(GPUS_VARIABLE, "2")
    monkeypatch.delenv(VISIBLE, raising=False)
    monkeypatch.setattr(slots, "cuda_started", lambda: False)
    with GpuSlots(tmp_path / slots.SLOTS_DIR, ["0", "1"]).take(1):  # another step has GPU 0
        info: dict = {"started": 0.0}
        with held(Resources(), CUDA, tmp_path, "q:x", info):
            assert os.environ[VISIBLE] == "1" and info["gpus"] == [1] and info["started"] > 0
        assert VISIBLE not in os.environ
        with GpuSlots(tmp_path / slots.SLOTS_DIR, ["0", "1"]).take(1):  # now both are taken
            began, info = time.monotonic(), {}
            with held(Resources(cpus=3), CPU, tmp_path, "q:cpu", info):
                assert os.environ.get(VISIBLE) is None and "gpus" not in info
                assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "3"
            assert time.monotonic() - began < 0.1


def test_resources_are_refused_in_doit_thread_workers(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(GPUS_VARIABLE, "1")
    errors = []

    def step() -> None:
        try:
            with held(Resources(cpus=2), CPU, tmp_path, "q:x", {}):
                pass
        except PreflightError as err:
            errors.append(str(err))

    worker = threading.Thread(target=step)
    worker.start()
    worker.join(5)
    assert errors and "-P thread" in errors[0]


def test_cpus_sets_the_thread_count_of_torch_already_loaded_and_restores_it(monkeypatch):
    counts = [8]
    torch = types.SimpleNamespace(
        get_num_threads=lambda: counts[-1], set_num_threads=lambda n: counts.append(n)
    )
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with slots.threads(4):
        assert counts[-1] == 4 and os.environ["OMP_NUM_THREADS"] == "4"
    assert counts[-1] == 8 and os.environ["OMP_NUM_THREADS"] == "1"


# ---- CUDA reads CUDA_VISIBLE_DEVICES once per process ---------------------------------------


@pytest.fixture
def cuda(monkeypatch):
    """This process's CUDA, pretended: `state["started"]` flips when a step "uses" it, and
    set_device calls are recorded."""
    state = {"started": False, "set_device": []}
    monkeypatch.setattr(slots, "cuda_started", lambda: state["started"])
    monkeypatch.setattr(slots, "_seen", None)
    monkeypatch.setattr(slots, "_device", 0)
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(set_device=state["set_device"].append))
    monkeypatch.setitem(sys.modules, "torch", fake)
    monkeypatch.setenv(GPUS_VARIABLE, "2")
    monkeypatch.delenv(VISIBLE, raising=False)
    return state


def test_a_process_whose_cuda_started_on_one_gpu_keeps_to_it(tmp_path: Path, cuda):
    other = GpuSlots(tmp_path / slots.SLOTS_DIR, ["0", "1"])
    with other.take(1), held(Resources(), CUDA, tmp_path, "q:a", info := {}):
        cuda["started"] = True  # the step's torch started CUDA seeing only GPU 1
        assert info["gpus"] == [1] and os.environ[VISIBLE] == "1"
    # GPU 0 is free now, but CUDA here cannot reach it: the next step waits for GPU 1.
    with held(Resources(), CUDA, tmp_path, "q:b", info := {}):
        assert info["gpus"] == [1] and os.environ[VISIBLE] == "1"
    assert cuda["set_device"] == []  # GPU 1 is device 0 for this process's CUDA
    two = held(Resources(gpus=2), CUDA, tmp_path, "q:c", {})
    with pytest.raises(PreflightError, match="started seeing only CUDA_VISIBLE_DEVICES=1"), two:
        pass


def test_a_process_whose_cuda_started_outside_a_step_picks_the_device_by_index(
    tmp_path: Path, cuda
):
    cuda["started"] = True  # CUDA started seeing both GPUs (a CPU step asked torch about it)
    other = GpuSlots(tmp_path / slots.SLOTS_DIR, ["0", "1"])
    with other.take(1), held(Resources(), CUDA, tmp_path, "q:a", info := {}):
        assert info["gpus"] == [1] and os.environ[VISIBLE] == "1"
        assert cuda["set_device"] == [1]  # "cuda" means GPU 1 for this step's torch
    with held(Resources(), CUDA, tmp_path, "q:b", info := {}):
        assert info["gpus"] == [0] and cuda["set_device"] == [1, 0]


def test_cuda_started_is_false_in_a_process_that_never_loaded_the_driver():
    probe = "from tasks.slots import cuda_started; print(cuda_started())"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout == "False\n", out.stderr


# ---- doit -n with fake GPUs ----------------------------------------------------------------


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("rows"))


def run_slow_recipe(tmp_path: Path, rows: Path, gpus: int) -> tuple[dict, str]:
    ws = Workspace(tmp_path)
    ws.root.mkdir(exist_ok=True)
    ws.write(slow_data_recipe(rows))
    proc = ws.doit("-n", "3", "data", env={GPUS_VARIABLE: str(gpus)}, timeout=120)
    summary = json.loads((ws.artifacts / "recipe" / "runs" / "latest.json").read_text())
    assert {t: s["status"] for t, s in summary["steps"].items()} == dict.fromkeys(
        ("data:gpu-a", "data:gpu-b", "data:cpu"), "built"
    )
    return summary["steps"], proc.stderr


def test_doit_n3_with_one_gpu_runs_gpu_steps_one_at_a_time_and_cpu_steps_beside_them(
    tmp_path: Path, rows: Path
):
    steps, stderr = run_slow_recipe(tmp_path, rows, gpus=1)
    a, b, cpu = steps["data:gpu-a"], steps["data:gpu-b"], steps["data:cpu"]
    assert a["gpus"] == b["gpus"] == [0] and "gpus" not in cpu
    # A step's GPU is free once its entry is published; its `finished` comes a moment later.
    assert overlap(a, b) < 0.05, (a, b)
    assert max(overlap(cpu, a), overlap(cpu, b)) > 0.3, (cpu, a, b)
    assert stderr.count("waiting for a GPU") == 1, stderr


def test_doit_n3_with_two_gpus_runs_two_gpu_steps_at_once_on_different_gpus(
    tmp_path: Path, rows: Path
):
    steps, stderr = run_slow_recipe(tmp_path, rows, gpus=2)
    a, b = steps["data:gpu-a"], steps["data:gpu-b"]
    assert sorted([a["gpus"], b["gpus"]]) == [[0], [1]]
    assert overlap(a, b) > 0.3, (a, b)
    assert "waiting for a GPU" not in stderr


def test_doit_n_with_gpu_slots_fails_a_bad_step_and_an_impossible_one_and_builds_the_rest(
    tmp_path: Path, rows: Path
):
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\tnot-a-number\tsome words\n")
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    ws.write(
        slow_data_recipe(rows, [("ok", 0.3, "resources = { gpus = 1 }"),
                                ("huge", 0.4, "resources = { gpus = 2 }")])
        + slow_data_recipe(bad, [("bad", 0.3, "resources = { gpus = 1 }")]).split("\n", 2)[2]
    )  # fmt: skip
    proc = ws.doit("-n", "3", "data", env={GPUS_VARIABLE: "1"}, check=False, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    steps = json.loads((ws.artifacts / "recipe" / "runs" / "latest.json").read_text())["steps"]
    assert {t: s["status"] for t, s in steps.items()} == {
        "data:ok": "built", "data:huge": "failed", "data:bad": "failed",
    }  # fmt: skip
    assert "it needs 2 GPUs (resources.gpus) and this machine has 1" in steps["data:huge"]["error"]
    assert "score = 'not-a-number' is not a number" in steps["data:bad"]["error"]
    assert steps["data:ok"]["gpus"] == [0] and "Traceback" not in proc.stderr
