"""Frozen records: what `@dataclass(frozen=True)` generates, written once.

The dataclass decorator compiles its methods anew for every class (init, repr, eq, hash,
setattr, delattr: about 1 ms a class on Python 3.11), and a no-op `doit` imports a dozen
frozen classes before it can say there is nothing to do. `@frozen` makes a class a dataclass
without those methods and `Record` supplies them, the same for every class: positional or
keyword arguments with their defaults, `__post_init__` after them, no assignment, equality
and hash over the fields in order, a dataclass-style repr. `dataclasses.fields`, `replace`,
`asdict`, pickle and copy work as on any frozen dataclass.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, TypeVar, dataclass_transform

T = TypeVar("T", bound=type)


class Record:
    """The base of a `@frozen` class (see the module's doc)."""

    def __init__(self, /, *args: Any, **values: Any) -> None:
        fields = _init_fields(type(self))
        name = type(self).__name__
        if len(args) > len(fields):
            raise TypeError(f"{name}() takes {len(fields)} arguments but {len(args)} were given")
        for (field, _, _), value in zip(fields, args, strict=False):
            if field in values:
                raise TypeError(f"{name}() got multiple values for argument {field!r}")
            values[field] = value
        for field, default, factory in fields:
            if field in values:
                value = values.pop(field)
            elif default is not dataclasses.MISSING:
                value = default
            elif factory is not dataclasses.MISSING:
                value = factory()
            else:
                raise TypeError(f"{name}() missing argument {field!r}")
            object.__setattr__(self, field, value)
        if values:
            raise TypeError(f"{name}() got unexpected keyword arguments {sorted(values)}")
        self.__post_init__()

    def __post_init__(self) -> None:
        pass

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name, _, _ in _init_fields(type(self)))

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = (f"{name}={getattr(self, name)!r}" for name, _, _ in _init_fields(type(self)))
        return f"{type(self).__qualname__}({', '.join(fields)})"


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def frozen(cls: T) -> T:
    """A frozen record class: its annotated fields become dataclass fields; its methods are
    Record's."""
    if not issubclass(cls, Record):
        raise TypeError(f"{cls.__qualname__} must derive from Record")
    return dataclasses.dataclass(init=False, repr=False, eq=False)(cls)


@functools.cache
def _init_fields(cls: type) -> tuple[tuple[str, Any, Any], ...]:
    """(name, default, default factory) of each field, in order."""
    return tuple((f.name, f.default, f.default_factory) for f in dataclasses.fields(cls) if f.init)
