"""Refresh the hashed lock of a stage environment from its hand pins (tasks/envs.py).

    python tools/lock_envs.py                          # every stage environment
    python tools/lock_envs.py inc modelopt             # some of them
    python tools/lock_envs.py modelopt --find-links /opt/wheels   # where torch's CPU wheel is
    python tools/lock_envs.py tests.test_envs:SMALL    # any Environment, as module:NAME

It runs `uv pip compile --generate-hashes` with the uv modelkiln installs (the one that builds
the environments; `--uv` names another). Locks are resolved from PyPI for the one platform the
environments are built on, CPython 3.11 on Linux x86-64 (manylinux 2.28), wheels only except an
environment's `from_source` packages: exactly what `_build` then installs, with nothing left to
resolve. A changed lock changes the environment's key, so the steps that use it run again.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

from uv import find_uv_bin

ROOT = Path(__file__).resolve().parents[1]
PYTHON_VERSION = "3.11"
PYTHON_PLATFORM = "x86_64-manylinux_2_28"
ENVIRONMENTS = {  # the stage environments; others by module:NAME
    "inc": "tasks.stages.quantize.inc_common:INC",
    "modelopt": "tasks.stages.quantize.nvmo:MODELOPT",
    "modelopt-cuda": "tasks.stages.quantize.nvmo:MODELOPT_CUDA",
}


def environment(spec: str):  # -> tasks.envs.Environment
    module, _, name = ENVIRONMENTS.get(spec, spec).partition(":")
    if not name:
        sys.exit(
            f"unknown environment {spec!r}: use one of {', '.join(ENVIRONMENTS)} or module:NAME"
        )
    return getattr(importlib.import_module(module), name)


def lock(spec: str, uv: str, find_links: list[str], upgrade: bool) -> None:
    """Resolve the environment's hand pins into its lock, every package pinned and hashed.
    Unpinned packages keep their locked versions where they still fit, unless `upgrade`."""
    env = environment(spec)
    sources = [f"--find-links {folder}" for folder in find_links]
    cmd = [uv, "pip", "compile", "-", "--quiet", "--generate-hashes",
           "--python-version", PYTHON_VERSION, "--python-platform", PYTHON_PLATFORM,
           "--only-binary", ":all:", *(a for n in env.from_source for a in ("--no-binary", n)),
           *(arg for folder in find_links for arg in ("--find-links", folder)),
           *(["--upgrade"] if upgrade else []),
           "--custom-compile-command", " ".join(["python tools/lock_envs.py", spec, *sources]),
           "--output-file", str(env.lock)]  # fmt: skip
    env.lock.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(cmd, input="\n".join(env.requirements) + "\n", text=True, check=False)
    if done.returncode != 0:
        sys.exit(
            f"could not lock the {env.name} environment (uv's reason is above); a pin PyPI "
            "lacks, such as torch==2.13.0+cpu, needs --find-links <a folder with its wheel>"
        )
    print(f"{env.name}: {env.lock.relative_to(ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("environments", nargs="*", default=list(ENVIRONMENTS))
    parser.add_argument("--uv", default=find_uv_bin(), help="the uv executable")
    parser.add_argument(
        "--find-links", action="append", default=[],
        help="a folder of wheels PyPI lacks, such as torch's CPU build",
    )  # fmt: skip
    parser.add_argument(
        "--upgrade", action="store_true", help="newest versions of the packages not pinned by hand"
    )
    args = parser.parse_args()
    # tests.test_envs imports its helpers the way pytest does: from the tests folder
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    for spec in args.environments:
        lock(spec, args.uv, args.find_links, args.upgrade)


if __name__ == "__main__":
    main()
