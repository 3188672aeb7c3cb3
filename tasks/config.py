"""Turn one TOML table into a frozen, validated config dataclass.

Types come from the dataclass annotations; allowed values from `Literal[...]`, and from the
bounds (`ge`, `le`) and size rule (`PowerOfTwo`) an `option` declares. Unknown keys, wrong
types, values outside those and values that `__post_init__` rejects all become one
`RecipeError` naming the file, the table, the key, what is allowed and the closest match.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal

from tasks.errors import RecipeError, did_you_mean
from tasks.record import Record, frozen


class ConfigValueError(ValueError):
    """Raised by a config's `__post_init__`: which key is wrong, why, and the fix."""

    def __init__(self, key: str, problem: str, fix: str = "") -> None:
        self.key, self.problem, self.fix = key, problem, fix
        super().__init__(f"{key}: {problem}")


@frozen
class PowerOfTwo(Record):
    """The rule of a block or group size: a power of two from `least` to `most` (no maximum
    when None), the sizes the kernels take. Only the part a recipe decides alone: that the
    size divides the model's widths (`divides`, when set) is checked at run time, against the
    model, before any weight is read."""

    least: int
    most: int | None = None
    why: str = ""  # which kernels take these sizes, said after the problem
    divides: str = ""  # what the size must also divide, e.g. "each MatMul's input size"

    def accepts(self, value: int) -> bool:
        in_range = value >= self.least and (self.most is None or value <= self.most)
        return in_range and not value & (value - 1)

    def sizes(self) -> list[int]:
        """The sizes allowed; without a maximum, the first three."""
        count = (self.most // self.least).bit_length() if self.most else 3
        return [self.least << i for i in range(count)]

    def describe(self) -> str:
        sizes = f"from {self.least} to {self.most}" if self.most else f">= {self.least}"
        return f"a power of two {sizes}"

    def refusal(self, key: str, value: int) -> tuple[str, str]:
        """(problem, fix) for a value the rule does not accept."""
        problem = f"{key} = {value} is not {self.describe()}"
        fix = f"use one of {', '.join(map(str, self.sizes()))}{'' if self.most else ', ...'}"
        if self.divides:
            fix += f" that divides {self.divides} (the step checks that before it reads any weight)"
        return problem + (f" ({self.why})" if self.why else ""), fix


class StageConfig(Record):
    """The base of every stage's config (with `@stage_config` on each class): a `Record`
    (tasks/record.py: what `@dataclass(frozen=True)` generates, written once) that takes
    keyword arguments only, as `@dataclass(frozen=True, kw_only=True)` would. A no-op `doit`
    on the default recipe loads most of the 20 config classes."""

    def __init__(self, /, **values: Any) -> None:
        super().__init__(**values)


def stage_config(cls: type) -> type:
    """A stage's config class: its annotated fields (with `option(...)`) become dataclass
    fields; its methods are StageConfig's."""
    if not issubclass(cls, StageConfig):
        raise TypeError(f"{cls.__qualname__} must derive from StageConfig")
    return frozen(cls)


def option(
    default: Any,
    doc: str,
    added: bool = False,
    ge: float | None = None,
    le: float | None = None,
    rule: PowerOfTwo | None = None,
) -> Any:
    """A config field with its default and the one-line doc shown in docs and errors.

    added=True marks an option added after its stage first shipped: at its default it stays
    out of the key, so a new option does not rebuild every step built before it existed.
    ge, le and rule bound a number: the parser refuses a recipe's value outside them, and the
    docs print them."""
    metadata = {"doc": doc, "added": added, "ge": ge, "le": le, "rule": rule}
    return dataclasses.field(default=default, metadata=metadata)


def describe_limits(field: dataclasses.Field) -> str:
    """The bounds and rule of a field in words ("1 or more", "0 to 4"), or ""."""
    ge, le, rule = (field.metadata.get(k) for k in ("ge", "le", "rule"))
    if rule is not None:
        text = rule.describe()
        return f"{text} dividing {rule.divides}" if rule.divides else text
    if ge is not None and le is not None:
        return f"{ge} to {le}"
    if ge is not None:
        return f"{ge} or more"
    return f"{le} or less" if le is not None else ""


def _out_of_limits(key: str, value: Any, field: dataclasses.Field) -> tuple[str, str] | None:
    """(problem, fix) for a number outside the field's bounds or rule; None when it is inside,
    or unset (None, where the field is optional)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    ge, le, rule = (field.metadata.get(k) for k in ("ge", "le", "rule"))
    written = json.dumps(value)
    fix = f"use a value from {ge} to {le}" if ge is not None and le is not None else ""
    if ge is not None and value < ge:
        return f"{key} = {written} is below the minimum {ge}", fix or f"use {ge} or more"
    if le is not None and value > le:
        return f"{key} = {written} is above the maximum {le}", fix or f"use {le} or less"
    if rule is not None and not rule.accepts(value):
        return rule.refusal(key, value)
    return None


# A setting only some configs read: (field, does it apply to this config?, where it applies).
Narrow = tuple[str, Callable[[Any], bool], str]


def refuse_inapplicable(config: Any, rules: Iterable[Narrow]) -> None:
    """Refuse a setting changed from its default where it does not apply: it would change the
    step's key but not its output. The default itself is accepted: writing it out is harmless."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for key, applies, where in rules:
        if getattr(config, key) != defaults[key] and not applies(config):
            raise ConfigValueError(
                key,
                f"only applies to {where}: here it would change the step's key, not the output",
                f"remove {key}",
            )


def describe_type(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " | ".join(describe_type(a) for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return f"list of {describe_type(typing.get_args(hint)[0])}"
    return {bool: "true/false", int: "integer", float: "number", str: "string"}.get(hint, str(hint))


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """(ok, value converted to the field's Python type)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint), value
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(hint):
            ok, converted = _coerce(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is tuple:
        if not isinstance(value, list):
            return False, value
        item = typing.get_args(hint)[0]
        converted = [_coerce(v, item) for v in value]
        return all(ok for ok, _ in converted), tuple(v for _, v in converted)
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if hint is type(None):
        return value is None, value
    raise TypeError(f"unsupported config type {hint!r}")


TOML_KINDS = ((bool, "true/false"), (int, "an integer"), (float, "a number"), (str, "a string"),
              (list, "a list"), (dict, "a table"))  # fmt: skip


def _wrong_value(key: str, value: Any, hint: Any) -> tuple[str, str]:
    """(problem, fix) for a value of the wrong kind: what it is, what the key takes, and the
    TOML to write when the value only has the wrong quotes or brackets."""
    wanted = describe_type(hint)
    if typing.get_origin(hint) is Literal:
        problem = f"{key} = {json.dumps(value, default=str)} is not one of {wanted}"
    else:
        kind = next((name for t, name in TOML_KINDS if isinstance(value, t)), type(value).__name__)
        article = "" if "/" in wanted or "|" in wanted else "an " if wanted[0] in "aeiou" else "a "
        problem = f"{key} = {json.dumps(value, default=str)} is {kind}, not {article}{wanted}"
    if isinstance(value, str):
        literal = (
            value.strip().lower() if value.strip().lower() in ("true", "false") else value.strip()
        )
        try:
            unquoted = tomllib.loads(f"v = {literal}")["v"]
        except tomllib.TOMLDecodeError:
            unquoted = None
        if unquoted is not None and _coerce(unquoted, hint)[0]:
            return problem, f"write {key} = {literal}, without quotes"
        if typing.get_origin(hint) is tuple and typing.get_args(hint)[0] is str:
            items = [v.strip() for v in value.split(",") if v.strip()] or [value]
            return problem, f"write {key} = {json.dumps(items)}: a list, even of one"
    return problem, f"{key} takes {wanted}"


@functools.cache
def _hint(cls: type, name: str) -> Any:
    """One field's type, evaluated as typing.get_type_hints does (in the namespace of the module
    of the class that declares it), but only for the keys a recipe sets: every run parses the
    recipe, and most of a config's fields are left at their defaults."""
    for klass in cls.__mro__:
        annotation = vars(klass).get("__annotations__", {}).get(name)
        if annotation is not None:
            if isinstance(annotation, str):  # `from __future__ import annotations`; our source
                return eval(annotation, vars(sys.modules[klass.__module__]))
            return annotation
    raise KeyError(name)


def parse_config(cls: type, table: dict[str, Any], file: str, where: str) -> Any:
    """Build `cls` from a TOML table, or raise a RecipeError that says how to fix it."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = set(fields)
    values = {}
    for key, value in table.items():
        if key not in known:
            raise RecipeError(
                file,
                where,
                f"unknown key {key!r}{did_you_mean(key, known)}",
                f"allowed keys here: {', '.join(sorted(known))}",
            )
        hint = _hint(cls, key)
        ok, converted = _coerce(value, hint)
        if not ok:
            raise RecipeError(file, where, *_wrong_value(key, value, hint))
        if refused := _out_of_limits(key, converted, fields[key]):
            raise RecipeError(file, where, *refused)
        values[key] = converted
    try:
        return cls(**values)
    except ConfigValueError as err:
        raise RecipeError(file, where, f"{err.key}: {err.problem}", err.fix) from None


def field_docs(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, doc) for every field: the source of docs/recipes.md's tables. The
    type says the bounds and rule too ("integer, 1 or more"). Fields of a base class marked
    `SETTINGS_LAST = True` (shared settings such as calibration data) come after the stage's
    own."""
    hints = typing.get_type_hints(cls)
    last = {
        name
        for klass in cls.__mro__
        if vars(klass).get("SETTINGS_LAST")
        for name in vars(klass).get("__annotations__", {})
    }
    fields = sorted(dataclasses.fields(cls), key=lambda f: f.name in last)
    return [
        (f.name, _described(hints[f.name], f), f.default, f.metadata.get("doc", "")) for f in fields
    ]


def _described(hint: Any, field: dataclasses.Field) -> str:
    limits = describe_limits(field)
    return f"{describe_type(hint)}, {limits}" if limits else describe_type(hint)


def as_params(config: Any) -> dict[str, Any]:
    """The config as plain JSON-able data, defaults filled in: what goes into a key."""
    params = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("added") and value == f.default:
            continue
        params[f.name] = list(value) if isinstance(value, tuple) else value
    return params
