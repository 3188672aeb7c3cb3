"""Read a TOML recipe into frozen, validated steps.

`[model]` is the base model, `[data.<name>]` a named data set, and every `[<stage>.<name>]` a
build step that becomes the doit task `<stage>:<name>`. Everything that can be wrong with a
recipe (bad TOML, unknown tables or keys, wrong types, unknown algorithms, dangling `from`,
cycles, an input of the wrong format) is a RecipeError raised here, before anything runs.
"""

from __future__ import annotations

import graphlib
import re
import tomllib
from dataclasses import field
from pathlib import Path
from typing import Any

from tasks.config import parse_config
from tasks.errors import KilnError, RecipeError, did_you_mean
from tasks.gates import check_gates
from tasks.record import Record, frozen
from tasks.remote import check_remote_settings
from tasks.slots import Resources, check_resources
from tasks.stages import (
    DATA,
    FORMAT_NAMES,
    HF,
    ONNX,
    STEP_STAGES,
    Step,
    algorithms,
    spec_for,
)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
BASE = "model"  # the ref of the base model step


@frozen
class Recipe(Record):
    path: Path
    steps: dict[str, Step]  # by ref, inputs before the steps that use them
    written: tuple[str, ...] = ()  # refs in the file's order (steps it implies last)
    implied: frozenset[str] = frozenset()  # refs of steps the recipe adds by itself
    store: dict[str, Any] = field(default_factory=dict)  # [store]: the remote store's settings
    nightly: dict[str, Any] = field(default_factory=dict)  # [nightly]: baseline, tolerances

    @property
    def name(self) -> str:
        return self.path.stem

    def of_stage(self, stage: str) -> list[Step]:
        """The stage's steps in the order the recipe writes them (`doit list`, the report)."""
        order = {ref: i for i, ref in enumerate(self.written)}
        steps = [s for s in self.steps.values() if s.stage == stage]
        return sorted(steps, key=lambda s: order.get(s.ref, len(order)))


def load_recipe(path: Path) -> Recipe:
    file = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(
            file, "", "no such recipe file", "pass recipe=<path to a .toml file>"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(
            file, "", f"cannot read the recipe: {err}", "pass recipe=<a UTF-8 .toml file>"
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(
            file, "", f"not valid TOML: {err}", "fix the syntax at that line"
        ) from None
    parsed = _parse_steps(raw, file)
    steps = _order(parsed, file)
    _check_formats(file, steps)
    implied = {r for r, st in parsed.items() if st.name and st.name not in raw.get(st.stage, {})}
    return Recipe(
        path, steps, tuple(parsed), frozenset(implied), _store_settings(raw, file),
        _nightly_settings(raw, file),
    )  # fmt: skip


def _store_settings(raw: dict[str, Any], file: str) -> dict[str, Any]:
    """The [store] table: where the shared remote store is. Never part of a key."""
    table = raw.get("store", {})
    if not isinstance(table, dict):
        raise RecipeError(file, "", "store is a value, not a table", "write [store] remote = ...")
    try:
        if table:
            check_remote_settings(table)
    except KilnError as err:
        raise RecipeError(file, "store", str(err)) from None
    return table


# What the run report compares against (tasks/history.py): a run id, and per metric how much
# worse (relative; answer_accuracy: absolute) still counts as noise.
NIGHTLY_KEYS = {"baseline", "tolerances"}
TOLERANCE_METRICS = ("perplexity", "size_bytes", "decode_tokens_per_s", "first_token_ms",
                     "answer_accuracy")  # fmt: skip


def _nightly_settings(raw: dict[str, Any], file: str) -> dict[str, Any]:
    """The [nightly] table: never part of a key."""
    table = raw.get("nightly", {})
    if not isinstance(table, dict):
        raise RecipeError(
            file, "", "nightly is a value, not a table", 'write [nightly] baseline = "<run id>"'
        )
    for key in table:
        if key not in NIGHTLY_KEYS:
            raise RecipeError(
                file, "nightly", f"unknown key {key!r}{did_you_mean(key, NIGHTLY_KEYS)}",
                f"[nightly] takes {', '.join(sorted(NIGHTLY_KEYS))}",
            )  # fmt: skip
    if not isinstance(table.get("baseline", ""), str):
        raise RecipeError(
            file, "nightly", "baseline is not a string", 'baseline = "20261201T030000Z" (a run id)'
        )
    tolerances = table.get("tolerances", {})
    if not isinstance(tolerances, dict) or any(
        m not in TOLERANCE_METRICS or isinstance(v, bool) or not isinstance(v, int | float) or v < 0
        for m, v in tolerances.items()
    ):
        raise RecipeError(
            file, "nightly", f"tolerances = {tolerances!r}: expected metric = fraction >= 0",
            f"metrics: {', '.join(TOLERANCE_METRICS)}; e.g. tolerances = {{ perplexity = 0.01 }}",
        )  # fmt: skip
    return table


def _parse_steps(raw: dict[str, Any], file: str) -> dict[str, Step]:
    allowed = ["model", "data", *STEP_STAGES, "store", "nightly"]
    for top in raw:
        if top not in allowed:
            raise RecipeError(
                file, top, f"unknown table{did_you_mean(top, allowed)}",
                f"top-level tables are: {', '.join(allowed)}",
            )  # fmt: skip
    if not isinstance(raw.get("model"), dict):
        raise RecipeError(
            file, "model", "the recipe has no [model] table", 'add [model] source = "..."'
        )
    steps = {BASE: _step(file, "model", "", raw["model"])}
    for stage in ("data", *STEP_STAGES):
        tables = raw.get(stage, {})
        for name, table in tables.items():
            if not isinstance(table, dict):
                raise RecipeError(
                    file, f"{stage}", f"{name} = {table!r} is a value, not a step",
                    f"each {stage} step is its own table: [{stage}.<name>]",
                )  # fmt: skip
            if not NAME.match(name):
                raise RecipeError(
                    file, f"{stage}.{name}", "step names use letters, digits, '-' and '_'",
                    "rename the table",
                )  # fmt: skip
            step = _step(file, stage, name, table)
            steps[step.ref] = step
    for step in list(steps.values()):
        if step.spec.implies:
            completed, added = step.spec.implies(step, steps, file)
            steps[step.ref] = completed
            for new in added:
                steps.setdefault(new.ref, new)
    for step in steps.values():
        _check_refs(file, step, steps)
    return steps


def _check_formats(file: str, steps: dict[str, Step]) -> None:
    """After the cycle check, so a step reading from itself is reported as a cycle."""
    for step in steps.values():
        upstream = steps.get(step.source) if step.source else None
        if upstream and upstream.spec.output not in step.spec.inputs:
            raise RecipeError(file, step.ref, *_format_fix(step, upstream, steps))
        if upstream and step.spec.check_source:
            step.spec.check_source(step, upstream, file)


def _step(file: str, stage: str, name: str, table: dict[str, Any]) -> Step:
    where = f"{stage}.{name}" if name else stage
    table = dict(table)
    source = table.pop("from", None)
    algorithm = table.pop("algorithm", None)
    choices = algorithms(stage)
    if choices:
        algorithm = algorithm if algorithm is not None else name
        if algorithm not in choices:
            raise RecipeError(
                file, where, f"unknown algorithm {algorithm!r}{did_you_mean(algorithm, choices)}",
                f"set algorithm = one of: {', '.join(choices)}",
            )  # fmt: skip
    elif algorithm is not None:
        raise RecipeError(file, where, f"{stage} has no 'algorithm' key", "remove it")
    spec = spec_for(stage, algorithm)
    if spec.inputs:
        source = BASE if source is None else source
        if not isinstance(source, str):
            raise RecipeError(
                file, where, f"from = {source!r} is not a string", 'from = "<stage>.<name>"'
            )
    elif source is not None:
        raise RecipeError(file, where, f"{stage} takes no 'from'", "remove it")
    gates: tuple[tuple[str, float], ...] = ()
    if "gates" in table and stage == "evaluate":
        try:
            gates = check_gates(table.pop("gates"))
        except ValueError as err:
            raise RecipeError(file, where, str(err), "see docs/nightly.md, Quality gates") from None
    resources = Resources()
    if "resources" in table:
        try:
            resources = check_resources(table.pop("resources"))
        except ValueError as err:
            raise RecipeError(
                file, where, str(err), "e.g. resources = { gpus = 1, cpus = 4 } (docs/design.md)"
            ) from None
    config = parse_config(spec.config, table, file, where)
    data = tuple(f"data.{getattr(config, f)}" for f in spec.data_fields if getattr(config, f))
    extra = tuple((f, getattr(config, f)) for f in spec.step_fields if getattr(config, f))
    return Step(stage, name, spec, config, source, data, extra, gates, resources)


def inputs_of(step: Step) -> list[str]:
    """Refs of every step this one reads: its `from`, its data sets, its other step fields."""
    return ([step.source] if step.source else []) + list(step.data) + [r for _, r in step.extra]


def _check_refs(file: str, step: Step, steps: dict[str, Step]) -> None:
    if step.source is not None:
        upstream = steps.get(step.source)
        if upstream is not None and upstream.stage == "data":
            field = step.spec.data_fields[0] if step.spec.data_fields else ""
            raise RecipeError(
                file, step.ref, f"from = {step.source!r} is a data set, not a model",
                f'a data set goes in {field} = "{upstream.name}"; from names the model to read'
                if field else "from names the model to read: a model, capture, quantize, ... step",
            )  # fmt: skip
        if upstream is None:
            known = [r for r, s in steps.items() if s.stage != "data" and r != step.ref]
            raise RecipeError(
                file, step.ref, f"from = {step.source!r} names no step{did_you_mean(step.source, known)}",
                f"name one of: {', '.join(known)}",
            )  # fmt: skip
    for field, ref in step.extra:
        target = steps.get(ref)
        wants = step.spec.step_fields[field]
        if target is None or target.spec.output not in wants:
            known = [r for r, s in steps.items() if s.spec.output in wants]
            problem = "names no step" if target is None else "gives " + FORMAT_NAMES.get(
                target.spec.output, target.spec.output)  # fmt: skip
            raise RecipeError(
                file, step.ref, f"{field} = {ref!r} {problem}{did_you_mean(ref, known)}",
                f"name a step that gives {' or '.join(FORMAT_NAMES.get(w, w) for w in wants)}: "
                f"{', '.join(known) or '(none in this recipe)'}",
            )  # fmt: skip
    for ref in step.data:
        target = steps.get(ref)
        if target is None or target.spec.output != DATA:
            known = [r.split(".", 1)[1] for r, s in steps.items() if s.stage == "data"]
            name = ref.split(".", 1)[1]
            raise RecipeError(
                file, step.ref, f"data = {name!r} names no [data.{name}] table{did_you_mean(name, known)}",
                f"define [data.{name}] or use one of: {', '.join(known) or '(none defined)'}",
            )  # fmt: skip


def _format_fix(step: Step, upstream: Step, steps: dict[str, Step]) -> tuple[str, str]:
    wants = " or ".join(FORMAT_NAMES.get(f, f) for f in step.spec.inputs)
    gives = FORMAT_NAMES.get(upstream.spec.output, upstream.spec.output)
    problem = f"takes {wants}, but from = {step.source!r} gives {gives}"
    if ONNX in step.spec.inputs:
        captures = [
            s.ref for s in steps.values() if s.stage == "capture" and s.source == upstream.ref
        ]
        if captures:
            return problem, f'set from = "{captures[0]}" (it captures {upstream.ref} to ONNX)'
        return problem, (
            f"put a capture step in front: add [capture.{upstream.name or 'base'}] with "
            f'from = "{upstream.ref}", then set from = "capture.{upstream.name or "base"}" here'
        )
    if HF in step.spec.inputs and upstream.stage == "capture" and upstream.source:
        return problem, (
            f'set from = "{upstream.source}" (the Hugging Face model {upstream.ref} captures)'
        )
    return problem, f"point from at a step that gives {wants}"


def _order(steps: dict[str, Step], file: str) -> dict[str, Step]:
    """Steps with every input before its users (graphlib); a cycle is a RecipeError naming it."""
    sorter = graphlib.TopologicalSorter({ref: inputs_of(step) for ref, step in steps.items()})
    try:
        return {ref: steps[ref] for ref in sorter.static_order()}
    except graphlib.CycleError as err:
        cycle = list(reversed(err.args[1]))  # each step, then the step it reads from
        raise RecipeError(
            file, cycle[0], f"the steps form a cycle: {' -> '.join(cycle)}",
            "make one of them read from another step",
        ) from None  # fmt: skip
