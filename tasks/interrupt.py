"""Ctrl-C and SIGTERM: one line that says the run was interrupted and what it left, no traceback,
exit status 128 + the signal's number (130, 143), as a shell reports a killed command.

Nothing needs undoing: a step builds into a temporary directory and publishes with a rename, so
an interrupted one leaves no entry that looks complete, and its key's lock dies with the process.
The handler terminates what this process started (`doit -n` workers, a stage environment's child)
so nothing keeps writing after the run has said it stopped.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import subprocess
    from pathlib import Path
    from types import FrameType

_partial: dict[str, Path] = {}  # task -> the temporary directory it is building into
_children: set[subprocess.Popen] = set()


def install() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)


def building(task: str, tmp: Path | None) -> None:
    """Say which temporary directory a task builds into (None: it has finished)."""
    if tmp is None:
        _partial.pop(task, None)
    else:
        _partial[task] = tmp


def python_module(python: str, module: str, *args: str) -> list[str]:
    """The command that runs `python -m module args` for run_child, in a process that dies with
    this one even when this one is killed outright (tasks/childguard.py)."""
    return [python, "-m", "tasks.childguard", module, *args]


def run_child(cmd: list[str], **popen: Any) -> int:
    """Run a command to its end, terminated with this run if it is interrupted; its exit status."""
    import subprocess

    from tasks.childguard import PARENT  # here: only a step that starts a child needs it

    env = popen.get("env")
    popen["env"] = {**(os.environ if env is None else env), PARENT: str(os.getpid())}
    proc = subprocess.Popen(cmd, **popen)
    _children.add(proc)
    try:
        return proc.wait()
    finally:
        _children.discard(proc)


def _stop(signum: int, frame: FrameType | None) -> None:
    import multiprocessing  # here: 10 ms to import, on every `doit`, and only a signal needs it

    from tasks import steplog

    steplog.restore()  # what a step's log pipes still hold reaches the terminal first

    for proc in list(_children):
        if proc.poll() is None:
            proc.terminate()
    for worker in multiprocessing.active_children():
        worker.terminate()
    left = "".join(f"; {task} left {_left(tmp)}" for task, tmp in _partial.items())
    if multiprocessing.parent_process() is None:
        sys.stderr.write(f"\nmodelkiln: interrupted by {signal.Signals(signum).name}{left}\n")
    elif left:  # a `doit -n` worker: its parent says that the run was interrupted
        sys.stderr.write(f"modelkiln: {left[2:]}\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def _left(tmp: Path) -> str:
    """The step's build folder, and its scratch folder beside it when there is one."""
    key, _, pid = tmp.name.partition(".")
    scratch = tmp.with_name(f"{key}.scratch-{pid}")
    if scratch.exists():
        return f"{tmp} and {scratch.name} beside it (`doit gc` removes them)"
    return f"{tmp} (`doit gc` removes it)"
