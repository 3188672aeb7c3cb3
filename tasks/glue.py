"""doit glue: the task dictionaries dodo.py yields, and the maintenance tasks.

A step is up to date exactly when its key's manifest exists in the store, so doit's own
database decides nothing: reverting a recipe brings the earlier output back with nothing run.

Every `doit` imports this module, a no-op run too (bench/noop.py times it), so what only a
step's build or one maintenance command needs (the runner, Ray, environment clean-up) is
imported where it is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed

from tasks import steplog
from tasks.errors import KilnError, StoreError, UsageError, did_you_mean
from tasks.fetch import downloads_dir
from tasks.graph import Graph, load_graph
from tasks.keys import canonical_json, diff_identities
from tasks.recipe import Step, inputs_of
from tasks.remote import RemoteStore, RemoteUnavailable
from tasks.report import REPORT_STEP
from tasks.runs import BadCommand
from tasks.stages import algorithms
from tasks.staging import Staging, disk_usage, os_problem, real_dir
from tasks.store import Store


class InStore:
    """doit's up-to-date check of a step: the store holds its key's entry. An object, so that
    `doit info <step>` names the check instead of printing the whole graph as its argument."""

    __slots__ = ("graph", "ref")

    def __init__(self, graph: Graph, ref: str) -> None:
        self.graph, self.ref = graph, ref

    def __call__(self) -> bool:
        graph, ref = self.graph, self.ref
        if not graph.store.is_complete(graph.keys[ref]):
            return False
        # Keep the human-friendly link on the entry this recipe now means (after a revert too).
        try:
            graph.store.link(graph.link(ref), graph.keys[ref])
        except KilnError:
            return False  # the step's action then says why, as one message
        return True

    def __repr__(self) -> str:
        return (f"the store holds the entry {self.graph.keys[self.ref][:16]}... "
                f"(`doit explain {self.graph.task(self.ref)}` says why not)")  # fmt: skip


def _unlink(graph: Graph, ref: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        graph.link(ref).unlink()


def _doc(step: Step, implied: bool = False) -> str:
    """What the step does (for a stage of several algorithms: the algorithm's doc; the stage's
    own line says it for the others), its input and the settings that differ from the defaults,
    written as in TOML."""
    defaults = {f.name: f.default for f in dataclasses.fields(step.spec.config)}
    params = ", ".join(
        f"{k} = {_short(json.dumps(v))}" for k, v in vars(step.config).items() if v != defaults[k]
    )
    parts = [step.spec.doc] if algorithms(step.stage) or not step.source else []
    parts += [f"<- {step.source}"] if step.source else []
    parts += [f"[{params}]"] if params else []
    parts += ["(added by the recipe)"] if implied else []
    return " ".join(parts)


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= 40 else f"{text[:12]}...{text[-12:]}"


# The Ray cluster of this run (`doit ray=...`, tasks/rayrun.py); '' builds steps in doit itself.
_ray_address = ""


def run_on_ray(address: str) -> None:
    """Steps made after this build on the Ray cluster at address."""
    global _ray_address
    _ray_address = address


def _build(graph: Graph, ref: str, task: Any) -> TaskFailed | dict[str, Any]:
    """The doit action of a step: tasks/runner.py builds it here."""
    from tasks.runner import run_step

    return run_step(graph, ref, task)


def _build_on_ray(graph: Graph, ref: str, task: Any, address: str) -> TaskFailed | dict[str, Any]:
    """The doit action of a step with ray=: tasks/rayrun.py builds it on the cluster."""
    from tasks.rayrun import ray_step

    return ray_step(graph, ref, task, address)


def _task(graph: Graph, ref: str, doc: str, deps: list[str]) -> dict[str, Any]:
    action = (_build_on_ray, [graph, ref], {"address": _ray_address}) if _ray_address else (
        _build, [graph, ref]
    )  # fmt: skip
    return {
        "actions": [action],
        # No doit `targets`: up to date means the key's manifest exists, and two steps with
        # the same settings share one entry (doit forbids two tasks with a common target).
        "uptodate": [InStore(graph, ref)],
        "task_dep": deps,
        "clean": [(_unlink, [graph, ref])],
        "doc": doc,
        "verbosity": 2,
    }


def step_task(graph: Graph, step: Step) -> dict[str, Any]:
    deps = [graph.step(r).task for r in inputs_of(step)]
    task = _task(graph, step.ref, _doc(step, step.ref in graph.recipe.implied), deps)
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


def explain(graph: Graph, names: list[str]) -> TaskFailed | None:
    """Why each step would run: never built, or which part of its identity changed."""
    task_of_key = {key: graph.task(ref) for ref, key in graph.keys.items()}
    try:
        for ref in _refs(graph, names):
            print(f"{graph.task(ref)}: {_why(graph, ref, task_of_key)}")
    except KilnError as err:
        return _failed("", err)
    return None


def _failed(verb: str, err: KilnError) -> TaskFailed:
    """The failure doit reports: a command line that asks for what cannot be exits 3."""
    kind = BadCommand if isinstance(err, UsageError) else TaskFailed
    return kind(f"{verb}: {err}" if verb else str(err))


def plural(count: int, noun: str, nouns: str) -> str:
    return f"{count} {noun if count == 1 else nouns}"


def _why(graph: Graph, ref: str, task_of_key: dict[str, str]) -> str:
    key = graph.keys[ref]
    if graph.store.is_complete(key):
        return f"up to date ({key[:16]}...)"
    link = graph.link(ref)
    old = [p.resolve().name for p in (link, graph.store.previous(link)) if p.is_symlink()]
    old = [k for k in old if k != key and graph.store.is_complete(k)]
    if not old:
        store = graph.store
        if store.manifest_path(key).exists() or store.entry(key).exists():  # one without the other
            return "will run: its entry is incomplete (`doit verify` names what is missing)"
        return "will run: never built"
    changes = diff_identities(graph.store.manifest(old[0])["identity"], graph.identities[ref])
    return "will run: " + "; ".join(_describe(c, task_of_key) for c in changes)


def _describe(change: tuple[str, Any, Any], task_of_key: dict[str, str]) -> str:
    path, old, new = change
    if isinstance(new, str) and (path == "inputs.from" or path.endswith((".data", ".step"))):
        return f"input {task_of_key.get(new, '?')} changed"
    if path.startswith("rows.") and path.endswith(".key"):  # the report: an evaluation changed
        return f"input {path.removeprefix('rows.').removesuffix('.key')} changed"
    if path.endswith(".content"):
        return f"the files named by {path.split('.')[1]} changed"
    return f"{path}: {_short(canonical_json(old))} -> {_short(canonical_json(new))}"


# `doit gc`'s options (doit reads the source of each task_* function in dodo.py as it loads
# it, so these lists live here).
GC_OPTIONS = [
    {"name": "dry_run", "long": "dry-run", "type": bool, "default": False,
     "help": "list what would be removed, remove nothing"},
    {"name": "remote", "long": "remote", "type": bool, "default": False,
     "help": "collect the remote store instead: entries none of the recipes named "
     "(default: this one) means, and uploads no manifest names"},
    {"name": "grace_hours", "long": "grace-hours", "type": float, "default": 24.0,
     "help": "with --remote: keep unnamed uploads younger than this (a push in flight)"},
]  # fmt: skip


def gc(
    graph: Graph, dry_run: bool, remote: bool = False, grace_hours: float = 24.0,
    recipes: list[str] | None = None,
) -> TaskFailed | None:  # fmt: skip
    """Remove store entries that no link (of any recipe built here) or this recipe points at,
    unused environments, and builds left by dead processes. --remote: the remote's entries that
    none of the given recipes (default: this one) means, and uploads no manifest names."""
    try:
        if remote:
            _gc_remote(graph, dry_run, grace_hours, recipes or [])
        elif recipes:  # a local gc keeps what every recipe's links point at already
            raise UsageError(
                f"recipes named ({' '.join(recipes)}) are for `doit gc --remote`",
                "`doit gc` keeps every entry a link of any recipe built here points at, and "
                "this recipe's entries: run it without them",
            )
        else:
            _gc(graph, dry_run)
    except KilnError as err:
        return _failed("gc", err)
    return None


def _gc_remote(graph: Graph, dry_run: bool, grace_hours: float, recipes: list[str]) -> None:
    if not grace_hours >= 0:  # NaN too: either would take a push's files from under it
        raise UsageError(
            f"--grace-hours {grace_hours} is not a number of hours of 0 or more",
            "pass the longest a push may take, e.g. --grace-hours 24 (the default)",
        )
    remote = _need_remote(graph)
    keep = set() if recipes else set(graph.keys.values())
    for path in recipes:  # every recipe whose entries the remote serves stays whole
        keep |= set(load_graph(Path(path), graph.store.root).keys.values())
    removed = remote.gc(keep, grace_hours * 3600, dry_run)
    for where, size in removed:
        print(f"{'would remove' if dry_run else 'removing'} {where} {size / 1e6:9.1f} MB")
    total = sum(size for _, size in removed) / 1e6
    print(f"{len(removed)} remote entries and uploads: "
          f"{'would free' if dry_run else 'freed'} {total:.1f} MB")  # fmt: skip


def _need_remote(graph: Graph) -> RemoteStore:
    if graph.remote is None:
        raise UsageError(
            "no remote store is set",
            fix='add [store] remote = "s3://bucket/prefix" to the recipe, or pass remote=<url> '
            "(or set MODELKILN_REMOTE)",
        )
    return graph.remote


def _refs(graph: Graph, names: list[str]) -> list[str]:
    """The named steps' refs (`quantize:int8`, `quantize.int8`) with the steps they are built
    from (a machine that pulls a step needs its inputs too), or every step's."""
    by_task = {graph.task(ref): ref for ref in graph.keys}
    names = [n if n in by_task else n.replace(".", ":", 1) for n in names]
    if unknown := [n for n in names if n not in by_task]:
        raise UsageError(
            "; ".join(f"no step {n}{did_you_mean(n, by_task)}" for n in unknown),
            fix="`doit list` names every step",
        )
    return graph.with_inputs([by_task[n] for n in names]) if names else list(graph.keys)


def push(graph: Graph, names: list[str]) -> TaskFailed | None:
    """Upload the recipe's entries built here (or the named steps') that the remote lacks."""
    from tasks.runner import transfer_bar

    def push_one(remote: RemoteStore, ref: str) -> str:
        if not graph.store.is_complete(graph.keys[ref]):
            return "not built here"
        with transfer_bar(graph.task(ref), "pushing") as progress:
            return remote.push(graph.store, graph.keys[ref], progress)

    return _each_step(graph, names, "push", push_one)


def pull(graph: Graph, names: list[str]) -> TaskFailed | None:
    """Download the recipe's entries (or the named steps') that the remote has and this store
    lacks, and link them, without building anything."""
    from tasks.runner import transfer_bar

    def pull_one(remote: RemoteStore, ref: str) -> str:
        key = graph.keys[ref]
        status = "here already"
        if not graph.store.is_complete(key):
            with transfer_bar(graph.task(ref), "pulling") as progress:
                pulled = remote.pull(graph.store, key, progress)
            status = "pulled" if pulled else "not on the remote"
        if graph.store.is_complete(key):
            graph.store.link(graph.link(ref), key)
        return status

    return _each_step(graph, names, "pull", pull_one)


def _each_step(
    graph: Graph, names: list[str], verb: str, act: Callable[[RemoteStore, str], str]
) -> TaskFailed | None:
    """act on each named step (or every step) with the remote: a line per step, then counts."""
    counts: Counter[str] = Counter()
    failed = []
    try:
        remote = _need_remote(graph)
        for ref in _refs(graph, names):
            try:
                status = act(remote, ref)
            except RemoteUnavailable:
                raise  # the remote itself: no other step would do better
            except KilnError as err:  # this step's entry: the others still go
                status, detail = "failed", f": {err}"
                failed.append(graph.task(ref))
            else:
                detail = ""
            counts[status] += 1
            print(f"{graph.task(ref)}: {status}{detail}")
    except KilnError as err:
        return _failed(verb, err)
    print(f"{verb}: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    return TaskFailed(f"{verb}: failed for {', '.join(failed)} (above)") if failed else None


# `doit gc` removes the logs of failed steps (artifacts/logs/failed) last written longer ago than
# this. A constant, not a flag: dodo.py declares gc's flags.
FAILED_LOG_DAYS = 14


def _gc(graph: Graph, dry_run: bool) -> None:
    from tasks import envs

    store = graph.store
    verb = "would remove" if dry_run else "removing"
    freed, removed = 0, 0
    live = set(store.links().values()) | set(graph.keys.values())
    for key in store.built_keys():
        if key in live:
            continue
        with store.lock(key, wait=False, probe=dry_run) as held:
            # Re-check under the lock: a build may have linked this entry meanwhile.
            if not held or key in store.links().values():
                continue
            size = disk_usage(store.entry(key)) + _file_size(store.log_path(key))
            print(f"{verb} {key[:16]}... {size / 1e6:9.1f} MB  {_built_as(store, key)}")
            if not dry_run:
                store.remove(key)
            freed, removed = freed + size, removed + 1
    freed += _gc_environments(graph, live, verb, dry_run)
    areas = (store.staging, envs.staging(store.root), Staging(downloads_dir(store.root)))
    stale = [("unfinished build", *found) for area in areas for found in area.sweep(dry_run)]
    stale += [("incomplete entry", *found) for found in _gc_unfinished(store, dry_run)]
    for what, tmp, size in stale:
        freed += size
        where = tmp.relative_to(store.root) if tmp.is_relative_to(store.root) else tmp
        print(f"{verb} {what} {where} {size / 1e6:9.1f} MB")
    logs = _gc_failed_logs(store.root, dry_run)
    for path, size in logs:
        freed += size
        print(f"{verb} failed log {path.relative_to(store.root)} {size / 1e3:9.1f} kB")
    builds = sum(what == "unfinished build" for what, _, _ in stale)
    print(f"{removed} entries, {builds} unfinished builds, {len(stale) - builds} incomplete "
          f"entries, {len(logs)} failed logs: "
          f"{'would free' if dry_run else 'freed'} {freed / 1e6:.1f} MB")  # fmt: skip


def _gc_failed_logs(root: Path, dry_run: bool) -> list[tuple[Path, int]]:
    """The failed steps' logs last written more than FAILED_LOG_DAYS ago: removed (dry_run:
    only listed). Only plain `*.log` files; a link is never followed, nor removed."""
    folder = root
    for part in steplog.FAILED_LOGS.parts:
        folder = folder / part
        if not folder.exists() and not folder.is_symlink():
            return []
        real_dir(folder, create=False)  # a link there is refused
    cutoff = time.time() - FAILED_LOG_DAYS * 86400
    found = []
    for path in sorted(folder.glob("*.log")):
        try:
            st = os.lstat(path)
        except FileNotFoundError:  # another gc's
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff:
            found.append((path, st.st_size))
            if not dry_run:
                path.unlink(missing_ok=True)
    return found


def _file_size(path: Path) -> int:
    try:
        return os.lstat(path).st_size
    except FileNotFoundError:
        return 0


def _gc_unfinished(store: Store, dry_run: bool) -> list[tuple[Path, int]]:
    """Entries a killed build or removal left without their manifest (or the reverse)."""
    found = []
    for key in store.unfinished():
        with store.lock(key, wait=False, probe=dry_run) as held:
            if held and not store.is_complete(key, locked=True):
                entry = store.entry(key)
                size = disk_usage(entry) if entry.is_dir() else 0
                found.append((entry, size + _file_size(store.log_path(key))))
                if not dry_run:
                    store.remove(key)
    return found


def _gc_environments(graph: Graph, live: set[str], verb: str, dry_run: bool) -> int:
    """Remove the stage environments that no step of this recipe and no kept entry uses."""
    from tasks import envs

    declared = [s.spec.environment_of(s.config) for s in graph.recipe.steps.values()]
    used = {env.key for env in declared if env is not None}
    for key in live:
        with contextlib.suppress(StoreError):
            if graph.store.is_complete(key):
                used.add(graph.store.manifest(key)["identity"].get("environment"))
    freed = 0
    for key, folder in envs.managed_envs(graph.store.root).items():
        if key in used:
            continue
        size = disk_usage(folder)
        print(f"{verb} environment {folder.name} {size / 1e6:9.1f} MB")
        if not dry_run:
            shutil.rmtree(folder)
        freed += size
    return freed


def _built_as(store: Store, key: str) -> str:
    try:
        return store.manifest(key).get("built_as", {}).get("task", "?")
    except StoreError:
        return "(unreadable manifest)"


VERIFY_OPTIONS = [
    {"name": "remove_damaged", "long": "remove-damaged", "type": bool, "default": False,
     "help": "remove damaged entries and those built from them, so `doit` rebuilds them"},
    {"name": "dry_run", "long": "dry-run", "type": bool, "default": False,
     "help": "with --remove-damaged: list what would be removed, remove nothing"},
    {"name": "remote", "long": "remote", "type": bool, "default": False,
     "help": "verify the remote store's entries instead (downloads every file)"},
]  # fmt: skip


def verify(
    graph: Graph, remove_damaged: bool, dry_run: bool = False, remote: bool = False
) -> TaskFailed | None:
    """Re-hash every store entry against its manifest (no cache), name each problem and the
    entries built from damaged ones; --remove-damaged removes them all (--dry-run: lists).
    --remote: the remote's entries instead (downloads each file once to hash it)."""
    if remote:
        return _verify_remote(graph, remove_damaged, dry_run)
    store = graph.store
    try:
        damaged = store.audit()
        downstream = store.dependents(set(damaged))
    except KilnError as err:
        return _failed("verify", err)
    for problems in damaged.values():
        print("\n".join(problems))
    for key in sorted(downstream):
        print(f"{store.entry(key)}: built from a damaged entry ({_built_as(store, key)})")
    if not damaged:
        print(f"verify: all {len(store.built_keys())} entries match their manifests")
        return None
    count = f"{plural(len(damaged), 'damaged entry', 'damaged entries')} and {len(downstream)} built from them"
    if remove_damaged and dry_run:
        print(f"verify: would remove {count}")
    elif remove_damaged:
        try:
            for key in damaged:
                store.remove_damaged(key)
            for key in sorted(downstream):
                store.remove_damaged(key, built_from_damage=True)
        except (KilnError, OSError) as err:  # a read-only store, say
            problem = err if isinstance(err, KilnError) else os_problem(err, doing="remove")
            return TaskFailed(f"verify: {problem}")
        print(f"verify: removed {count}; `doit` rebuilds what the recipe needs")
        return None
    return TaskFailed(
        f"verify: {count}; run `doit verify --remove-damaged`, then `doit` to rebuild them"
    )


def _verify_remote(graph: Graph, remove_damaged: bool, dry_run: bool) -> TaskFailed | None:
    entries = ""
    try:
        remote = _need_remote(graph)
        keys = remote.built_keys()
        damaged = {key: problems for key in keys if (problems := remote.verify(key))}
        for problems in damaged.values():
            print("\n".join(problems))
        if not damaged:
            print(f"verify: all {len(keys)} remote entries match their manifests")
            return None
        entries = plural(len(damaged), "damaged remote entry", "damaged remote entries")
        if remove_damaged and not dry_run:
            for key in damaged:
                remote.remove(key)
            print(f"verify: removed {entries}; a push replaces them")
            return None
    except KilnError as err:
        return _failed("verify", err)
    if dry_run:
        print(f"verify: would remove {entries}")
        return None
    return TaskFailed(
        f"verify: {entries}; `doit verify --remote --remove-damaged` removes them (a push "
        "replaces them)"
    )
