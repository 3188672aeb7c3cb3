"""A throw-away doit workspace on the tiny model: a recipe, an artifacts dir, and `doit` runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOIT = [sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py")]


def tiny_recipe(model: Path, prose: Path, per_channel: bool = False, extra: str = "") -> str:
    return f"""
[model]
source = "{model}"

[data.prose]
path = "{prose}"
format = "text"
heldout_fraction = 0.25

[capture.fp32]
precision = "fp32"

[quantize.int8]
algorithm = "ort-dynamic"
from = "capture.fp32"
per_channel = {str(per_channel).lower()}

[evaluate.fp32]
from = "capture.fp32"
data = "prose"
seq_len = 64
max_tokens = 256
new_tokens = 4
repeats = 1

[evaluate.int8]
from = "quantize.int8"
data = "prose"
seq_len = 64
max_tokens = 256
new_tokens = 4
repeats = 1
{extra}
"""


@dataclass
class Workspace:
    root: Path
    name: str = "recipe"  # another name: a second recipe sharing the store and environments

    @property
    def recipe(self) -> Path:
        return self.root / f"{self.name}.toml"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def write(self, text: str) -> None:
        self.recipe.write_text(text)

    def argv(self, *args: str) -> list[str]:
        return [
            *DOIT,
            "-d",
            str(self.root),
            *args,
            f"recipe={self.recipe}",
            f"artifacts={self.artifacts}",
        ]

    def doit(
        self, *args: str, check: bool = True, timeout: int = 600, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        environ = {**os.environ, **env} if env else None  # env: added to this process's
        proc = subprocess.run(
            self.argv(*args), capture_output=True, text=True, timeout=timeout, env=environ
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"doit {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def seed(self, built: Path, *tasks: str) -> None:
        """Copy the entries of `tasks` out of another workspace's artifacts folder (the
        `tiny_built` fixture's) into this one's store, files with their times, as a pull would:
        the next `doit` finds them built. For tests whose subject comes after these steps; a
        tiny model step costs 7 s and a capture 10 s, mostly imports. Refuses an entry this
        recipe would not use (a seed that saves nothing would go unnoticed)."""
        from tasks.graph import load_graph
        from tasks.store import Store

        with tempfile.TemporaryDirectory() as scratch:  # keys do not depend on the workspace
            keys = load_graph(self.recipe, Path(scratch)).keys
        source, store = Store(built), Store(self.artifacts)
        store.staging.locks_dir.mkdir(parents=True, exist_ok=True)  # as building leaves it
        for task in tasks:
            key = keys[task.replace(":", ".", 1)]
            assert source.is_complete(key), f"{built} has no entry of {task} for {self.recipe}"
            store.entry(key).parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source.entry(key), store.entry(key), symlinks=True)
            shutil.copy2(source.log_path(key), store.log_path(key))
            shutil.copy2(source.manifest_path(key), store.manifest_path(key))  # last: complete

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip

    def building(self, task: str, folders: int = 1) -> subprocess.Popen:
        """`doit task` in the background, returned once it is inside the step's build: its
        temporary folders (the build's, then its scratch room) exist."""
        proc = self.popen(task)
        tmp_root = self.artifacts / "store" / ".tmp"
        deadline = time.time() + 120
        while time.time() < deadline and len(list(tmp_root.glob("*.*[0-9]"))) < folders:
            time.sleep(0.05)
        time.sleep(0.5)
        return proc


DOIT_ALONE = """
DOIT_CONFIG = {"dep_file": ":memory:", "backend": "sqlite3", "verbosity": 2}


def task_step():
    for n in range(%d):
        yield {"name": str(n), "actions": [], "uptodate": [True]}
"""


def doit_alone(folder: Path, tasks: int) -> list[str]:
    """The command of doit alone on a dodo.py of `tasks` up-to-date tasks (named step:0,
    step:1, ...), with modelkiln's in-memory task database: the benches' peer for a no-op,
    about what no dodo.py can go below."""
    folder.mkdir(exist_ok=True)
    (folder / "dodo.py").write_text(DOIT_ALONE % tasks)
    return [sys.executable, "-m", "doit", "-f", str(folder / "dodo.py"), "-d", str(folder)]


def interpreter() -> str:
    """Which Python ran a bench: no-op times depend on its build (on one 2-core VM, pyenv's
    default build, without PGO or LTO, took 20% longer than Debian's python3.11, docs/design.md)."""
    return f"Python {sys.version.split()[0]} at {sys.base_prefix}"


def timed(call: Callable[[], object]) -> float:
    """Wall seconds of call()."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def executed(output: str) -> list[str]:
    """Tasks doit ran (`.  task`), not those it found up to date (`-- task`)."""
    return re.findall(r"^\.  (\S+)", output, flags=re.M)


# ---- many small steps, and when each ran ----------------------------------------------------

# tsv rows, each binned and templated: about a second of Python per data step, little I/O.
ROWS = 100_000
GPU_AND_CPU_STEPS = [  # (name, heldout_fraction: keeps the keys apart, the step's resources)
    ("gpu-a", 0.1, "resources = { gpus = 1 }"),
    ("gpu-b", 0.2, "resources = { gpus = 1, cpus = 1 }"),
    ("cpu", 0.3, ""),
]


def write_rows(folder: Path, rows: int = ROWS) -> Path:
    """folder/rows.tsv, and the empty model folder a recipe needs beside it."""
    path = folder / "rows.tsv"
    with open(path, "w") as fh:
        for i in range(rows):
            fh.write(f"{i}\t{(i * 7919) % 2001 / 1000 - 1:.3f}\tword{i % 97} other{i % 13}\n")
    (folder / "model").mkdir(exist_ok=True)
    (folder / "model" / "config.json").write_text("{}")
    return path


def slow_data_recipe(rows: Path, steps: list[tuple[str, float, str]] = GPU_AND_CPU_STEPS) -> str:
    """Data steps reading rows (by default three, two of which take a GPU)."""
    text = f'[model]\nsource = "{rows.parent / "model"}"\n'
    for name, fraction, extra in steps:
        text += f"""
[data.{name}]
path = "{rows}"
format = "tsv"
columns = ["id", "score", "phrase"]
bin_field = "score"
bin_edges = [-0.5, 0.5]
bin_names = ["neg", "neu", "pos"]
bin_into = "tone"
text_template = "{{phrase}} -> {{tone}}"
heldout_fraction = {fraction}
{extra}
"""
    return text


def interval(step: dict) -> tuple[float, float]:
    """When a step of a run summary started and finished, in seconds."""
    return (
        datetime.fromisoformat(step["started"]).timestamp(),
        datetime.fromisoformat(step["finished"]).timestamp(),
    )


def overlap(a: dict, b: dict) -> float:
    """Seconds two steps of a run summary ran at once (negative: the gap between them)."""
    (a0, a1), (b0, b1) = interval(a), interval(b)
    return min(a1, b1) - max(a0, b0)
