"""A throw-away doit workspace on the tiny model: a recipe, an artifacts dir, and `doit` runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
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


def executed(output: str) -> list[str]:
    """Tasks doit ran (`.  task`), not those it found up to date (`-- task`)."""
    return re.findall(r"^\.  (\S+)", output, flags=re.M)
