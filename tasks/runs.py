"""The record of a `doit` run: what each step did, the quality gates, the release folder and
the exit code (docs/nightly.md).

doit calls a reporter on every task event; dodo.py makes this one (`RunReporter.for_graph`)
doit's reporter, so the console shows what it always showed and, when the run is over:

- every evaluate step with gates is judged on its entry's metrics (tasks/gates.py), and the
  variants that pass every gate are linked under `artifacts/<recipe>/release/<name>`;
- a run that ran a step writes `artifacts/<recipe>/runs/<run id>.json` and `latest.json`,
  and the run report `runs/index.html` (tasks/runpage.py); a run where everything was up to
  date writes nothing, so a no-op `doit` stays a no-op;
- the exit code says what happened (EXIT_CODES), the same whatever doit's own would be.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed, UnmetDependency
from doit.reporter import ConsoleReporter

from tasks.errors import KilnError, did_you_mean
from tasks.gates import describe
from tasks.graph import Graph
from tasks.hostinfo import python_version
from tasks.keys import library_version
from tasks.release import gate_verdicts, release_dir, update_release
from tasks.staging import os_problem, remove_path
from tasks.store import Store

SCHEMA = 1
OK, STEP_FAILED, DOIT_ERROR, BAD_COMMAND, GATE_FAILED = 0, 1, 2, 3, 4
EXIT_CODES = {
    OK: "every step built, pulled or up to date, and every gate passed",
    STEP_FAILED: "a step failed, or was not built because a step it needs failed",
    DOIT_ERROR: "doit itself failed (a bug)",
    BAD_COMMAND: "the command line or the recipe is wrong: nothing ran",
    GATE_FAILED: "every step was built, but a variant missed one of its quality gates",
}
RAN = ("built", "pulled", "failed", "input-failed")  # statuses that make a run worth recording
NOT_RUN = "not run"  # a step the run was asked for and never reached (graphpic draws it so)
VERSIONS = ("doit", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-genai", "peft")


class BadCommand(TaskFailed):
    """A maintenance command (gc, push, verify, ...) refused its command line: exit 3."""


class RunReporter(ConsoleReporter):
    desc = "console output, and the run summary under artifacts/<recipe>/runs/"
    graph: Graph
    argv: list[str] = []
    jobs: int = 1

    @classmethod
    def for_graph(cls, graph: Graph, argv: list[str], jobs: int) -> type[RunReporter]:
        """doit makes the reporter from its class: this one knows the run's graph."""
        return type(cls.__name__, (cls,), {"graph": graph, "argv": argv, "jobs": jobs})

    def __init__(self, outstream: Any, options: dict[str, Any]) -> None:
        super().__init__(outstream, options)
        self.started = time.time()
        self.refs = {self.graph.task(ref): ref for ref in self.graph.keys}
        self.steps: dict[str, dict[str, Any]] = {}  # by task name, in the order doit saw them
        self.running: dict[str, float] = {}  # steps started: a step with no outcome was killed
        self.aborted = ""
        self.bad_command = False  # a maintenance command refused its command line
        self.wanted: list[str] = []  # the steps the run was asked for, with their inputs

    def initialize(self, tasks: dict[str, Any], selected_tasks: list[str]) -> None:
        super().initialize(tasks, selected_tasks)
        seen, todo = set(), list(selected_tasks)
        while todo:
            if (name := todo.pop()) in tasks and name not in seen:
                seen.add(name)
                todo += tasks[name].task_dep
        self.wanted = [task for task in self.refs if task in seen]

    # ---- doit's events ---------------------------------------------------------------------

    def execute_task(self, task: Any) -> None:
        super().execute_task(task)
        if task.name in self.refs:
            self.running[task.name] = time.time()

    def runtime_error(self, msg: str) -> None:
        super().runtime_error(msg)
        self.aborted = msg  # doit stopped the run (a `doit -n` worker died): the steps it ran fail

    def skip_uptodate(self, task: Any) -> None:
        super().skip_uptodate(task)
        self._record(task, {"status": "up-to-date"})

    def add_success(self, task: Any) -> None:
        super().add_success(task)
        self._record(task, {"status": "built", **task.values})

    def add_failure(self, task: Any, fail: Any) -> None:
        super().add_failure(task, fail)
        self.bad_command = self.bad_command or isinstance(fail, BadCommand)
        if isinstance(fail, UnmetDependency):
            failed = [t for t in task.task_dep if self.steps.get(t, {}).get("status") in RAN[2:]]
            info = {"status": "input-failed", "failed_inputs": failed,
                    "error": f"not built: {self._why_not_built(failed)}"}  # fmt: skip
        else:
            info = {**task.values, "status": "failed", "error": _message(fail)}
        self._record(task, info)

    def _write_failure(self, result: dict[str, Any], write_exception: bool = True) -> None:
        """gc, push, verify, ...: their message names the command and what failed, without
        doit's `TaskFailed - taskid:push` line before it (a step's failure keeps it). A step
        or group not run because an input failed says nothing here: the run's last lines
        list it (`not built: report (evaluate:x failed)`)."""
        if isinstance(result["exception"], UnmetDependency):
            return
        if result["task"].name in self.refs or not write_exception:
            super()._write_failure(result, write_exception)
        else:
            self.write(f"{result['exception'].get_msg().rstrip()}\n")

    def _why_not_built(self, inputs: list[str]) -> str:
        """'quantize:x failed', and the steps it went through: 'quantize:x failed (through
        evaluate:x)', not 'evaluate:x failed' for a step that never ran."""
        roots, todo = [], list(inputs)
        while todo:
            task = todo.pop(0)
            info = self.steps.get(task, {})
            if info.get("status") == "input-failed":
                todo += [t for t in info.get("failed_inputs", []) if t not in todo]
            elif task not in roots:
                roots.append(task)
        if not roots:
            return "an input failed"
        through = [t for t in inputs if t not in roots]
        return f"{', '.join(roots)} failed" + (
            f" (through {', '.join(through)})" if through else ""
        )

    def _record(self, task: Any, info: dict[str, Any]) -> None:
        if task.name in self.refs:
            self.steps[task.name] = info

    def complete_run(self) -> None:
        super().complete_run()
        for task, started in self.running.items():
            if task not in self.steps:  # its worker died, or the run stopped while it ran
                why = self.aborted or "its process died before it finished"
                self.steps[task] = {"status": "failed", "started": started, "error": why}
        if not self.steps:  # gc, verify, push, ...: not a build
            if self.bad_command:
                raise SystemExit(BAD_COMMAND)
            return
        why = self.aborted or "`--no-continue` stops at the first failure"
        for task in self.wanted:  # a step the run never reached (`--no-continue`, a dead worker)
            if task not in self.steps:
                self.steps[task] = {"status": NOT_RUN, "error": f"not run: {why}"}
        code = self._finish()
        if code != OK:
            raise SystemExit(code)  # doit's own code cannot say "a gate failed"

    # ---- the end of the run ----------------------------------------------------------------

    def _finish(self) -> int:
        """Judge the gates, then the exit code from the steps alone (no write below can change
        it), then the release folder, the summary and the report, each of which costs a
        warning when its disk fails: the build itself is done."""
        graph = self.graph
        verdicts = gate_verdicts(graph)
        for task, info in self.steps.items():
            ref = self.refs[task]
            if ref in verdicts:
                info["variant"], info["gates"] = graph.step(ref).source, verdicts[ref]
                if not all(g["passed"] for g in verdicts[ref]) and info["status"] != "failed":
                    info["how"], info["status"] = info["status"], "gate-failed"
        statuses = [info["status"] for info in self.steps.values()]
        failed = any(s in RAN[2:] for s in statuses)
        code = STEP_FAILED if failed else GATE_FAILED if "gate-failed" in statuses else OK
        release, changed = _warn_on_failure("the release folder", ({}, False),
                                            update_release, graph, verdicts)  # fmt: skip
        summary = None
        if changed or any(s in RAN for s in statuses):
            summary = self._summary(code, release)
            if (
                _warn_on_failure("the run summary", None, write_summary, runs_dir(graph), summary)
                is None
            ):
                summary = None
        regressions = write_run_report(graph) if summary is not None else []
        print_outcome(graph, self.steps, code, release, summary, regressions, sys.stderr)
        return code

    def _summary(self, code: int, release: dict[str, str]) -> dict[str, Any]:
        graph, started, finished = self.graph, self.started, time.time()
        uname = os.uname()
        steps = {}
        for ref in graph.keys:  # recipe order
            task = graph.task(ref)
            if task in self.steps:
                steps[task] = step_record(graph, ref, self.steps[task])
        counts: dict[str, int] = {}
        for info in steps.values():
            counts[info["status"]] = counts.get(info["status"], 0) + 1
        remote = graph.remote
        skipped = next(
            (i["remote_skipped"] for i in self.steps.values() if "remote_skipped" in i), None
        )
        return {
            "schema": SCHEMA,
            "run": {
                "id": run_id(started),
                "started": _iso(started),
                "finished": _iso(finished),
                "seconds": round(finished - started, 3),
                "command": self.argv,
                "jobs": self.jobs,
                "exit_code": code,
                "outcome": {OK: "ok", STEP_FAILED: "step-failed", GATE_FAILED: "gate-failed"}[code],
                "remote": None if remote is None else
                {"url": remote.url, "push": remote.push_enabled, "skipped": skipped},
            },
            "recipe": {"name": graph.recipe.name, "path": str(graph.recipe.path),
                       "digest": _file_digest(graph.recipe.path)},
            "versions": {"modelkiln": library_version("modelkiln"),
                         "python": python_version(),
                         **{name: library_version(name) for name in VERSIONS}},
            "platform": {"os": uname.sysname.lower(), "machine": uname.machine.lower(),
                         "cpus": os.cpu_count(), "hostname": socket.gethostname()},
            "counts": counts,
            "steps": steps,
            "release": release,
        }  # fmt: skip


def step_record(graph: Graph, ref: str, info: dict[str, Any]) -> dict[str, Any]:
    """One step's line in the summary: how it ended, and its entry's metrics and log."""
    key, store = graph.keys[ref], graph.store
    record: dict[str, Any] = {
        "ref": ref,
        "stage": ref.split(".", 1)[0],
        "status": info["status"],
        "key": key,
        "inputs": [graph.task(r) for r in graph.inputs(ref)],
        "started": _iso(info["started"]) if "started" in info else None,
        "finished": _iso(info["finished"]) if "finished" in info else None,
        "seconds": info.get("seconds"),
        "peak_rss_bytes": info.get("peak_rss_bytes"),
    }
    for field in ("how", "error", "failed_inputs", "variant", "gates", "gpus", "node"):
        if field in info:
            record[field] = info[field]
    step = graph.recipe.steps.get(ref)
    if step is not None and step.stage == "evaluate" and step.config.data:
        record["data"] = step.config.data  # history compares a metric on one data set only
    if info["status"] not in ("failed", "input-failed") and store.is_complete(key):
        try:
            record["metrics"] = store.manifest(key).get("metrics") or {}
        except KilnError:  # an unreadable manifest: `doit verify` names it
            record["metrics"] = {}
    log = info.get("log") or _entry_log(store, key)
    record["log"] = str(log) if log else None
    if resolved := graph.identities[ref].get("resolved"):
        record["resolved"] = resolved
    return record


def _entry_log(store: Store, key: str) -> Path | None:
    path = store.log_path(key)
    return path if path.is_file() else None


def _warn_on_failure(what: str, fallback: Any, write: Any, *args: Any) -> Any:
    """write(*args), or fallback with one warning when the disk or the store refuses it."""
    try:
        return write(*args)
    except OSError as err:
        problem = os_problem(err)
    except KilnError as err:
        problem = str(err)
    print(f"modelkiln: {what} was not written: {problem}", file=sys.stderr)
    return fallback


# ---- files ----------------------------------------------------------------------------------


def runs_dir(graph: Graph) -> Path:
    return graph.store.root / graph.recipe.name / "runs"


def run_id(started: float) -> str:
    return datetime.fromtimestamp(started, UTC).strftime("%Y%m%dT%H%M%SZ")


def write_summary(folder: Path, summary: dict[str, Any]) -> Path:
    """runs/<id>.json (never over an earlier run's: -2, -3, ... if two runs share a second)
    and a copy as latest.json (replaced whole), each synced: a summary is written whole or, if
    the machine stops midway, left unreadable and skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    base, n = summary["run"]["id"], 1
    while True:
        summary["run"]["id"] = base if n == 1 else f"{base}-{n}"
        path = folder / f"{summary['run']['id']}.json"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            n += 1
    text = json.dumps(summary, indent=1).encode()
    with open(fd, "wb") as fh:
        fh.write(text)
        os.fsync(fh.fileno())
    tmp = folder / f".latest.{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(text)
            os.fsync(fh.fileno())
        os.replace(tmp, folder / "latest.json")
    finally:
        remove_path(tmp)
    return path


def load_summaries(folder: Path) -> list[dict[str, Any]]:
    """Every run summary in folder, oldest first; unreadable ones are left out."""
    out = []
    for path in sorted(folder.glob("[0-9]*.json"), key=_run_order):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(summary, dict) and summary.get("schema") == SCHEMA:
            out.append(summary)
    return out


def _run_order(path: Path) -> tuple[str, int]:
    """20261201T030000Z before 20261201T030000Z-2 (a second run in the same second)."""
    base, _, n = path.stem.partition("-")
    return base, int(n) if n.isdigit() else 1


def write_run_report(graph: Graph) -> list[str]:
    """runs/index.html (this run, its gates, the history of every metric, the trade-offs, the
    graph) and runs/graph.svg; the regressions since the last run and the baseline, one line
    each. A report that cannot be written costs a warning: the summary is the contract."""
    from tasks import graphpic, history, runpage  # only after a run that built something

    folder, settings = runs_dir(graph), graph.recipe.nightly
    summaries = load_summaries(folder)
    baseline = _known_baseline(settings.get("baseline"), summaries)
    try:
        picture = graphpic.draw(graph, graphpic.statuses_of(summaries[-1]), folder)
        svg = picture.read_text() if picture.suffix == ".svg" else None
        runpage.write_run_report(summaries, folder / "index.html", baseline,
                                 settings.get("tolerances"), svg)  # fmt: skip
        changes = history.compare(summaries, baseline, settings.get("tolerances"))
    except OSError as err:
        print(f"modelkiln: the run report was not written: {os_problem(err)}", file=sys.stderr)
        return []
    return [change.describe() for change in changes if change.regressed]


def _known_baseline(baseline: str | None, summaries: list[dict[str, Any]]) -> str | None:
    """The [nightly] baseline if it is a run kept here. One that is not (a typo, a runs folder
    a CI cache lost) costs a warning, and the report compares with the oldest run instead:
    skipping the report would leave the last run's page in place, read as tonight's."""
    ids = [s["run"]["id"] for s in summaries]
    if baseline is None or baseline in ids:
        return baseline
    print(f"modelkiln: [nightly] baseline = {baseline!r} is not a run of this recipe kept in "
          f"runs/{did_you_mean(baseline, ids[:-1])}; the report compares with the oldest run, "
          f"{ids[0]}, instead", file=sys.stderr)  # fmt: skip
    return None


def draw_graph(graph: Graph) -> None:
    """`doit graph`: the recipe's steps and their inputs, coloured by the last run."""
    from tasks import graphpic

    folder = runs_dir(graph)
    latest = folder / "latest.json"
    summary = json.loads(latest.read_text()) if latest.is_file() else None
    print(graphpic.draw(graph, graphpic.statuses_of(summary), folder))


# ---- the terminal --------------------------------------------------------------------------


def print_outcome(
    graph: Graph, steps: dict[str, dict[str, Any]], code: int, release: dict[str, str],
    summary: dict[str, Any] | None, regressions: list[str], out: Any,
) -> None:  # fmt: skip
    """A few lines for the person (or log) watching: counts, what failed and why, gates."""
    if summary is None and code == OK:
        return  # nothing ran: the up-to-date lines said it all
    counts: dict[str, int] = {}
    for info in steps.values():
        counts[info["status"]] = counts.get(info["status"], 0) + 1
    lines = ["", "modelkiln: " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    for task, info in steps.items():
        if info["status"] == "failed":
            error = info["error"].removeprefix(f"{task}: ").splitlines()[0]
            lines.append(f"  failed: {task}: {error}")
            if info.get("log"):
                lines.append(f"          log: {info['log']}")
        elif info["status"] == "input-failed":
            lines.append(f"  not built: {task} ({info['error'].removeprefix('not built: ')})")
        elif info["status"] == NOT_RUN:
            lines.append(f"  not run: {task} ({info['error'].removeprefix('not run: ')})")
        elif info["status"] == "gate-failed":
            missed = [describe(g) for g in info["gates"] if not g["passed"]]
            lines.append(f"  gate failed: {task}: {'; '.join(missed)}")
    if summary is not None and (remote := summary["run"]["remote"]) and remote["skipped"]:
        lines.append(f"  remote skipped: {remote['skipped'].splitlines()[0]}")
    lines += [f"  regression: {line}" for line in regressions]
    if release:
        where = release_dir(graph)
        lines.append(f"  released: {', '.join(sorted(release))} (in {where})")
    if summary is not None:
        folder = runs_dir(graph)
        lines.append(f"  run summary: {folder / (summary['run']['id'] + '.json')}; "
                     f"report: {folder / 'index.html'}")  # fmt: skip
    if code != OK:
        lines.append(f"  exit code {code}: {EXIT_CODES[code]}")
    print("\n".join(lines), file=out, flush=True)


def _message(fail: Any) -> str:
    """A failure's message: ours is one line and a fix; a bug's traceback, its last line."""
    text = fail.get_msg().strip() if hasattr(fail, "get_msg") else str(fail)
    if "Traceback (most recent call last)" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        return f"{last.strip()} (a bug in modelkiln or a library: the traceback is above)"
    return text


def _iso(seconds: float) -> str:
    return (
        datetime.fromtimestamp(seconds, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _file_digest(path: Path) -> str | None:
    from tasks.digest import hash_file

    try:
        return hash_file(path)
    except OSError:
        return None
