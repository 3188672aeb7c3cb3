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

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def doit_jobs(argv: Sequence[str]) -> int:
    """The N of doit's `-n N` / `--process N` on a command line (1 without it; the last one
    when given twice, as doit does)."""
    jobs = 1
    for i, arg in enumerate(argv):
        value = None
        if arg in ("-n", "--process") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--process="):
            value = arg.split("=", 1)[1]
        elif arg.startswith("-n") and arg[2:].isdigit():
            value = arg[2:]
        if value is not None and value.isdigit():
            jobs = max(1, int(value))
    return jobs


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
