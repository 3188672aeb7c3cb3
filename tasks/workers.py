"""The result queue of `doit -n`, which notices a worker the kernel killed.

Its own module: multiprocessing.queues is imported by a run with `-n` only, and the class
stays at module level, where spawned and forkserver workers can unpickle it.
"""

from __future__ import annotations

import multiprocessing
import queue
from multiprocessing.queues import Queue as MPQueue
from typing import Any

from doit.exceptions import InvalidTask


class WorkerKilled(InvalidTask):
    """A `doit -n` worker process died without a word (the kernel killed it)."""


class WatchedQueue(MPQueue):
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
