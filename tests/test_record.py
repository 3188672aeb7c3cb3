"""tasks/record.py: a `@frozen` Record behaves as the `@dataclass(frozen=True)` it replaces."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from pathlib import Path

import pytest

from tasks.record import Record, frozen


@dataclasses.dataclass(frozen=True)
class Twin:
    path: Path
    count: int
    names: tuple[str, ...] = ()
    table: dict[str, int] = dataclasses.field(default_factory=dict)


@frozen
class Rec(Record):
    path: Path
    count: int
    names: tuple[str, ...] = ()
    table: dict[str, int] = dataclasses.field(default_factory=dict)


@frozen
class Hashable(Record):
    a: int
    b: str = "x"


def _same(call_twin, call_rec):
    """Both calls return equal results or raise the same exception type."""
    results = []
    for call in (call_twin, call_rec):
        try:
            results.append(("ok", call()))
        except Exception as err:  # noqa: BLE001 - the type is what is compared
            results.append(("raised", type(err)))
    assert results[0] == results[1]


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((Path("a"), 1), {}),
        ((Path("a"),), {"count": 2, "names": ("n",)}),
        ((), {"path": Path("b"), "count": 3, "table": {"k": 1}}),
        ((Path("a"), 1, ("n",), {}, "extra"), {}),  # too many
        ((Path("a"),), {}),  # count missing
        ((Path("a"), 1), {"count": 2}),  # count twice
        ((Path("a"), 1), {"bogus": 2}),  # unknown
    ],
)
def test_construction_matches_a_frozen_dataclass(args, kwargs):
    def fingerprint(cls):
        obj = cls(*args, **kwargs)
        return repr(obj).replace(cls.__qualname__, "C"), dataclasses.asdict(obj)

    _same(lambda: fingerprint(Twin), lambda: fingerprint(Rec))


def test_behaviour_matches_a_frozen_dataclass():
    twin, rec = Twin(Path("a"), 1, ("n",), {"k": 1}), Rec(Path("a"), 1, ("n",), {"k": 1})
    assert repr(rec) == repr(twin).replace("Twin", "Rec")
    assert rec == Rec(Path("a"), 1, ("n",), {"k": 1}) and rec != Rec(Path("a"), 2)
    assert (rec == twin) is False and rec.__eq__(1) is NotImplemented
    _same(lambda: hash(twin), lambda: hash(rec) and None)  # a dict field: unhashable in both
    assert hash(Hashable(1)) == hash(Hashable(1, "x")) != hash(Hashable(2))
    for obj in (twin, rec):
        with pytest.raises(dataclasses.FrozenInstanceError):
            obj.count = 2
        with pytest.raises(dataclasses.FrozenInstanceError):
            del obj.count
    assert [f.name for f in dataclasses.fields(rec)] == [f.name for f in dataclasses.fields(twin)]
    assert dataclasses.is_dataclass(rec) and Rec.__match_args__ == Twin.__match_args__
    assert dataclasses.replace(rec, count=5) == Rec(Path("a"), 5, ("n",), {"k": 1})
    assert pickle.loads(pickle.dumps(rec)) == rec and copy.deepcopy(rec) == rec
    assert copy.copy(rec) == rec
    assert Rec(Path("a"), 1).table is not Rec(Path("a"), 1).table  # a fresh default each time


def test_a_field_may_be_called_self():
    @frozen
    class Odd(Record):
        self: int  # a keyword the base's __init__ must not take for itself

    assert Odd(self=3).self == 3 and Odd(4).self == 4


def test_post_init_runs_after_the_fields():
    @frozen
    class Checked(Record):
        size: int

        def __post_init__(self):
            if self.size < 0:
                raise ValueError("negative")

    assert Checked(3).size == 3
    with pytest.raises(ValueError, match="negative"):
        Checked(size=-1)


def test_a_record_must_derive_from_the_base():
    with pytest.raises(TypeError, match="must derive from Record"):

        @frozen
        class Plain:
            a: int


def test_every_record_in_the_package_is_decorated():
    """A Record subclass without @frozen would have no fields and take no arguments."""
    import tasks.glue  # noqa: F401 - loads every module a `doit` run loads
    from tasks.config import StageConfig

    found, todo = [], list(Record.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.startswith("tasks.") and cls is not StageConfig:
            found.append(cls)
            assert "__dataclass_fields__" in vars(cls), cls
    names = {cls.__name__ for cls in found}
    assert {"Store", "Step", "StageSpec", "Graph", "Recipe"} <= names
