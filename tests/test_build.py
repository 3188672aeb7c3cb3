"""The build graph end to end on a tiny model, through real `doit` processes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from workspace import Workspace, executed, tiny_recipe

from tasks.store import manifest_file

ALL = {
    "model",
    "data:prose",
    "capture:fp32",
    "quantize:int8",
    "evaluate:fp32",
    "evaluate:int8",
    "report",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model, prose_file):
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    ws.write(tiny_recipe(tiny_model, prose_file))
    first = ws.doit()
    return ws, first


def link_key(ws: Workspace, *parts: str) -> str:
    return os.readlink(ws.artifacts / "recipe" / os.path.join(*parts)).rsplit("/", 1)[-1]


def test_first_build_runs_every_step_and_prints_the_table(built):
    ws, first = built
    assert set(executed(first.stdout)) == ALL
    assert "perplexity" in first.stdout and "evaluate:int8" in first.stdout
    report = ws.artifacts / "recipe" / "report" / "report.md"
    assert "evaluate:fp32" in report.read_text()


def test_second_build_runs_nothing(built):
    ws, _ = built
    again = ws.doit()
    assert executed(again.stdout) == []


def test_change_reruns_exactly_the_step_and_its_descendants_and_revert_restores(
    built, tiny_model, prose_file
):
    ws, _ = built
    old = link_key(ws, "quantize", "int8")
    ws.write(tiny_recipe(tiny_model, prose_file, per_channel=True))
    explain = ws.doit("explain", "quantize.int8", "evaluate:int8", "report")  # either spelling
    assert "params.per_channel: false -> true" in explain.stdout
    assert "evaluate:int8: will run: input quantize:int8 changed" in explain.stdout
    assert "report: will run: input evaluate:int8 changed" in explain.stdout
    unknown = ws.doit("explain", "quantize:int9", check=False)
    assert unknown.returncode != 0
    assert "no step quantize:int9 (did you mean quantize:int8?)" in unknown.stdout + unknown.stderr
    changed = ws.doit()
    assert set(executed(changed.stdout)) == {"quantize:int8", "evaluate:int8", "report"}
    assert link_key(ws, "quantize", "int8") != old

    ws.write(tiny_recipe(tiny_model, prose_file, per_channel=False))
    reverted = ws.doit()
    assert executed(reverted.stdout) == []
    assert link_key(ws, "quantize", "int8") == old  # the earlier output is back


def test_clean_removes_the_link_and_keeps_the_entry(built):
    ws, _ = built
    link = ws.artifacts / "recipe" / "quantize" / "int8"
    entry = link.resolve()
    ws.doit("clean", "quantize:int8")
    assert not link.is_symlink() and manifest_file(entry).is_file()
    assert executed(ws.doit().stdout) == []  # still built: the link comes back, nothing runs
    assert link.resolve() == entry


def test_verify_names_a_modified_store_file(built):
    ws, _ = built
    assert ws.doit("verify").returncode == 0
    entry = ws.artifacts / "recipe" / "quantize" / "int8"
    target = entry.resolve() / "genai_config.json"
    original = target.read_bytes()
    try:
        target.write_bytes(original.replace(b"{", b"{ ", 1))
        proc = ws.doit("verify", check=False)
        assert proc.returncode != 0
        assert "genai_config.json: " in proc.stdout
        assert "Traceback" not in proc.stdout + proc.stderr
    finally:
        target.write_bytes(original)


def test_gc_removes_only_unreferenced_entries(built, tiny_model, prose_file):
    ws, _ = built
    ws.write(tiny_recipe(tiny_model, prose_file, per_channel=True))
    ws.doit()
    ws.write(tiny_recipe(tiny_model, prose_file, per_channel=False))
    ws.doit()  # relinks to the per-tensor entries: the per-channel ones are garbage now
    dry = ws.doit("gc", "--dry-run")
    assert "would remove" in dry.stdout and "MB" in dry.stdout
    before = sorted(p.name for p in (ws.artifacts / "store").glob("??/*.json"))
    ws.doit("gc")
    after = sorted(p.name for p in (ws.artifacts / "store").glob("??/*.json"))
    assert len(after) == len(before) - 3  # quantize, evaluate and report of the per-channel build
    assert executed(ws.doit().stdout) == []  # nothing the recipe needs was removed


def builders(ws: Workspace) -> list[int]:
    """Pids of the model builder processes building into this workspace."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            args = cmdline.read_bytes().split(b"\0")
            if b"onnxruntime_genai.models.builder" in args and str(ws.artifacts).encode() in (
                b" ".join(args)
            ):
                found.append(int(cmdline.parent.name))
    return found


@pytest.mark.parametrize("killed", ["group", "doit alone"])
def test_sigkill_mid_build_leaves_nothing_complete(
    tmp_path, tiny_model, prose_file, tiny_built, killed
):
    """The process group (a terminal's kill), or doit alone (the out-of-memory killer, a
    `kill -9 <pid>`): its builder child then dies with it instead of building on."""
    ws = Workspace(tmp_path)
    ws.write(tiny_recipe(tiny_model, prose_file))
    ws.seed(tiny_built, "model", "data:prose")
    ws.doit("model", "data")
    proc = ws.building("capture:fp32")
    if killed == "group":
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        deadline = time.time() + 60
        while not builders(ws) and time.time() < deadline:
            time.sleep(0.05)
        assert builders(ws), "the builder never started"
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.time() + 3  # SIGTERM at once; the builder alone takes seconds more
        while builders(ws) and time.time() < deadline:
            time.sleep(0.05)
        assert builders(ws) == [], "the builder outlived the doit that started it"
    proc.wait()
    capture = ws.artifacts / "recipe" / "capture" / "fp32"
    assert not capture.exists()
    manifests = [
        json.loads(p.read_text())["built_as"]["task"]
        for p in (ws.artifacts / "store").glob("??/*.json")
    ]
    assert "capture:fp32" not in manifests
    rerun = ws.doit("capture:fp32")
    assert executed(rerun.stdout) == ["capture:fp32"]
    assert manifest_file(capture).is_file()


def test_two_processes_on_one_workspace(tmp_path, tiny_model, prose_file):
    ws = Workspace(tmp_path)
    ws.write(tiny_recipe(tiny_model, prose_file))
    procs = [ws.popen() for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out + err
    # Each step is built by exactly one of the two; the other waits and reuses it.
    builds = re.findall(r"^  (\S+): built in ", outs[0][1] + outs[1][1], flags=re.M)
    assert sorted(builds) == sorted(ALL)
    assert ws.doit("verify").returncode == 0
    assert executed(ws.doit().stdout) == []


@pytest.mark.parametrize(
    ("writes", "input_survives"),
    [("model.onnx_augment.onnx", True), ("model.onnx", False)],  # a new file; one of its own
)
def test_a_step_that_writes_into_its_input_fails_and_the_input_is_made_whole(
    tmp_path, tiny_model, prose_file, tiny_built, writes, input_survives
):
    """Some tools write beside the model they read (INC's `_augment.onnx`, ModelOpt re-saving
    it): a published entry must never change, so the step fails; a file it added goes, and an
    input whose own files changed is removed and rebuilt."""
    import dataclasses
    import types

    from tasks.graph import load_graph
    from tasks.runner import run_step

    ws = Workspace(tmp_path)
    ws.write(tiny_recipe(tiny_model, prose_file))
    ws.seed(tiny_built, "model", "data:prose", "capture:fp32")
    ws.doit("capture:fp32")
    graph = load_graph(ws.recipe, ws.artifacts)
    step = graph.recipe.steps["quantize.int8"]

    def careless(config, ctx):
        (ctx.input / writes).write_bytes(b"written by a tool")

    graph.recipe.steps["quantize.int8"] = dataclasses.replace(
        step, spec=dataclasses.replace(step.spec, run=careless)
    )
    failed = run_step(graph, "quantize.int8", types.SimpleNamespace(values={}))  # doit's Task
    assert failed is not None and "wrote into its input" in str(failed) and writes in str(failed)
    assert not graph.store.is_complete(graph.keys["quantize.int8"])  # nothing published
    capture = graph.keys["capture.fp32"]
    assert graph.store.is_complete(capture) == input_survives
    if input_survives:
        assert graph.store.verify(capture) == []  # the added file is gone
    rebuilt = {"quantize:int8"} | (set() if input_survives else {"capture:fp32"})
    assert set(executed(ws.doit("quantize:int8").stdout)) == rebuilt
