"""Run one step: lock its key, build into a temporary directory, publish, link.

A step that fails leaves its temporary directory (for inspection) and no manifest, so a
failure is never cached. Errors the user can act on come back as one message, no traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed

from tasks import interrupt, slots, steplog
from tasks.errors import KilnError, StageError
from tasks.graph import Graph
from tasks.procmem import StepMemory
from tasks.recipe import inputs_of
from tasks.remote import Progress, RemoteStore, RemoteUnavailable
from tasks.report import REPORT_STEP, make_rows, text_table, write_report
from tasks.stages import StepContext
from tasks.staging import FILESYSTEM_ERRORS, disk_usage, os_problem, real_dir, remove_path
from tasks.store import Build, Store

LOW_SPACE = 64 << 20  # bytes: below this, a failed step is reported as a full disk
STEP_LOG = ".step.log"  # in the build folder while the step runs; beside its manifest after


def run_step(
    graph: Graph, ref: str, task: Any, assigned: slots.Assigned | None = None
) -> TaskFailed | dict[str, Any]:
    """The doit action of a step. What the run summary needs (tasks/runs.py: how the step
    ended, its time and memory) comes back as the task's values, which doit hands from a
    `doit -n` worker to the parent; doit passes its Task object as `task`. assigned: the
    GPUs and threads a Ray node gave the step (tasks/rayrun.py), instead of local slots."""
    name = graph.task(ref)
    info: dict[str, Any] = {"started": time.time()}
    memory = StepMemory()
    try:
        with memory:
            if ref != REPORT_STEP:
                graph.step(ref).spec.preflight()
            info["status"] = _build(graph, ref, name, info, assigned)  # each stage logs its summary
    except Exception as err:
        task.values.update(_finish(info, memory))  # a bug's too: its log matters most
        problem = _machine_problem(err, graph.store.store_dir)
        if problem is None and not isinstance(err, KilnError):
            raise  # a bug: its traceback is what helps
        return TaskFailed(f"{name}: {problem or err}")
    finally:
        if skipped := _skipped.get(getattr(graph.remote, "url", "")):
            task.values["remote_skipped"] = skipped
    return _finish(info, memory)


def _finish(info: dict[str, Any], memory: StepMemory) -> dict[str, Any]:
    finished = time.time()
    return {**info, "finished": finished, "seconds": round(finished - info["started"], 3),
            "peak_rss_bytes": memory.peak}  # fmt: skip


def _machine_problem(err: Exception, where: Path) -> str | None:
    """One message for a failure of the machine rather than the step: a full disk (which
    libraries report in many ways: an OSError, sqlite's "disk is full", a protobuf "corrupt"
    read of a file written short, a child process's traceback), a read-only or forbidden path.
    None for anything else."""
    if isinstance(err, OSError) and err.errno in FILESYSTEM_ERRORS:
        return os_problem(err, where)  # where the step writes, if the error names no file
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return None
    if free >= LOW_SPACE:
        return None
    last = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    return (
        f"the disk holding {where} has only {free / 1e6:.1f} MB free: the step most likely ran "
        f"out of space (it said: {last[-1][:200]})\n  fix: free space there (`doit gc` removes "
        "unused entries), then run `doit` again"
    )


def _build(
    graph: Graph, ref: str, task: str, info: dict[str, Any], assigned: slots.Assigned | None
) -> str:
    """Build and publish ref's entry: "built", "pulled" (from the remote), or "up-to-date"
    (another process built it while this one waited). The step's output goes to its log too,
    beside its manifest (`Store.log_path`); a failed step's log is moved under
    artifacts/logs/failed/ and named in info["log"]."""
    store, key = graph.store, graph.keys[ref]

    def waiting() -> None:
        print(f"  {task}: another process is building {key[:12]}..., waiting", file=sys.stderr)

    link = graph.link(ref)
    with store.build(key, on_wait=waiting) as build, contextlib.ExitStack() as gpus:
        if build is None:  # built by another process while this one waited
            store.link(link, key)
            return "up-to-date"
        if graph.remote is not None and _pulled(graph.remote, task, build):
            store.link(link, key)
            print(f"  {task}: pulled from {graph.remote.url} -> {link}", file=sys.stderr)
            return "pulled"
        # GPU slots (tasks/slots.py) are held from here to the entry's publication: under the
        # key's lock, as a process holding a GPU while it waits for a key whose builder waits
        # for that GPU would wait forever; after any pull, as a download needs no GPU.
        resources = None if ref == REPORT_STEP else graph.step(ref).resources
        gpus.enter_context(
            slots.held(resources, graph.identities[ref], store.root, task, info, assigned)
        )
        # Until the new entry exists the link must not show the old one as current; the old
        # target stays reachable (for `explain`, and safe from `gc`) as a hidden link.
        store.set_aside(link)
        interrupt.building(task, build.folder)
        started = time.time()
        log = build.folder / STEP_LOG  # in the build: a killed build's goes with it (`doit gc`)
        try:
            with steplog.capture(log, title=task):
                metrics = _run(graph, ref, task, build.folder)
        except BaseException as err:
            info |= _keep_failed_log(log, store.root, task, err)
            print(f"  {task}: failed after writing {disk_usage(build.folder) / 1e6:.1f} MB; "
                  f"partial output left in {build.folder} (`doit gc` removes it)"
                  + (f"; its log: {info['log']}" if "log" in info else ""), file=sys.stderr)  # fmt: skip
            raise
        # Beside the manifest, not in the entry: the entry holds only the step's files.
        os.replace(log, real_dir(store.log_path(key).parent) / store.log_path(key).name)
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
        build.publish(manifest)
        interrupt.building(task, None)
        store.link(link, key)  # under the lock: gc never sees a new entry without its link
        store.forget_previous(link)
    print(f"  {task}: built in {manifest['timings']['seconds']:.1f} s -> {link}", file=sys.stderr)
    if graph.remote is not None and graph.remote.push_enabled:
        push_step(graph.remote, store, key, task)
    return "built"


def pull_step(graph: Graph, ref: str, task: str) -> str:
    """Make ref's entry complete here from the remote, and link it: a Ray node's inputs, and
    the driver's copy of what a node with its own workspace built. "pulled", or "up-to-date"
    when it was here already; StageError when the remote does not hold it either."""
    store, key, remote = graph.store, graph.keys[ref], graph.remote
    with store.build(key) as build:
        if build is not None:
            try:
                if remote is None:
                    raise StageError(f"{task} ({key[:12]}...) is not in {store.root}, and "
                                     "there is no remote store to pull it from")  # fmt: skip
                with transfer_bar(task, "pulling") as progress:
                    if remote.pull_into(build, key, progress) is None:
                        raise StageError(f"{task} ({key[:12]}...) is neither in {store.root} "
                                         f"nor on {remote.url}")  # fmt: skip
            except BaseException:
                shutil.rmtree(build.folder, ignore_errors=True)
                raise
        store.link(graph.link(ref), key)
    return "up-to-date" if build is None else "pulled"


def _keep_failed_log(log: Path, artifacts: Path, task: str, err: BaseException) -> dict[str, str]:
    """Add what failed (with the traceback of a bug) to a failed step's log and move it under
    artifacts/logs/failed/: {"log": where}, or {} when there is no log (a full disk)."""
    try:
        with open(log, "a") as fh:
            why = str(err) if isinstance(err, KilnError) else traceback.format_exc()
            fh.write(f"\n{task} failed: {why}\n")
        return {"log": str(steplog.keep_failed(log, artifacts, task))}
    except OSError:
        return {}


def _pulled(remote: RemoteStore, task: str, build: Build) -> bool:
    """Whether the remote had the key and its entry is now published here. An entry that does
    not check out costs a warning and a local build; a remote that cannot be used at all is
    skipped for the rest of this process (one warning, not one per step). With remote_only,
    either fails the step instead."""
    problem = _skipped.get(remote.url)
    if problem is None:
        try:
            with transfer_bar(task, "pulling") as progress:
                if remote.pull_into(build, build.key, progress) is not None:
                    return True
            problem = f"not on the remote {remote.url}"
        except RemoteUnavailable as err:
            problem = str(err)
            if _first_to_skip(remote.url, problem):
                print(f"  {task}: the remote is skipped for this run: {err}", file=sys.stderr)
        except KilnError as err:
            problem = str(err)
            print(f"  {task}: not pulled, building it here: {err}", file=sys.stderr)
    if remote.remote_only:
        shutil.rmtree(build.folder, ignore_errors=True)  # nothing is built into it
        raise StageError(
            f"{problem.splitlines()[0]}; with remote_only nothing is built here",
            fix="build it where push is on (a CI job), or set remote_only = false",
        )
    return False


# Remotes this process found unusable (by URL): later steps do not ask them again.
_skipped: dict[str, str] = {}


def _first_to_skip(url: str, problem: str) -> bool:
    """Record the remote as unusable; whether this was the first record, which alone warns
    (steps on other threads, as Ray's runner has them, can fail on it at the same moment;
    `doit -n` workers are processes, each with its own record and its own warning)."""
    return _skipped.setdefault(url, problem) is problem


def push_step(remote: RemoteStore, store: Store, key: str, task: str) -> None:
    """Upload a step just built. A remote that cannot be used is skipped for the rest of the
    run (one warning) and the build goes on: `doit push` uploads what it missed. Anything
    else (a local entry that changed since it was published) fails the step."""
    if remote.url in _skipped:
        return
    try:
        with transfer_bar(task, "pushing") as progress:
            status = remote.push(store, key, progress)
    except RemoteUnavailable as err:
        if _first_to_skip(remote.url, str(err)):
            print(f"  {task}: not pushed, and the remote is skipped for this run (`doit push` "
                  f"uploads what it missed): {err}", file=sys.stderr)  # fmt: skip
        return
    except KilnError as err:
        raise StageError(
            f"built here, but not pushed to {remote.url}: {err}",
            fix=f"`doit push {task}` uploads it once the remote works again",
        ) from None
    if status == "lost":
        print(f"  {task}: another machine pushed {key[:12]}... first; its entry stays on the "
              "remote, this one here", file=sys.stderr)  # fmt: skip


@contextlib.contextmanager
def transfer_bar(task: str, verb: str) -> Iterator[Progress]:
    """A byte progress bar for a download or upload, drawn once the size is known."""
    from tqdm import tqdm

    bar: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"  {task}: {verb}",
                       file=sys.stderr, leave=False, mininterval=0.5 if steplog.interactive() else 30)  # fmt: skip
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


def _run(graph: Graph, ref: str, task: str, tmp: Path) -> dict[str, Any]:
    if ref == REPORT_STEP:
        return _run_report(graph, tmp)
    step = graph.step(ref)
    inputs = {graph.keys[r]: graph.task(r) for r in inputs_of(step)}
    for key, name in inputs.items():
        _refuse_damaged_input(graph, name, key)
    scratch = graph.store.new_tmp(graph.keys[ref], "scratch")
    ctx = StepContext(
        task=task, out=tmp, artifacts=graph.store.root, scratch=scratch,
        find_entry=graph.store.complete_entry,
    )  # fmt: skip
    if step.source:
        ctx.input = graph.entry(step.source)
    for data_ref in step.data:
        ctx.data[data_ref.split(".", 1)[1]] = graph.entry(data_ref)
    for field, other in step.extra:
        ctx.steps[field] = graph.entry(other)
    try:
        metrics = step.spec.run(_as_keyed(graph, ref), ctx) or {}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for key, name in inputs.items():
        _refuse_changed_input(graph, task, name, key)
    return metrics


def _as_keyed(graph: Graph, ref: str) -> Any:
    """The step's config with `device = "auto"` made the device its key was computed for, so
    the step runs where its key says (a GPU that appeared meanwhile changes nothing)."""
    config = graph.step(ref).config
    if getattr(config, "device", None) == "auto":
        return dataclasses.replace(config, device=graph.identities[ref]["device"]["type"])
    return config


def _refuse_damaged_input(graph: Graph, name: str, key: str) -> None:
    """A step never reads an input whose files changed since it was published (a stat per
    file, a read of each file whose stat differs; `doit verify` is the full check): what it
    built would carry the damage on."""
    changed, added = graph.store.content_changes(key)
    if changed or added:
        raise StageError(
            f"its input {name} ({graph.store.entry(key)}) changed since it was built "
            f"({', '.join((changed + added)[:5])}), so nothing is built from it",
            fix="run `doit verify --remove-damaged` (it removes the damaged entry and what was "
            "built from it), then `doit` to rebuild them",
        )


def _refuse_changed_input(graph: Graph, task: str, name: str, key: str) -> None:
    """Some tools write beside the model they read (onnx-neural-compressor's `_augment.onnx`,
    ModelOpt re-saving its input, onnxruntime's `-inferred.onnx`), and a published entry must
    never change: the step fails. Files it added are removed (the entry is intact again); an
    entry whose own files changed is removed, and the next `doit` rebuilds it."""
    store = graph.store
    changed, added = store.content_changes(key)
    if not (changed or added):
        return
    entry = store.entry(key)
    for rel in added:
        remove_path(entry / rel)
    if changed:
        with store.lock(key):
            store.remove(key)
    fate = f"it is removed and `doit` rebuilds {name}" if changed else "they are removed"
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
