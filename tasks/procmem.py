"""Peak memory of one step, even inside a long-lived doit process.

ru_maxrss only grows over a process's life, so it cannot say what one step used. Linux resets
the peak RSS (VmHWM) when "5" is written to /proc/self/clear_refs; we do that at the start and
read VmHWM at the end. Child processes (a stage's own environment) are seen through
RUSAGE_CHILDREN, which also only grows: a step whose child set a new peak is charged with it.
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path


def reset_peak() -> bool:
    """Restart this process's peak RSS from its current RSS; False where Linux does not allow it."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
        return True
    return False


def peak_rss() -> int | None:
    """This process's peak RSS in bytes since the last reset (VmHWM); None off Linux."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def children_peak() -> int:
    """The largest peak RSS, in bytes, of any child process this one has waited for."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


class StepMemory:
    """The peak RSS of a block of work: this process's, or a child's if one set a new high."""

    def __enter__(self) -> StepMemory:
        self.reset = reset_peak()
        self.children_before = children_peak()
        self.peak: int | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        own = peak_rss() if self.reset else None
        child = children_peak()
        child = child if child > self.children_before else 0
        self.peak = max(own or 0, child) or None
