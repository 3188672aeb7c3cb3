"""What a step needs to run (`resources = { gpus = 1, cpus = 4 }`), and GPU slots on one machine.

With `doit -n N` on a machine with G GPUs, a step that needs g GPUs takes g free slots for its
build, waits while there are not enough, and gives them back when it ends. A slot is a kernel
file lock, `<artifacts>/cache/gpu-slots/<id>.lock`, so every doit process on this artifacts
folder shares the slots and a killed holder's slots free themselves. While a step holds slots,
CUDA_VISIBLE_DEVICES names them, for its own torch and the processes it starts.

CUDA reads CUDA_VISIBLE_DEVICES once per process, when the driver starts (torch: the first
`torch.cuda.is_available()`, `device_count()` or tensor on a GPU); a doit worker runs many steps.
So the GPUs this process's CUDA sees are recorded when it starts: later steps here take slots
among those (a worker whose first GPU step had GPU 1 keeps GPU 1), and where it sees more than
the step holds, torch's current device is set to the step's first GPU.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.errors import PreflightError, StoreError, did_you_mean
from tasks.hostinfo import THREAD_VARIABLES, gpu_models
from tasks.record import Record, frozen
from tasks.staging import os_problem, real_dir

GPUS_VARIABLE = "MODELKILN_GPUS"  # the machine's GPU count, instead of the one the driver says
VISIBLE = "CUDA_VISIBLE_DEVICES"
SLOTS_DIR = Path("cache", "gpu-slots")  # under the artifacts root
POLL_SECONDS = 0.2  # how often a waiting step tries the slots again


@frozen
class Resources(Record):
    """A step's `resources = { gpus = 1, cpus = 4 }`, never part of its key. None is the
    default: gpus 1 when the step's device is CUDA, else 0; cpus the share of the cores that
    `doit -n` gives every step (tasks/jobs.py)."""

    gpus: int | None = None
    cpus: int | None = None


def check_resources(table: object) -> Resources:
    """A recipe's `resources` value as Resources; ValueError says what is wrong."""
    if not isinstance(table, dict):
        raise ValueError(f"resources = {table!r} is not a table")
    fields = ("gpus", "cpus")
    unknown = [key for key in table if key not in fields]
    if unknown:
        hint = did_you_mean(unknown[0], fields) if len(unknown) == 1 else ""
        raise ValueError(f"resources: unknown key {', '.join(map(repr, unknown))}{hint}")
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"resources: {key} = {value!r} is not a whole number >= 0")
    if table.get("cpus") == 0:
        raise ValueError("resources: cpus = 0 leaves the step no thread to run on")
    return Resources(**table)


def gpus_needed(resources: Resources | None, identity: dict[str, Any]) -> int:
    """How many GPU slots a step takes: its `resources.gpus`, else 1 when its device (as its
    key resolved it: tasks/graph.py, device_identity) is CUDA."""
    if resources is not None and resources.gpus is not None:
        return resources.gpus
    return 1 if identity.get("device", {}).get("type") == "cuda" else 0


def gpu_ids(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The id CUDA_VISIBLE_DEVICES takes for each slot, slot 0 first: the GPUs this process may
    use ("0", "1", ... or the entries of a CUDA_VISIBLE_DEVICES it was started with), or
    MODELKILN_GPUS of them (how tests declare GPUs a machine does not have)."""
    visible = environ.get(VISIBLE)
    listed = None
    if visible is not None:
        listed = [d.strip() for d in visible.split(",") if d.strip() not in ("", "-1")]
    declared = environ.get(GPUS_VARIABLE)
    if declared is not None:
        if not declared.strip().isdigit():
            raise PreflightError(
                f"{GPUS_VARIABLE}={declared!r} is not a number of GPUs",
                fix=f"set {GPUS_VARIABLE} to a count (0 or more), or unset it to count the "
                "machine's GPUs",
            )
        count = int(declared)
        if listed is not None and len(listed) >= count:
            return listed[:count]
        return [str(i) for i in range(count)]
    physical = len(gpu_models())  # none when CUDA_VISIBLE_DEVICES hides them all
    return listed[:physical] if listed is not None else [str(i) for i in range(physical)]


class GpuSlots:
    """The machine's GPU slots: one kernel file lock each, in folder."""

    def __init__(self, folder: Path, ids: Sequence[str]) -> None:
        self.folder, self.ids = folder, list(ids)

    def lock_name(self, slot: int) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.ids[slot]) + ".lock"

    @contextlib.contextmanager
    def take(
        self, count: int, among: Sequence[int] | None = None, on_wait: Any = None
    ) -> Iterator[list[int]]:
        """Hold `count` free slots (from `among`, default all) for the block; yields their
        indices. While too few are free: on_wait() once, then try again every POLL_SECONDS.
        Nothing is kept while waiting, so two steps that need two GPUs each cannot each hold
        one forever."""
        import filelock  # only where a slot is taken: a no-op `doit` takes none

        candidates = list(range(len(self.ids)) if among is None else among)
        assert 0 < count <= len(candidates), (count, candidates)
        folder = real_dir(self.folder)
        held: list[tuple[int, Any]] = []
        try:
            while True:
                for slot in candidates:
                    lock = filelock.UnixFileLock(
                        folder / self.lock_name(slot), thread_local=False,
                        fallback_to_soft=False, preserve_lock_file=True,
                    )  # fmt: skip
                    try:
                        lock.acquire(blocking=False)
                    except filelock.Timeout:
                        continue
                    except OSError as err:
                        raise StoreError(os_problem(err, lock.lock_file, "lock")) from None
                    held.append((slot, lock))
                    if len(held) == count:
                        yield [slot for slot, _ in held]
                        return
                _release(held)
                if on_wait is not None:
                    on_wait()
                    on_wait = None
                time.sleep(POLL_SECONDS)
        finally:
            _release(held)


def _release(held: list[tuple[int, Any]]) -> None:
    while held:
        held.pop()[1].release()


@frozen
class Assigned(Record):
    """What a cluster scheduler (Ray, tasks/rayrun.py) gave a step: the GPUs it already put in
    CUDA_VISIBLE_DEVICES, and a thread count. No slot is taken on top of them."""

    gpus: list[int | str]
    cpus: int
    node: str = ""  # the scheduler's name for the machine


@contextlib.contextmanager
def held(
    resources: Resources | None, identity: dict[str, Any], artifacts: Path, task: str,
    info: dict[str, Any], assigned: Assigned | None = None,
) -> Iterator[None]:  # fmt: skip
    """The runner's: a step's build holds its GPU slots and runs with its thread count.
    info (the step's values for the run summary) gets "gpus", the slot indices it held, and
    its "started" becomes the time it got them (waiting is not building)."""
    if assigned is not None:
        if assigned.gpus:
            info["gpus"] = assigned.gpus
        with threads(assigned.cpus):
            yield
        return
    gpus = gpus_needed(resources, identity)
    cpus = None if resources is None else resources.cpus
    if (gpus or cpus) and threading.current_thread() is not threading.main_thread():
        raise PreflightError(
            "GPU slots and `cpus` set the step's environment, which steps run by doit's "
            "thread workers (-P thread) share",
            fix="leave out -P thread: `doit -n N` runs each step in a worker process",
        )
    with contextlib.ExitStack() as stack:
        if gpus:
            info["gpus"] = stack.enter_context(_on_gpus(gpus, artifacts, task, resources))
            info["started"] = time.time()
        if cpus is not None:
            stack.enter_context(threads(cpus))
        yield


@contextlib.contextmanager
def _on_gpus(
    count: int, artifacts: Path, task: str, resources: Resources | None
) -> Iterator[list[int]]:
    ids = gpu_ids()
    if count > len(ids):
        asked = "resources.gpus" if resources and resources.gpus is not None else 'device "cuda"'
        raise PreflightError(
            f"it needs {count} GPU{'s' if count > 1 else ''} ({asked}) and this machine has "
            f"{len(ids) or 'none'}",
            fix="lower resources.gpus (0: no GPU slot), build it on a machine with more GPUs, or "
            f"set {GPUS_VARIABLE}=<count> if the count is wrong",
        )
    sees = _cuda_sees(ids)
    among = None if sees is None else [i for i, d in enumerate(ids) if d in sees]
    if among is not None and count > len(among):
        raise PreflightError(
            f"it needs {count} GPUs, but CUDA in this doit process started seeing only "
            f"{VISIBLE}={','.join(sees or ()) or '(none)'}, and CUDA reads it once per process",
            fix=f"build it in a doit run of its own: `doit {task}`",
        )

    def waiting() -> None:
        if among is None and count == 1:
            why = f"{'the only one' if len(ids) == 1 else f'all {len(ids)}'} in use by other steps"
        elif among is None:
            why = f"needs {count} of the {len(ids)} at once"
        else:
            why = f"needs {count} of {VISIBLE}={','.join(sees or ())}: CUDA here sees only those"
        print(f"  {task}: waiting for a GPU ({why})", file=sys.stderr, flush=True)

    with GpuSlots(artifacts / SLOTS_DIR, ids).take(count, among, waiting) as taken:
        chosen = [ids[i] for i in taken]
        with _environment({VISIBLE: ",".join(chosen)}):
            if sees is not None:  # CUDA here ignores the variable: pick the device by index
                _select_device(sees.index(chosen[0]))
            try:
                yield taken
            finally:
                _note_cuda_start(tuple(chosen))


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """The block runs with `count` threads: OMP_NUM_THREADS and MKL's (read by torch and
    onnxruntime when they start, and by the processes the step starts), and torch's own
    thread count when torch is already loaded; all restored after."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    with _environment(dict.fromkeys(THREAD_VARIABLES, str(count))):
        if torch is not None:
            torch.set_num_threads(count)
        try:
            yield
        finally:
            if torch is not None and before is not None:
                torch.set_num_threads(before)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ---- CUDA reads CUDA_VISIBLE_DEVICES once per process ---------------------------------------

_seen: tuple[str, ...] | None = None  # the slot ids this process's CUDA sees, once started
_device = 0  # the CUDA device index this module last made current (CUDA's default: 0)


def _cuda_sees(ids: Sequence[str]) -> tuple[str, ...] | None:
    """The slot ids this process's CUDA sees, in its device order; None while it has not
    started (then CUDA_VISIBLE_DEVICES set now is what it will see)."""
    global _seen
    if _seen is None and cuda_started():
        _seen = tuple(ids)  # started outside any slot, under this process's own variables
    return _seen


def _note_cuda_start(chosen: tuple[str, ...]) -> None:
    """After a step held `chosen`: if CUDA started during it, it sees those for good."""
    global _seen
    if _seen is None and cuda_started():
        _seen = chosen


def _select_device(index: int) -> None:
    """Make device `index` torch's current one (what "cuda" means) in this process."""
    global _device
    if index != _device:
        import torch  # CUDA started here: something in this process uses it already

        torch.cuda.set_device(index)
        _device = index


def cuda_started() -> bool:
    """Whether this process started the CUDA driver (cuInit), asked without loading or
    starting it: the driver library is looked up only if already loaded, and before cuInit
    every driver call answers CUDA_ERROR_NOT_INITIALIZED (3)."""
    import ctypes

    try:
        driver = ctypes.CDLL("libcuda.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except (OSError, AttributeError):  # not loaded (or no RTLD_NOLOAD: not Linux)
        return False
    count = ctypes.c_int(0)
    return driver.cuDeviceGetCount(ctypes.byref(count)) == 0
