"""doit glue: the task dictionaries dodo.py yields, and the maintenance tasks.

A step is up to date exactly when its key's manifest exists in the store, so doit's own
database decides nothing: reverting a recipe brings the earlier output back with nothing run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
from collections.abc import Iterator
from functools import partial
from typing import Any

from doit.exceptions import TaskFailed

from tasks.graph import Graph
from tasks.keys import diff_identities
from tasks.recipe import Step
from tasks.report import REPORT_STEP
from tasks.runner import run_step
from tasks.store import MANIFEST, entry_size


def _up_to_date(graph: Graph, ref: str) -> bool:
    if not graph.store.is_complete(graph.keys[ref]):
        return False
    # Keep the human-friendly link on the entry this recipe now means (after a revert too).
    graph.store.link(graph.link(ref), graph.keys[ref])
    return True


def _unlink(graph: Graph, ref: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        graph.link(ref).unlink()


def _doc(step: Step) -> str:
    """The stage's doc, its input and the settings that differ from the defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(step.spec.config)}
    params = ", ".join(f"{k}={_short(v)}" for k, v in vars(step.config).items() if v != defaults[k])
    source = f" <- {step.source}" if step.source else ""
    return f"{step.spec.doc}{source}" + (f" [{params}]" if params else "")


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= 40 else f"{text[:12]}...{text[-12:]}"


def _task(graph: Graph, ref: str, doc: str, deps: list[str]) -> dict[str, Any]:
    return {
        "actions": [(run_step, [graph, ref])],
        "targets": [str(graph.store.entry(graph.keys[ref]) / MANIFEST)],
        "uptodate": [partial(_up_to_date, graph, ref)],
        "task_dep": deps,
        "clean": [partial(_unlink, graph, ref)],
        "doc": doc,
        "verbosity": 2,
    }


def step_task(graph: Graph, step: Step) -> dict[str, Any]:
    deps = [graph.step(r).task for r in ([step.source] if step.source else []) + list(step.data)]
    task = _task(graph, step.ref, _doc(step), deps)
    if step.name:
        task["name"] = step.name
    return task


def stage_tasks(graph: Graph, stage: str, doc: str) -> Iterator[dict[str, Any]]:
    yield {"basename": stage, "name": None, "doc": doc}
    for step in graph.recipe.of_stage(stage):
        yield step_task(graph, step)


def report_task(graph: Graph) -> dict[str, Any]:
    deps = [graph.step(r).task for r in graph.evaluate_refs()]
    doc = "table, Markdown and HTML report of every evaluate step"
    return _task(graph, REPORT_STEP, doc, deps)


# ---- maintenance ---------------------------------------------------------------------------


def explain(graph: Graph, names: list[str]) -> None:
    """Why each step would run: never built, or which part of its identity changed."""
    by_task = {s.task: s.ref for s in graph.recipe.steps.values()} | {REPORT_STEP: REPORT_STEP}
    unknown = [n for n in names if n not in by_task]
    if unknown:
        print(
            f"unknown step(s): {', '.join(unknown)}; steps: {', '.join(by_task)}", file=sys.stderr
        )
    refs = [by_task[n] for n in names if n in by_task] or list(by_task.values())
    ref_of_key = {v: k for k, v in graph.keys.items()}
    for ref in refs:
        print(f"{ref.replace('.', ':', 1)}: {_why(graph, ref, ref_of_key)}")


def _why(graph: Graph, ref: str, ref_of_key: dict[str, str]) -> str:
    key = graph.keys[ref]
    if graph.store.is_complete(key):
        return f"up to date ({key[:16]}...)"
    link = graph.link(ref)
    old_key = link.resolve().name if link.is_symlink() else None
    if not old_key or not graph.store.is_complete(old_key):
        return "will run: never built"
    changes = diff_identities(graph.store.manifest(old_key)["identity"], graph.identities[ref])
    lines = []
    for change in changes:
        field = change.split(":", 1)[0]
        if field.startswith("inputs."):
            new_key = graph.identities[ref]["inputs"].get(field.split(".", 1)[1], "")
            upstream = ref_of_key.get(new_key, field.split(".", 1)[1])
            lines.append(f"input {upstream.replace('.', ':', 1)} changed")
        else:
            lines.append(change)
    return "will run: " + "; ".join(lines or ["its entry is missing from the store"])


def gc(graph: Graph, dry_run: bool) -> None:
    """Remove store entries that no link (of any recipe built here) or this recipe points at."""
    store = graph.store
    live = set(store.links().values()) | set(graph.keys.values())
    doomed = [k for k in store.built_keys() if k not in live]
    total = 0
    for key in doomed:
        manifest = store.manifest(key)
        size = entry_size(store.entry(key))
        total += size
        print(f"{'would remove' if dry_run else 'removing'} {key[:16]}... {size / 1e6:9.1f} MB  "
              f"{manifest.get('built_as', {}).get('task', '?')}")  # fmt: skip
        if not dry_run:
            store.remove(key)
    stale = store.stale_tmps()
    for tmp in stale:
        total += sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        print(f"{'would remove' if dry_run else 'removing'} unfinished build {tmp.name}")
        if not dry_run:
            shutil.rmtree(tmp, ignore_errors=True)
    verb = "would free" if dry_run else "freed"
    print(f"{len(doomed)} entries, {len(stale)} unfinished builds: {verb} {total / 1e6:.1f} MB")


def verify(graph: Graph, remove_damaged: bool) -> TaskFailed | None:
    """Re-hash every store entry against its manifest (no cache) and name each changed file."""
    store = graph.store
    damaged = {}
    for key in store.built_keys():
        if problems := store.verify(key):
            damaged[key] = problems
            print("\n".join(problems))
    if not damaged:
        print(f"verify: all {len(store.built_keys())} entries match their manifests")
        return None
    if remove_damaged:
        for key in damaged:
            store.remove(key)
        print(f"verify: removed {len(damaged)} damaged entries; `doit` rebuilds them")
        return None
    return TaskFailed(
        f"verify: {len(damaged)} damaged entries; run `doit verify --remove-damaged`, then `doit`"
        " to rebuild them"
    )
