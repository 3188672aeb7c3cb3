"""The build graph of one recipe: every step's identity, key, store entry and link.

Computed once when doit loads the tasks, so every target path is known up front. The only
I/O is stat-ing local inputs (their digests come from the stat cache) and reading the store.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any

from tasks.config import as_params
from tasks.digest import DigestCache
from tasks.errors import KilnError, RecipeError, StageError, UsageError
from tasks.fetch import Floating
from tasks.hostinfo import cpu_level, gpu_models, resolve_device
from tasks.keys import key_of, library_versions
from tasks.recipe import Recipe, Step, inputs_of, load_recipe
from tasks.record import Record, frozen
from tasks.remote import RemoteStore
from tasks.report import REPORT_STEP, report_identity
from tasks.staging import os_problem
from tasks.store import RESERVED, Store


@frozen
class Graph(Record):
    recipe: Recipe
    store: Store
    identities: dict[str, dict[str, Any]]  # by step ref, plus "report"
    keys: dict[str, str]
    remote: RemoteStore | None = None  # the shared store: asked only about keys missing here

    def step(self, ref: str) -> Step:
        return self.recipe.steps[ref]

    def link(self, ref: str) -> Path:
        """artifacts/<recipe>/<stage>/<name> (or .../model, .../report)."""
        return self.store.root / self.recipe.name / Path(*ref.split(".", 1))

    def entry(self, ref: str) -> Path:
        return self.store.entry(self.keys[ref])

    def task(self, ref: str) -> str:
        return REPORT_STEP if ref == REPORT_STEP else self.step(ref).task

    def evaluate_refs(self) -> list[str]:
        return [s.ref for s in self.recipe.of_stage("evaluate")]

    def inputs(self, ref: str) -> list[str]:
        """The steps ref is built from (the report: every evaluate step)."""
        return self.evaluate_refs() if ref == REPORT_STEP else inputs_of(self.step(ref))

    def with_inputs(self, refs: list[str]) -> list[str]:
        """refs and every step they are built from, inputs first (the keys' order)."""
        needed, todo = set(), list(refs)
        while todo:
            if (ref := todo.pop()) not in needed:
                needed.add(ref)
                todo += self.inputs(ref)
        return [ref for ref in self.keys if ref in needed]


def load_graph(
    recipe_path: Path, artifacts: Path, overrides: dict[str, str | None] | None = None
) -> Graph:
    """overrides: the run's `remote=`, `push=`, `remote_only=` (doit variables, else the
    environment's MODELKILN_REMOTE, _PUSH, _REMOTE_ONLY)."""
    recipe = load_recipe(recipe_path)
    if recipe.name in RESERVED or recipe.name.startswith("."):
        raise RecipeError(
            str(recipe_path), "", f"a recipe cannot be named {recipe.name!r}: its links would "
            "mix with the store's own folders", "rename the file",
        )  # fmt: skip
    check_artifacts(artifacts)
    store = Store(artifacts)
    cache = store.digest_cache()
    identities: dict[str, dict[str, Any]] = {}
    keys: dict[str, str] = {}
    try:
        for ref, step in recipe.steps.items():  # inputs come before their users
            identities[ref] = step_identity(step, keys, cache, str(recipe_path))
            keys[ref] = key_of(identities[ref])
    finally:
        cache.close()
    rows = {
        s.task: {"key": keys[s.ref], "from": s.source, "data_set": s.config.data}
        for s in recipe.of_stage("evaluate")
    }
    identities[REPORT_STEP] = report_identity(recipe.name, rows)
    keys[REPORT_STEP] = key_of(identities[REPORT_STEP])
    return Graph(recipe, store, identities, keys, remote_of(recipe, overrides or {}))


def remote_of(recipe: Recipe, overrides: dict[str, str | None]) -> RemoteStore | None:
    """The recipe's [store] settings with this run's overrides: a CI job sets the remote and
    push for one run; `remote=` (empty) turns it off. Contacts nothing."""
    settings = dict(recipe.store)
    given = {}  # each override as it was written, for messages
    for name in ("remote", "push", "remote_only"):
        variable = f"MODELKILN_{name.upper()}"
        value, prefix = overrides.get(name), f"{name}="
        if value is None:
            value, prefix = os.environ.get(variable), f"{variable}="
        if value is None:
            continue
        given[name] = f"{prefix}{value}"
        if name == "remote":
            settings["remote"] = value
        elif value.lower() in YES_NO:
            settings[name] = YES_NO[value.lower()]
        else:
            raise UsageError(
                f"{prefix}{value!r} is not a yes or no",
                fix=f"use {prefix}true or {prefix}false (or {', '.join(sorted(YES_NO))})",
            )
    if not settings.get("remote"):
        if settings.get("remote_only"):  # nothing could come from a remote, nor be built here
            source = given.get("remote_only", f"[store] in {recipe.path}")
            emptied = f" ({given['remote']})" if "remote" in given else ""
            raise UsageError(
                f"remote_only is on ({source}) but no remote is set{emptied}",
                "set remote=<url> (or MODELKILN_REMOTE), or remote_only=false to build here",
            )
        return None
    return RemoteStore.from_settings(settings)


YES_NO = {"true": True, "1": True, "yes": True, "on": True,
              "false": False, "0": False, "no": False, "off": False}  # fmt: skip


def check_artifacts(artifacts: Path) -> None:
    """The artifacts root must be a directory (made if missing); it may be read-only."""
    if artifacts.exists() and not artifacts.is_dir():
        raise KilnError(
            f"artifacts={artifacts} is a file, not a directory",
            fix="point artifacts= at a directory (it is made if missing)",
        )
    try:
        artifacts.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KilnError(os_problem(err, artifacts, "create the artifacts directory")) from None


def step_identity(
    step: Step, keys: dict[str, str], cache: DigestCache, file: str
) -> dict[str, Any]:
    """Everything that changes the step's output, and nothing cosmetic: not the step's name,
    not the names of its data sets, not the paths of its local inputs (their content instead).
    A floating source (a PyPI range, a hub branch) is resolved here, and what it resolved to is
    `identity["resolved"]`: a new release changes this key and those built from it."""
    spec = step.spec
    params = as_params(step.config)
    for field, local in spec.local_inputs(step.config).items():
        params[field] = {"content": _local_digest(step, local, cache, file)}
    for field in spec.data_fields:
        if params[field]:
            params[field] = {"data": keys[f"data.{params[field]}"]}
    for field, ref in step.extra:
        params[field] = {"step": keys[ref]}
    identity = {
        "stage": step.stage,
        "algorithm": spec.algorithm,
        "version": spec.version,
        "params": params,
        "inputs": {"from": keys[step.source]} if step.source else {},
        "libraries": library_versions(spec.libraries),
    }
    if (env := spec.environment_of(step.config)) is not None:  # its pins stand for the
        identity["environment"] = env.key  # libraries it runs with
    if spec.platform_dependent:  # entries travel between machines: never serve one for another
        identity["platform"] = platform_identity()
    if spec.isa_dependent:  # float sums ordered by the CPU's kernels (tasks/hostinfo.py)
        identity["platform"] = {**identity["platform"], "cpu": cpu_level()}
    if isinstance(device := getattr(step.config, "device", None), str):
        identity["device"] = device_identity(device)  # what "auto" means on this machine
    if isinstance(step.config, Floating) and (resolved := _resolve(step, file)) is not None:
        identity["resolved"] = resolved
    return identity


def _resolve(step: Step, file: str) -> dict[str, str] | None:
    """The step's floating source resolved (index or hub requests; none for a pinned one)."""
    assert isinstance(step.config, Floating)
    try:
        return step.config.resolve_once()
    except StageError as err:  # the index or hub did not answer: one message, with the pin
        raise RecipeError(file, step.ref, str(err)) from None


@functools.cache
def platform_identity() -> dict[str, str]:
    """What a step's output can depend on besides its inputs: the kernels libraries pick (by OS
    and architecture) and the Python that ran them."""
    uname = os.uname()  # what platform.system() and .machine() read, without importing it
    return {
        "os": uname.sysname.lower(),
        "machine": uname.machine.lower(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def device_identity(choice: str) -> dict[str, Any]:
    """The device a step with `device = choice` runs on here, and the GPU models for CUDA:
    CUDA and CPU kernels (and two GPU generations) give other bits for one computation."""
    device = resolve_device(choice)
    return {"type": device, "gpus": gpu_models()} if device == "cuda" else {"type": device}


def _local_digest(step: Step, local: str, cache: DigestCache, file: str) -> str:
    path = Path(local)
    if not path.exists():
        raise RecipeError(
            file, step.ref, f"{local!r}: no such file or directory (from {Path.cwd()})",
            "fix the path (relative paths are read from the directory doit runs in)",
        )  # fmt: skip
    return cache.tree_digest(path)
