"""Isolated environments for stages whose packages clash with the main one.

A stage declares an `Environment` (hand pins and the hashed lock made from them). The first step
that needs it builds a virtual environment under `artifacts/envs/<name>-<key[:16]>/` with
`pip install --require-hashes --no-deps` from the lock, so nothing is resolved at build time. It
is keyed by the Python version, the platform and the lock's digest, and published like a store
entry: built in `envs/.tmp/<key>.<pid>/`, `ENV.json` written and synced last, then renamed into
place, under a per-key lock. Every later step reuses it without running pip. A failed build is
removed and named (which package, why); a killed one never has ENV.json, so it is never trusted.

The step itself runs in a child process with that environment's Python (`tasks.envrun`): the
child imports only the stage module, so the main environment's packages stay out of it. Its
progress goes straight to the terminal, and a KilnError it raises comes back as one message.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks import interrupt
from tasks.errors import StageError
from tasks.keys import key_of
from tasks.requirement import normalize_name
from tasks.staging import Staging, remove_path

ENV_VERSION = "2"  # bump when the way environments are built changes (2: from hashed locks)
LOCK_TOOL = "python tools/lock_envs.py"  # refreshes a lock from its pins
MARKER = "ENV.json"
ROOT = Path(__file__).resolve().parents[1]  # the project: put on the child's PYTHONPATH
PIP_TAIL_LINES = 25


@dataclass(frozen=True)
class Environment:
    """A stage's own virtual environment, installed from its hashed lock and nothing else.

    `requirements` are the hand pins and the lock's only input; `lock` is generated from them
    by `tools/lock_envs.py` and pins every package, with its hashes, for CPython 3.11 on Linux
    x86-64. The key is the lock's digest: the same key always means the same packages.
    """

    name: str  # a readable prefix of the folder name: "inc", "modelopt"
    requirements: tuple[str, ...]  # hand pins, "pkg==1.2.3": what tools/lock_envs.py resolves
    why: str  # one line for docs: why this stage cannot live in the main environment
    lock: Path  # "name==version --hash=sha256:..." for every package, from `requirements`
    # Locked packages with no wheel on PyPI: built after the wheels, without build isolation,
    # by build tools that are themselves in the lock (isolation would resolve them at build time).
    from_source: tuple[str, ...] = ()

    def identity(self) -> dict[str, Any]:
        return {
            "environment": self.name,
            "version": ENV_VERSION,
            "lock": hashlib.sha256("\n".join(lock_lines(self)).encode()).hexdigest(),
            "python": platform.python_version(),
            "platform": sysconfig.get_platform(),
        }

    @functools.cached_property
    def key(self) -> str:  # read once: every doit loads the graph, and a lock is 60-90 KB
        return key_of(self.identity())


def lock_lines(env: Environment) -> list[str]:
    """The lock's requirement lines, continuations joined and comments dropped, sorted: what
    pip installs. Comments (uv's header, "# via ...") do not change it, so they are not keyed."""
    try:
        text = env.lock.read_text()
    except OSError as err:
        raise StageError(
            f"cannot read the lock of the {env.name} environment: {env.lock}: {err.strerror}",
            f"generate it from the environment's pins with {LOCK_TOOL} {env.name}",
        ) from None
    joined = text.replace("\\\n", " ").splitlines()
    lines = (re.sub(r"(^|\s)#.*", "", line).split() for line in joined)
    return sorted(" ".join(words) for words in lines if words)


def locked_versions(env: Environment) -> dict[str, str]:
    """Canonical project name -> the version the lock pins ("" where it pins none)."""
    found = {}
    for line in lock_lines(env):
        if not line.startswith("-"):  # an option line, such as --find-links
            name, _, version = line.split()[0].partition("==")
            found[normalize_name(name)] = version
    return found


def lock_mismatches(env: Environment) -> list[str]:
    """Hand pins the lock does not pin at the same version: the lock is stale."""
    locked, wrong = locked_versions(env), []
    for pin in env.requirements:
        name, _, version = pin.partition("==")
        name = normalize_name(name.split("[")[0])  # "pkg[extra]" locks as "pkg"
        if locked.get(name) != version:
            wrong.append(f"{pin} (the lock has {locked.get(name) or 'no pin'})")
    return wrong


def envs_dir(artifacts: Path) -> Path:
    return artifacts / "envs"


def env_path(artifacts: Path, env: Environment) -> Path:
    return envs_dir(artifacts) / f"{env.name}-{env.key[:16]}"


def python_of(folder: Path) -> Path:
    return folder / "bin" / "python"


def is_ready(folder: Path) -> bool:
    # A link in the folder's place is never trusted, as a linked store entry is not.
    return (folder / MARKER).is_file() and python_of(folder).exists() and not folder.is_symlink()


def staging(artifacts: Path) -> Staging:
    """Environments build with the store's lock-and-publish protocol (tasks/staging.py)."""
    return Staging(envs_dir(artifacts))


def ensure(artifacts: Path, env: Environment, log: Callable[[str], None]) -> Path:
    """The environment's folder, built first if it is not there."""
    folder = env_path(artifacts, env)
    if is_ready(folder):
        return folder
    area = staging(artifacts)
    with area.lock(env.key):
        if is_ready(folder):  # another process built it while we waited
            return folder
        area.sweep()  # builds killed before their marker was written
        log(f"building the {env.name} environment (once): {' '.join(env.requirements)}")
        tmp = area.new_tmp(env.key)
        started = time.time()
        try:
            _build(tmp, env, started)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-made stays behind
            raise
        remove_path(folder)  # a folder without a marker (or a link): never complete
        os.rename(tmp, folder)
        log(f"{env.name} environment ready: {folder}")
    return folder


def _build(tmp: Path, env: Environment, started: float) -> None:
    if stale := lock_mismatches(env):
        raise StageError(
            f"the lock of the {env.name} environment ({env.lock}) does not match its pins: "
            f"{', '.join(stale)}",
            f"refresh it with {LOCK_TOOL} {env.name}",
        )
    subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, capture_output=True)
    log_path = tmp / "pip.log"
    pip = [str(python_of(tmp)), "-m", "pip"]
    # Exactly the lock: --no-deps resolves nothing, --require-hashes refuses any other file.
    install = [*pip, "install", "--disable-pip-version-check", "--no-input",
               "--require-hashes", "--no-deps"]  # fmt: skip
    with log_path.open("w") as out:
        for args in _install_passes(tmp, env):
            done = subprocess.run(
                [*install, *args], stdout=out, stderr=subprocess.STDOUT, check=False
            )
            if done.returncode != 0:
                raise StageError(pip_failure(env, log_path.read_text(errors="replace")))
    checked = subprocess.run([*pip, "check"], capture_output=True, text=True, check=False)
    if checked.returncode != 0:  # --no-deps trusts the lock to be complete: verify it
        raise StageError(
            f"cannot build the {env.name} environment: its lock is incomplete\n"
            f"{checked.stdout.strip()}",
            f"refresh it with {LOCK_TOOL} {env.name}",
        )
    frozen = subprocess.run(
        [*pip, "freeze"], capture_output=True, text=True, check=True
    ).stdout.split()
    marker = {**env.identity(), "key": env.key, "installed": frozen,
              "build_seconds": round(time.time() - started, 1)}  # fmt: skip
    with open(tmp / MARKER, "w") as fh:
        json.dump(marker, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def _install_passes(tmp: Path, env: Environment) -> list[list[str]]:
    """pip's arguments for each pass: wheels only (an sdist would pull unlocked build tools
    into an isolated build); then any `from_source` packages, built by the locked tools."""
    if not env.from_source:
        return [["--only-binary", ":all:", "-r", str(env.lock)]]
    names = {normalize_name(name) for name in env.from_source}
    wheels, sources = tmp / "lock-wheels.txt", tmp / "lock-sources.txt"
    lines = lock_lines(env)
    built = [line for line in lines if normalize_name(line.split("==")[0]) in names]
    wheels.write_text("\n".join(line for line in lines if line not in built) + "\n")
    sources.write_text("\n".join(built) + "\n")
    return [
        ["--only-binary", ":all:", "-r", str(wheels)],
        ["--no-build-isolation", "--no-binary", ",".join(sorted(names)), "-r", str(sources)],
    ]


def pip_failure(env: Environment, output: str) -> str:
    """One message saying which requirement failed and why, from pip's output."""
    patterns = (
        r"No matching distribution found for (\S+)",
        r"Could not find a version that satisfies the requirement (\S+)",
        r"^\s+(\S+==\S+) from .*:\n\s+Expected sha256",  # the file served is not the one locked
        r"Failed to build (\S+)",
        r"Failed building wheel for (\S+)",
        r"Cannot install (.+?) because",
    )
    package = next((m[1] for p in patterns if (m := re.search(p, output, re.M))), None)
    errors = [line for line in output.splitlines() if line.startswith("ERROR:")]
    tail = errors or output.splitlines()[-PIP_TAIL_LINES:]
    what = f"package {package!r} failed" if package else "pip failed"
    where = ""
    if package and "+" in package:  # torch==2.13.0+cpu: a build PyPI does not carry
        where = (
            f"; {package} is not on PyPI: give pip its index (for torch's CPU builds "
            "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu) or a folder holding the "
            "wheel (PIP_FIND_LINKS)"
        )
    return (
        f"cannot build the {env.name} environment: {what}\n" + "\n".join(tail) + "\n  fix: "
        f"check that the package index is reachable{where}; if the pins changed, refresh the "
        f"lock ({env.lock}) with {LOCK_TOOL} {env.name}; nothing was kept, so the next run "
        "starts over"
    )


def managed_envs(artifacts: Path) -> dict[str, Path]:
    """Key -> folder of every complete environment this tool built (others are left alone)."""
    found = {}
    root = envs_dir(artifacts)
    if root.is_dir():
        for folder in root.iterdir():
            if folder.name.startswith(".") or folder.is_symlink():
                continue
            try:
                found[json.loads((folder / MARKER).read_text())["key"]] = folder
            except (OSError, ValueError, KeyError):
                continue
    return found


def call(
    env: Environment, function: str, config: Any, ctx: Any, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run `module:function(config, ctx, **extra)` in the environment, in a child process;
    its JSON-able return value comes back."""
    import dataclasses

    folder = ensure(ctx.artifacts, env, ctx.log)
    with tempfile.TemporaryDirectory(prefix="envrun-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({
            "function": function,
            "config_class": f"{type(config).__module__}:{type(config).__qualname__}",
            "config": dataclasses.asdict(config),
            "ctx": {"task": ctx.task, "out": str(ctx.out), "artifacts": str(ctx.artifacts),
                    "input": str(ctx.input) if ctx.input else None,
                    "data": {k: str(v) for k, v in ctx.data.items()},
                    "steps": {k: str(v) for k, v in ctx.steps.items()}},
            "extra": extra or {},
            "result": str(result),
        }))  # fmt: skip
        child_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONNOUSERSITE": "1"}
        child_env["TRANSFORMERS_VERBOSITY"] = "error"  # e.g. "PyTorch was not found"
        child_env.pop("VIRTUAL_ENV", None)
        # The child's stdout goes to stderr: doit's stdout lists the tasks it runs, and a
        # library's progress bar left there without a newline would swallow the next line.
        status = interrupt.run_child(
            [str(python_of(folder)), "-m", "tasks.envrun", str(request)], env=child_env,
            stdout=sys.stderr.fileno(),
        )  # fmt: skip
        print(file=sys.stderr, flush=True)  # end a progress bar the child left open
        answer = json.loads(result.read_text()) if result.is_file() else None
    if answer and "error" in answer:
        raise StageError(answer["error"])
    if status != 0 or answer is None:
        raise StageError(
            f"{function} failed in the {env.name} environment ({folder}) with exit status "
            f"{status}; its output is above"
        )
    return answer["value"]
