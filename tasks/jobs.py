"""`doit -n N` runs N steps at once: each gets its share of the CPU cores.

Without this every step's torch would start a thread per core, and N steps would run N times
more threads than there are cores. (onnxruntime does not read these variables: the sessions
modelkiln opens take their thread count from OMP_NUM_THREADS itself, `onnx_run.ort_session`.)
On a 2-core machine two steps with one thread each build the default recipe in about 17
minutes, against 23 one at a time.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
from collections.abc import MutableMapping, Sequence
from multiprocessing.queues import Queue as MPQueue
from typing import Any

from doit.exceptions import InvalidTask
from doit.runner import MRunner

from tasks.errors import PreflightError
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


class WorkerKilled(InvalidTask):
    """A `doit -n` worker process died without a word (the kernel killed it)."""


class _WatchedQueue(MPQueue):
    """doit's result queue. Its parent blocks on get() until a worker answers, and a worker
    the kernel killed (out of memory) never does: this get() checks the workers while it
    waits, and stops the run when one died."""

    workers: list[Any] = []

    def __init__(self) -> None:
        super().__init__(ctx=multiprocessing.get_context())

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if not (block and timeout is None and self.workers):
            return super().get(block, timeout)
        while True:
            try:
                return super().get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in self.workers if p.exitcode not in (None, 0)]
                if dead:
                    raise WorkerKilled(
                        f"a `doit -n` worker (pid {dead[0].pid}) died with "
                        f"{_death(dead[0].exitcode)} while it built a step (out of memory?); "
                        "the run stops: run the step alone to see, or with fewer jobs"
                    ) from None


def _death(exitcode: int) -> str:
    return f"signal {-exitcode}" if exitcode < 0 else f"exit status {exitcode}"


class WatchedMRunner(MRunner):
    """doit's process runner with _WatchedQueue as its result queue."""

    Queue = staticmethod(_WatchedQueue)

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


def check_command(argv: list[str]) -> None:
    """Ray needs doit's thread workers: a `-P process` on the command line is refused."""
    if doit_option(argv, "-P", "--parallel-type") == "process":
        raise PreflightError(
            "ray= runs steps from doit's thread workers: a forked doit worker cannot use "
            "the Ray client of its parent",
            fix="leave out -P process (with ray= doit uses -P thread; -n N says how many "
            "steps are handed to Ray at once)",
        )
