"""The nightly contract (tasks/runs.py): a run goes on past a failing step, its summary says
what every step did, gates decide the release folder, and the exit code tells a broken build
from a variant that got worse."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from workspace import Workspace, executed, tiny_recipe

from tasks.errors import RecipeError
from tasks.gates import check_gates, describe, judge
from tasks.recipe import load_recipe
from tasks.runs import BAD_COMMAND, GATE_FAILED, OK, STEP_FAILED, load_summaries, write_summary

# A data set with no records fails its step at build time (not when the recipe loads), and
# the evaluation that reads it cannot be built; the int8 variant cannot fit 1 kB.
BROKEN = """
[data.empty]
path = "{empty}"
format = "text"

[evaluate.on-empty]
from = "capture.fp32"
data = "empty"
seq_len = 64
max_tokens = 256
new_tokens = 4
repeats = 1
"""


def gated(recipe: str, int8_mb: float) -> str:
    """Gates on both evaluations: fp32 passes, int8 passes only a size limit it fits."""
    recipe = recipe.replace(
        "[evaluate.fp32]\n",
        "[evaluate.fp32]\ngates = { max_perplexity = 1e9, max_size_mb = 1e4 }\n",
    )
    return recipe.replace(
        "[evaluate.int8]\n", f"[evaluate.int8]\ngates = {{ max_size_mb = {int8_mb} }}\n"
    )


def latest(ws: Workspace) -> dict:
    return json.loads((ws.artifacts / "recipe" / "runs" / "latest.json").read_text())


def released(ws: Workspace) -> dict[str, str]:
    folder = ws.artifacts / "recipe" / "release"
    if not folder.is_dir():
        return {}
    return {p.name: p.resolve().name for p in folder.iterdir()}


def test_a_failed_step_and_a_missed_gate_each_have_their_status_and_exit_code(
    tmp_path: Path, tiny_model: Path, prose_file: Path, tiny_built: Path
):
    ws = Workspace(tmp_path)
    ws.root.mkdir(exist_ok=True)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    base = tiny_recipe(tiny_model, prose_file, extra=BROKEN.format(empty=empty))
    ws.write(gated(base, int8_mb=0.001))
    ws.seed(tiny_built, "model", "capture:fp32")  # built before: they count as up to date

    first = ws.doit(check=False)
    assert first.returncode == STEP_FAILED, first.stderr
    summary = latest(ws)
    status = {task: step["status"] for task, step in summary["steps"].items()}
    assert status == {
        "model": "up-to-date", "data:prose": "built", "data:empty": "failed",
        "capture:fp32": "up-to-date",
        "quantize:int8": "built", "evaluate:fp32": "built", "evaluate:int8": "gate-failed",
        "evaluate:on-empty": "input-failed", "report": "input-failed",
    }  # fmt: skip
    failed = summary["steps"]["data:empty"]
    assert "no records" in failed["error"]
    # Each step's output is in its log: beside its entry, or kept apart for a failed step.
    failed_log = Path(failed["log"])
    assert failed_log.parent == ws.artifacts / "logs" / "failed" and failed_log.is_file()
    assert "data:empty" in failed_log.read_text()
    built_log = Path(summary["steps"]["evaluate:int8"]["log"])
    assert built_log.name == summary["steps"]["evaluate:int8"]["key"] + ".log"
    assert "perplexity" in built_log.read_text()
    assert summary["steps"]["evaluate:on-empty"]["failed_inputs"] == ["data:empty"]
    int8 = summary["steps"]["evaluate:int8"]
    assert int8["how"] == "built" and int8["variant"] == "quantize.int8"
    assert int8["data"] == "prose"  # what history compares on: before, no step recorded it
    assert [(g["gate"], g["passed"]) for g in int8["gates"]] == [("max_size_mb", False)]
    assert int8["metrics"]["size_bytes"] > 1000 and int8["seconds"] > 0
    assert int8["peak_rss_bytes"] > 50e6  # a python process with torch and onnxruntime loaded
    assert summary["run"]["exit_code"] == STEP_FAILED and summary["run"]["outcome"] == "step-failed"
    assert summary["counts"]["failed"] == 1 and summary["counts"]["input-failed"] == 2
    graph_keys = {task: step["key"] for task, step in summary["steps"].items()}
    assert all(len(k) == 64 for k in graph_keys.values())
    # Only the variant whose every gate passed is released, linked to its entry.
    assert released(ws) == {"fp32": graph_keys["capture:fp32"]}
    assert summary["release"] == {"fp32": "capture.fp32"}
    assert "exit code 1" in first.stderr and "gate failed: evaluate:int8" in first.stderr

    # The data fixed: what failed is built, nothing else runs, and only the gate is left.
    empty.write_text("\n".join(reversed(prose_file.read_text().splitlines())))  # not prose's key
    second = ws.doit(check=False)
    assert second.returncode == GATE_FAILED, second.stderr
    assert sorted(executed(second.stdout)) == ["data:empty", "evaluate:on-empty", "report"]
    summary = latest(ws)
    assert summary["steps"]["data:empty"]["status"] == "built"
    assert summary["steps"]["evaluate:int8"]["status"] == "gate-failed"
    assert summary["steps"]["evaluate:int8"]["how"] == "up-to-date"
    assert len(load_summaries(ws.artifacts / "recipe" / "runs")) == 2

    # A gate is not part of a key: relaxing it measures nothing again, and releases int8.
    ws.write(gated(base, int8_mb=1e4))
    third = ws.doit(check=False)
    assert third.returncode == OK, third.stderr
    assert executed(third.stdout) == []
    assert set(released(ws)) == {"fp32", "int8"}
    assert latest(ws)["run"]["outcome"] == "ok"  # the release changed: the run is recorded

    # Nothing changed since: no summary is written, and the exit code is still the gates'.
    fourth = ws.doit(check=False)
    assert fourth.returncode == OK and len(load_summaries(ws.artifacts / "recipe" / "runs")) == 3

    # --no-continue stops at the first failure: the steps it never reached are "not run" in the
    # summary (before, they were missing from it) and in its last lines.
    empty.write_text("")
    stopped = ws.doit("--no-continue", check=False)
    assert stopped.returncode == STEP_FAILED, stopped.stderr
    steps = latest(ws)["steps"]
    assert set(steps) == set(status) | {"evaluate:on-empty", "report"}  # every step has one
    not_run = [t for t, step in steps.items() if step["status"] == "not run"]
    assert not_run and all(f"  not run: {t} (" in stopped.stderr for t in not_run)


def test_a_wrong_recipe_exits_with_its_own_code(tmp_path: Path):
    ws = Workspace(tmp_path)
    ws.root.mkdir(exist_ok=True)
    ws.write("[model]\nsource = 3\n")
    proc = ws.doit("list", check=False)
    assert proc.returncode == BAD_COMMAND and "modelkiln:" in proc.stderr


def test_gates_judge_in_their_own_units_and_an_unmeasured_metric_fails():
    gates = check_gates({"max_size_mb": 150, "min_answer_accuracy": 0.7, "max_ppl_change": 0.1})
    results = judge(gates, {"size_bytes": 174.2e6, "ppl_change": 0.1})
    assert [(r["gate"], r["passed"]) for r in results] == [
        ("max_size_mb", False), ("min_answer_accuracy", False), ("max_ppl_change", True),
    ]  # fmt: skip
    assert results[0]["value"] == pytest.approx(174.2)
    assert describe(results[0]) == "max_size_mb 174.2 > 150"
    assert describe(results[1]) == "min_answer_accuracy: not measured"
    assert describe(results[2]) == "max_ppl_change 0.1 <= 0.1"
    [close] = judge(check_gates({"max_perplexity": 319.5}), {"perplexity": 319.97})
    assert describe(close) == "max_perplexity 319.97 > 319.5"  # was "320 > 319.5"


@pytest.mark.parametrize(
    ("gates", "says"),
    [
        ("{ max_size = 1 }", "unknown gate 'max_size'"),
        ('{ max_size_mb = "big" }', "is not a number"),
        ("{ max_size_mb = true }", "is not a number"),
        ("3", "is not a table"),
    ],
)
def test_a_bad_gate_is_a_recipe_error(tmp_path: Path, gates: str, says: str):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'[model]\nsource = "{tmp_path}"\n[data.d]\npath = "x.txt"\n'
        f'[evaluate.e]\ndata = "d"\ngates = {gates}\n'
    )
    with pytest.raises(RecipeError, match=says):
        load_recipe(recipe)


def test_gates_belong_to_evaluate_steps_only(tmp_path: Path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'[model]\nsource = "{tmp_path}"\n[capture.c]\ngates = {{ max_size_mb = 1 }}\n'
    )
    with pytest.raises(RecipeError, match="gates"):
        load_recipe(recipe)


def test_two_runs_in_one_second_keep_both_summaries(tmp_path: Path):
    summary = {"schema": 1, "run": {"id": "20261201T030000Z"}}
    first = write_summary(tmp_path, dict(summary, run=dict(summary["run"])))
    second = write_summary(tmp_path, dict(summary, run=dict(summary["run"])))
    assert (first.name, second.name) == ("20261201T030000Z.json", "20261201T030000Z-2.json")
    assert json.loads((tmp_path / "latest.json").read_text())["run"]["id"] == "20261201T030000Z-2"
    assert [s["run"]["id"] for s in load_summaries(tmp_path)] == [first.stem, second.stem]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


HISTORY = """
[model]
source = "{model}"

[data.prose]
path = "{prose}"
format = "text"
heldout_fraction = 0.25

[quantize.rtn]
bits = {bits}
group_size = 32

[evaluate.torch]
data = "prose"
seq_len = 64
max_tokens = 256
new_tokens = 4
repeats = 1

[evaluate.rtn]
from = "quantize.rtn"
data = "prose"
seq_len = 64
max_tokens = 256
new_tokens = 4
repeats = 1
gates = {{ max_ppl_change = 100 }}

[evaluate.rtn-short]
from = "quantize.rtn"
data = "prose"
seq_len = 32
max_tokens = 256
new_tokens = 4
repeats = 1
gates = {{ max_ppl_change = 100 }}
"""


def test_three_runs_make_a_history_with_the_regression_flagged(
    tmp_path: Path, tiny_model: Path, prose_file: Path
):
    """8-bit, then 4-bit, then 2-bit RTN: the report compares each run with the one before
    and the first, and flags the variant whose perplexity got worse."""
    ws = Workspace(tmp_path)
    ws.root.mkdir(exist_ok=True)
    outputs = []
    for bits in (8, 4, 2):
        ws.write(HISTORY.format(model=tiny_model, prose=prose_file, bits=bits))
        outputs.append(ws.doit(check=False))
        assert outputs[-1].returncode == GATE_FAILED, outputs[-1].stderr
    runs = ws.artifacts / "recipe" / "runs"
    summaries = load_summaries(runs)
    assert len(summaries) == 3
    ppl = [s["steps"]["evaluate:rtn"]["metrics"]["perplexity"] for s in summaries]
    torch_ppl = {s["steps"]["evaluate:torch"]["metrics"]["perplexity"] for s in summaries}
    assert ppl[2] > ppl[1] * 1.005 and len(torch_ppl) == 1  # the float model did not move
    # The perplexity change a gate reads is against the base model's evaluation with the same
    # settings; with none (seq_len 32), it is not measured and the gate fails, and a variant
    # is released only when every evaluation of it passes.
    for summary, rtn_ppl in zip(summaries, ppl, strict=True):
        (change,) = summary["steps"]["evaluate:rtn"]["gates"]
        assert change["passed"] and change["value"] == pytest.approx(rtn_ppl / torch_ppl.pop() - 1)
        torch_ppl.add(summary["steps"]["evaluate:torch"]["metrics"]["perplexity"])
        (short,) = summary["steps"]["evaluate:rtn-short"]["gates"]
        assert short["value"] is None and not short["passed"]
        assert summary["release"] == {}
    assert [s["steps"]["evaluate:torch"]["status"] for s in summaries] == [  # gates never rebuild
        "built", "up-to-date", "up-to-date",
    ]  # fmt: skip
    # The last run says it in the terminal, and the report flags it, with its history drawn.
    assert "regression: evaluate:rtn perplexity" in outputs[2].stderr
    assert "regression: evaluate:torch" not in outputs[2].stderr
    page = (runs / "index.html").read_text()
    assert "evaluate:rtn" in page and "regression" in page and page.count("<svg") >= 4
    assert summaries[0]["run"]["id"] in page  # the baseline: the first run
    assert ((runs / "graph.svg").is_file()) != ((runs / "graph.md").is_file())
    assert "http://" not in page.replace("http://www.w3.org/", "")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_a_worker_killed_under_doit_n_ends_the_run_with_its_step_failed(
    tmp_path: Path, tiny_model: Path, prose_file: Path
):
    """doit's own process runner waits forever for a worker the kernel killed (out of memory):
    ours notices, stops the run, and the step it was building is failed in the summary."""
    ws = Workspace(tmp_path)
    ws.root.mkdir(exist_ok=True)
    ws.write(tiny_recipe(tiny_model, prose_file))
    proc = ws.popen("-n", "2", "capture:fp32")
    tmp_root = ws.artifacts / "store" / ".tmp"
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_root.glob("*.*[0-9]")):
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert workers, "no doit worker found"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the run hung after its worker was killed") from None
    assert proc.returncode == STEP_FAILED, out + err
    assert "died with signal 9" in out + err and "Traceback" not in out + err
    failed = [t for t, s in latest(ws)["steps"].items() if s["status"] == "failed"]
    assert failed and all("died with signal 9" in latest(ws)["steps"][t]["error"] for t in failed)
    assert Workspace(tmp_path).doit("verify").returncode == 0  # nothing half-built is complete


def test_a_baseline_that_is_not_kept_here_warns_and_the_report_still_compares(capsys):
    """Before, the report was not written at all and last night's page stayed in place."""
    from tasks.runs import _known_baseline

    runs = [{"run": {"id": i}} for i in ("20261130T030000Z", "20261201T030000Z")]
    assert _known_baseline("20261130T030000Z", runs) == "20261130T030000Z"
    assert _known_baseline(None, runs) is None
    assert _known_baseline("20261129T030000Z", runs) is None
    err = capsys.readouterr().err
    assert "is not a run of this recipe" in err and "(did you mean 20261130T030000Z?)" in err
    assert "compares with the oldest run, 20261130T030000Z, instead" in err


def test_a_step_not_built_names_the_step_that_failed():
    """Not 'evaluate:bad failed' for an evaluation that never ran: its quantize step failed."""
    from types import SimpleNamespace

    from tasks.runs import RunReporter

    steps = {
        "quantize:bad": {"status": "failed"},
        "evaluate:bad": {"status": "input-failed", "failed_inputs": ["quantize:bad"]},
    }
    why = functools.partial(RunReporter._why_not_built, SimpleNamespace(steps=steps))
    assert why(["quantize:bad"]) == "quantize:bad failed"
    assert why(["evaluate:bad"]) == "quantize:bad failed (through evaluate:bad)"
