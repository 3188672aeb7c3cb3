"""Run one step: lock its key, build into a temporary directory, publish, link.

A step that fails leaves its temporary directory (for inspection) and no manifest, so a
failure is never cached. Errors the user can act on come back as one message, no traceback.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed

from tasks.digest import list_files
from tasks.errors import KilnError, StageError
from tasks.graph import Graph
from tasks.recipe import inputs_of
from tasks.report import REPORT_STEP, make_rows, text_table, write_report
from tasks.stages import StepContext


def run_step(graph: Graph, ref: str) -> TaskFailed | None:
    """The doit action of a step."""
    task = graph.task(ref)
    try:
        if ref != REPORT_STEP:
            graph.step(ref).spec.preflight()
        _build(graph, ref, task)  # each stage logs its own summary
    except KilnError as err:
        return TaskFailed(f"{task}: {err}")
    return None


def _build(graph: Graph, ref: str, task: str) -> dict[str, Any] | None:
    """Build and publish ref's entry; None when another process built it meanwhile."""
    store, key = graph.store, graph.keys[ref]

    def waiting() -> None:
        print(f"  {task}: another process is building {key[:12]}..., waiting", file=sys.stderr)

    link = graph.link(ref)
    with store.lock(key, on_wait=waiting):
        if store.is_complete(key):
            store.link(link, key)
            return None
        # Until the new entry exists the link must not show the old one as current; the old
        # target stays reachable (for `explain`, and safe from `gc`) as a hidden link.
        store.set_aside(link)
        tmp = store.new_tmp(key)
        started = time.time()
        try:
            metrics = _run(graph, ref, task, tmp)
        except BaseException:
            print(f"  {task}: failed; partial output left in {tmp}", file=sys.stderr)
            raise
        manifest = {
            "key": key,
            "identity": graph.identities[ref],
            "format": "report" if ref == REPORT_STEP else graph.step(ref).spec.output,
            "built_as": {"recipe": str(graph.recipe.path), "task": task},
            "metrics": metrics,
            "timings": {"started": started, "seconds": round(time.time() - started, 3)},
            "python": platform.python_version(),
            "platform": platform.platform(),
        }
        store.publish(key, tmp, manifest)
        store.link(link, key)  # under the lock: gc never sees a new entry without its link
        store.forget_previous(link)
    print(f"  {task}: built in {manifest['timings']['seconds']:.1f} s -> {link}", file=sys.stderr)
    return metrics


def _run(graph: Graph, ref: str, task: str, tmp: Any) -> dict[str, Any]:
    if ref == REPORT_STEP:
        return _run_report(graph, tmp)
    step = graph.step(ref)
    ctx = StepContext(task=task, out=tmp, artifacts=graph.store.root)
    if step.source:
        ctx.input = graph.entry(step.source)
    for data_ref in step.data:
        ctx.data[data_ref.split(".", 1)[1]] = graph.entry(data_ref)
    for field, ref in step.extra:
        ctx.steps[field] = graph.entry(ref)
    inputs = {graph.keys[r]: graph.entry(r) for r in inputs_of(step)}
    before = {key: entry_state(entry) for key, entry in inputs.items()}
    metrics = step.spec.run(step.config, ctx) or {}
    _refuse_changed_inputs(graph, task, inputs, before)
    return metrics


def entry_state(entry: Path) -> dict[str, tuple[int, int]]:
    """Each file's (size, mtime): enough to notice a write, without reading anything."""
    state = {}
    for rel in list_files(entry):
        stat = (entry / rel).stat()
        state[rel.as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return state


def _refuse_changed_inputs(
    graph: Graph, task: str, inputs: dict[str, Path], before: dict[str, dict[str, Any]]
) -> None:
    """Some tools write beside the model they read (onnx-neural-compressor's `_augment.onnx`,
    ModelOpt re-saving its input, onnxruntime's `-inferred.onnx`), and a published entry must
    never change: the step fails. Files it added are removed (the entry is intact again); an
    entry whose own files changed is removed, and the next `doit` rebuilds it."""
    for key, entry in inputs.items():
        recorded = {f["path"] for f in graph.store.manifest(key)["files"]}
        after = entry_state(entry)
        changed = sorted(p for p in recorded if before[key].get(p) != after.get(p))
        added = sorted(set(after) - set(before[key]) - recorded)
        for rel in added:
            (entry / rel).unlink(missing_ok=True)
        if changed:
            graph.store.remove(key)
        if changed or added:
            fate = "it is removed and `doit` rebuilds it" if changed else "they are removed"
            raise StageError(
                f"{task} wrote into its input {entry} ({', '.join(changed + added)}): a bug in "
                f"the stage or the library it calls; {fate}"
            )


def _run_report(graph: Graph, out: Any) -> dict[str, Any]:
    evaluations = []
    for ref in graph.evaluate_refs():
        step = graph.step(ref)
        metrics = graph.store.manifest(graph.keys[ref])["metrics"]
        evaluations.append((step.task, step.source or "", step.config.data, metrics))
    rows = make_rows(evaluations)
    write_report(out, rows, f"modelkiln report: {graph.recipe.name}")
    print(f"\n{text_table(rows)}\n", flush=True)
    return {"rows": len(rows)}
