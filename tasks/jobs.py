"""`doit -n N` runs N steps at once: each gets its share of the CPU cores.

Without this every step's torch would start a thread per core, and N steps would run N times
more threads than there are cores. (onnxruntime does not read these variables: the sessions
modelkiln opens take their thread count from OMP_NUM_THREADS itself, `onnx_run.ort_session`.)
On a 2-core machine two steps with one thread each build the default recipe in about 17
minutes, against 23 one at a time.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping, Sequence
from typing import Any

from doit.runner import MRunner

from tasks.errors import PreflightError, UsageError
from tasks.hostinfo import THREAD_VARIABLES


def doit_option(argv: Sequence[str], short: str, long: str) -> str | None:
    """The value of a doit option on a command line, written `-n 2`, `-n2`, `--process 2` or
    `--process=2` (the last one when given twice, as doit does); None without it."""
    value = None
    for i, arg in enumerate(argv):
        if arg in (short, long) and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(long + "="):
            value = arg.split("=", 1)[1]
        elif arg.startswith(short) and len(arg) > len(short) and not arg.startswith("--"):
            value = arg[len(short) :]
    return value


def doit_jobs(argv: Sequence[str], default: int = 1) -> int:
    """The N of doit's `-n N` / `--process N` on a command line (default without it)."""
    value = doit_option(argv, "-n", "--process")
    return max(1, int(value)) if value is not None and value.isdigit() else default


def usable_cpus() -> int:
    """Cores this process may run on: fewer than the machine's in a pinned container."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def share_cpus(jobs: int, environ: MutableMapping[str, str] = os.environ,
               cpus: int | None = None) -> int | None:  # fmt: skip
    """Set the thread count steps inherit to cores / jobs, when running more than one step
    at once and the user has not chosen a thread count; returns the count set, if any.
    Called before doit starts its worker processes, so they and their children inherit it."""
    if jobs <= 1 or any(v in environ for v in THREAD_VARIABLES):
        return None
    threads = max(1, (cpus or usable_cpus()) // jobs)
    for variable in THREAD_VARIABLES:
        environ[variable] = str(threads)
    return threads


def _watched_queue() -> Any:
    from tasks.workers import WatchedQueue  # multiprocessing.queues: only `doit -n` needs it

    return WatchedQueue()


class WatchedMRunner(MRunner):
    """doit's process runner with tasks.workers.WatchedQueue as its queues."""

    Queue = staticmethod(_watched_queue)

    def _run_start_processes(self, job_q: Any, result_q: Any) -> list[Any]:
        workers = super()._run_start_processes(job_q, result_q)
        result_q.workers = workers  # set after the fork: the workers' copies watch nothing
        return workers


def watch_workers() -> None:
    """Make `doit -n` use WatchedMRunner. doit takes its runner class from a module global of
    its `run` command (a DOIT_CONFIG setting cannot choose it), so the global is replaced."""
    import doit.cmd_run

    doit.cmd_run.MRunner = WatchedMRunner


# ---- ray= (tasks/rayrun.py builds the steps; these run on every doit start) -------------

RAY_VARIABLE = "MODELKILN_RAY"  # the `ray=` of every run, for a CI job or a builder's shell
IN_FLIGHT = 16  # steps handed to Ray at once without `-n`: Ray queues what does not fit


def ray_address(value: str | None, environ: dict[str, str] | os._Environ = os.environ) -> str:
    """The run's Ray cluster: the `ray=` variable, else MODELKILN_RAY; '' runs no Ray.
    "local" starts a cluster on this machine for the run; anything else is an address
    (`auto`: the cluster `ray start` made on this machine; `host:6379`)."""
    return (environ.get(RAY_VARIABLE, "") if value is None else value).strip()


# doit's own commands and run option that act on doit's task database. modelkiln keeps none
# (the store is the build state: a step is up to date when its key's entry is there), so each
# said it acted and changed nothing.
STATE_COMMANDS = ("forget", "ignore", "reset-dep")  # dumpdb never loads a dodo.py
ALWAYS = ("-a", "--always-execute")
LOADER_OPTIONS = ("-f", "--file", "-d", "--dir")  # doit's, with a value; before the command


def refuse_state_commands(argv: Sequence[str]) -> None:
    """A UsageError for `doit forget`, `ignore`, `reset-dep` and `doit -a`."""
    words = [a for i, a in enumerate(argv) if not a.startswith("-")
             and not (i and argv[i - 1] in LOADER_OPTIONS) and "=" not in a]  # fmt: skip
    command = words[0] if words else "run"
    if command in STATE_COMMANDS:
        said = f"`doit {command}` acts on doit's task database"
    elif any(a in ALWAYS for a in argv) and command not in ("list", "help", "info"):
        said = "`doit -a` re-runs steps doit records as done"
    else:
        return
    raise UsageError(
        f"{said}, and modelkiln keeps none: a step is up to date when the store holds its "
        "key's entry",
        "`doit explain <step>` says why a step would run; `doit verify --remove-damaged` "
        "removes damaged entries and what was built from them, which the next `doit` rebuilds",
    )


def check_command(argv: list[str]) -> None:
    """Ray needs doit's thread workers: a `-P process` on the command line is refused."""
    if doit_option(argv, "-P", "--parallel-type") == "process":
        raise PreflightError(
            "ray= runs steps from doit's thread workers: a forked doit worker cannot use "
            "the Ray client of its parent",
            fix="leave out -P process (with ray= doit uses -P thread; -n N says how many "
            "steps are handed to Ray at once)",
        )
