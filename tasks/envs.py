"""Isolated environments for stages whose packages clash with the main one.

A stage declares an `Environment` (hand pins and the hashed lock made from them). The first step
that needs it builds a virtual environment under `artifacts/envs/<name>-<key[:16]>/` with
`uv pip install --require-hashes --no-deps` from the lock, so nothing is resolved at build time
(uv, given pip's index settings: ten times faster than pip here, the same packages). It
is keyed by the Python version, the platform and the lock's digest, and published like a store
entry: built in `envs/.tmp/<key>.<pid>/`, `ENV.json` written and synced last, then renamed into
place, under a per-key lock. Every later step reuses it without running uv. A failed build is
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
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks import interrupt
from tasks.errors import StageError
from tasks.hostinfo import python_version
from tasks.keys import key_of
from tasks.record import Record, frozen
from tasks.requirement import normalize_name
from tasks.staging import Staging, remove_path

if TYPE_CHECKING:  # pip's settings are read only when an environment is built
    from tasks.pipconfig import Settings

ENV_VERSION = "3"  # bump when the way environments are built changes (2: from hashed locks;
# 3: by uv, so no pip and no unlocked setuptools from ensurepip in them)
LOCK_TOOL = "python tools/lock_envs.py"  # refreshes a lock from its pins
MARKER = "ENV.json"
ROOT = Path(__file__).resolve().parents[1]  # the project: put on the child's PYTHONPATH
TAIL_LINES = 25  # of uv's output, in a failed build's message


@frozen
class Environment(Record):
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
            "python": python_version(),
            "platform": sysconfig.get_platform(),
        }

    @functools.cached_property
    def key(self) -> str:  # read once: every doit loads the graph, and a lock is 60-90 KB
        return key_of(self.identity())


COMMENT = re.compile(r"(^|\s)#.*")  # only lines with a "#" are searched: every run keys the locks


def lock_lines(env: Environment) -> list[str]:
    """The lock's requirement lines, continuations joined and comments dropped, sorted: what
    uv installs. Comments (uv's header, "# via ...") do not change it, so they are not keyed."""
    try:
        text = env.lock.read_text()
    except OSError as err:
        raise StageError(
            f"cannot read the lock of the {env.name} environment: {env.lock}: {err.strerror}",
            f"generate it from the environment's pins with {LOCK_TOOL} {env.name}",
        ) from None
    joined = text.replace("\\\n", " ").splitlines()
    lines = ((COMMENT.sub("", line) if "#" in line else line).split() for line in joined)
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
            _build(tmp, env, started, uv_cache(artifacts))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-made stays behind
            raise
        remove_path(folder)  # a folder without a marker (or a link): never complete
        os.rename(tmp, folder)
        log(f"{env.name} environment ready: {folder}")
    return folder


def _build(tmp: Path, env: Environment, started: float, cache: Path) -> None:
    from tasks.pipconfig import pip_settings

    if stale := lock_mismatches(env):
        raise StageError(
            f"the lock of the {env.name} environment ({env.lock}) does not match its pins: "
            f"{', '.join(stale)}",
            f"refresh it with {LOCK_TOOL} {env.name}",
        )
    settings = pip_settings()
    uv, run_env = _uv(), _uv_environ(cache, settings)
    python = str(python_of(tmp))
    # --relocatable: scripts find their Python relative to themselves, so they still run
    # after the folder is renamed into place. No --seed: pip would be a package the lock lacks.
    made = subprocess.run([uv, "venv", *UV_COMMON, "--no-project", "--relocatable", "--python",
                           sys.executable, str(tmp)], capture_output=True, text=True,
                          env=run_env, check=False)  # fmt: skip
    if made.returncode != 0:
        raise StageError(
            f"cannot create the {env.name} environment's virtual environment in {tmp}:\n"
            f"{(made.stdout + made.stderr).strip()}"
        )
    log_path = tmp / "uv.log"
    with log_path.open("w") as out:

        def uv_run(*args: str) -> None:
            done = subprocess.run([uv, *args], stdout=out, stderr=subprocess.STDOUT,
                                  env=run_env, check=False)  # fmt: skip
            if done.returncode != 0:
                raise StageError(uv_failure(env, log_path.read_text(errors="replace")))

        # Exactly the lock: --no-deps resolves nothing, --require-hashes refuses any other file.
        install = ["pip", "install", *UV_COMMON, "--python", python, "--require-hashes",
                   "--no-deps", "--compile-bytecode", *_index_args(settings)]  # fmt: skip
        for args in _install_passes(tmp, env):
            uv_run(*install, *args)
    uv_pip = [uv, "pip"]
    checked = subprocess.run([*uv_pip, "check", *UV_COMMON, "--python", python],
                             capture_output=True, text=True, env=run_env, check=False)  # fmt: skip
    if checked.returncode != 0:  # --no-deps trusts the lock to be complete: verify it
        said = (checked.stdout + checked.stderr).splitlines()
        problems = [line for line in said if not line.startswith(("Using Python", "Checked "))]
        raise StageError(
            f"cannot build the {env.name} environment: its lock is incomplete\n"
            + "\n".join(problems).strip(),
            f"refresh it with {LOCK_TOOL} {env.name}",
        )
    # Names as uv spells them, normalized (huggingface-hub), as the lock spells them.
    frozen = subprocess.run([*uv_pip, "freeze", *UV_COMMON, "--python", python],
                            capture_output=True, text=True, env=run_env, check=True)  # fmt: skip
    marker = {**env.identity(), "key": env.key, "installed": frozen.stdout.split(),
              "build_seconds": round(time.time() - started, 1)}  # fmt: skip
    with open(tmp / MARKER, "w") as fh:
        json.dump(marker, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


# uv's own configuration files are not read: where packages come from is pip's configuration
# (tasks/pipconfig.py), the one every download of this project follows.
UV_COMMON = ("--no-config", "--color", "never")


def _uv() -> str:
    """The uv executable installed with modelkiln (imported here: loading the graph never needs
    it)."""
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        raise StageError(
            "cannot build a stage environment: uv, which builds them, is not installed",
            "install modelkiln's dependencies again (pip install 'uv>=0.9')",
        ) from None


def uv_cache(artifacts: Path) -> Path:
    """uv's cache: UV_CACHE_DIR if set, else beside the environments, on their file system,
    so that uv hardlinks files from it instead of copying them."""
    return Path(os.environ.get("UV_CACHE_DIR") or artifacts / "cache" / "uv")


def _uv_environ(cache: Path, settings: Settings) -> dict[str, str]:
    run_env = {**os.environ, "UV_CACHE_DIR": str(cache), "NO_COLOR": "1"}
    run_env["UV_HTTP_TIMEOUT"] = str(max(1, round(settings.timeout)))
    if settings.cert and not os.environ.get("SSL_CERT_FILE"):
        run_env["SSL_CERT_FILE"] = settings.cert  # pip's cert, as uv takes one
    run_env.pop("VIRTUAL_ENV", None)  # --python names the environment
    return run_env


def _index_args(settings: Settings) -> list[str]:
    """pip's indexes and find-links for uv, which reads no pip.conf. unsafe-best-match is pip's
    way: a pin is looked for on every index, not only the first that lists its name."""
    if not settings.indexes:
        args = ["--no-index"]
    else:
        first, *extra = settings.indexes
        args = ["--index-strategy", "unsafe-best-match", "--index-url", first]
        args += [arg for url in extra for arg in ("--extra-index-url", url)]
    return args + [arg for folder in settings.find_links for arg in ("--find-links", folder)]


def _install_passes(tmp: Path, env: Environment) -> list[list[str]]:
    """uv's arguments for each pass: wheels only (an sdist would pull unlocked build tools
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


def uv_failure(env: Environment, output: str) -> str:
    """One message saying which requirement failed and why, from uv's output."""
    patterns = (
        r"there is no version of (\S+?) and",  # torch==2.13.0+cpu: no index has it
        r"was not found in the package registry and you require (\S+?),",
        r"Hash mismatch for `([^`]+)`",  # the file served is not the one locked
        r"Failed to (?:download|build|install|prepare)[^`\n]*`([^`]+)`",
        r"you require (\S+?),",
    )
    package = next((m[1] for p in patterns if (m := re.search(p, output, re.M))), None)
    lines = output.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
    tail = lines[first:] if first is not None else lines
    tail = [line for line in tail if line.strip()][-TAIL_LINES:]
    what = f"package {package!r} failed" if package else "uv failed"
    where = ""
    if package and "+" in package:  # torch==2.13.0+cpu: a build PyPI does not carry
        where = (
            f"; {package} is not on PyPI: add its index to pip's configuration, which the "
            "build follows (for torch's CPU builds "
            "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu), or a folder holding the "
            "wheel (PIP_FIND_LINKS)"
        )
    if "Hash mismatch" in output:
        where += "; the index serves another file under the locked name than the lock's"
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
            interrupt.python_module(str(python_of(folder)), "tasks.envrun", str(request)),
            env=child_env,
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
