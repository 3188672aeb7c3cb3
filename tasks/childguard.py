"""`python -m tasks.childguard <module> [args]`: run a module as `python -m <module>` does, in a
process that dies with the doit that started it.

Ctrl-C and SIGTERM reach a step's children through interrupt.py, but a doit killed outright
(SIGKILL, the kernel's out-of-memory killer) tells nobody: its child would be re-parented and go
on building, for minutes and gigabytes, into a folder that `doit gc` may already have removed.
On Linux the kernel sends this process SIGTERM when the thread that started it dies.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

PARENT = "MODELKILN_PARENT_PID"  # set by interrupt.run_child: the pid of the doit that waits
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if parent and os.getppid() != parent:  # it died before the call: no signal will come
        os._exit(128 + signal.SIGTERM)


def main() -> None:
    die_with_parent(int(os.environ.pop(PARENT, "0") or 0))
    sys.argv = sys.argv[1:]  # as `python -m <module> [args]` has them
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
