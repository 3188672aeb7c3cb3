from dataclasses import dataclass
from typing import Literal

import pytest

from tasks.config import ConfigValueError, as_params, field_docs, option, parse_config
from tasks.errors import RecipeError


@dataclass(frozen=True, kw_only=True)
class Demo:
    bits: Literal[2, 4, 8] = option(4, "weight bits")
    group_size: int = option(128, "columns per scale")
    ratio: float = option(0.5, "a ratio")
    sym: bool = option(True, "symmetric")
    modules: tuple[str, ...] = option(("lm_head",), "names")

    def __post_init__(self):
        if self.group_size != -1 and self.group_size < 16:
            raise ConfigValueError(
                "group_size", f"{self.group_size} is below 16", "use 32, 64, 128 or -1"
            )


def parse(table):
    return parse_config(Demo, table, "r.toml", "quantize.x")


def test_defaults_written_explicitly_give_the_same_params():
    assert as_params(parse({})) == as_params(parse({"bits": 4, "group_size": 128, "sym": True}))


def test_int_is_accepted_for_float_and_lists_become_tuples():
    cfg = parse({"ratio": 1, "modules": ["a", "b"]})
    assert cfg.ratio == 1.0 and isinstance(cfg.ratio, float)
    assert cfg.modules == ("a", "b")


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"group_sise": 64}, "did you mean group_size?"),
        ({"bits": 5}, "2 | 4 | 8"),
        ({"sym": 1}, "true/false"),
        ({"group_size": "64"}, 'group_size = "64" is a string, not an integer'),
        ({"group_size": "64"}, "fix: write group_size = 64, without quotes"),
        ({"sym": "false"}, "fix: write sym = false, without quotes"),
        ({"bits": "4"}, "fix: write bits = 4, without quotes"),
        ({"modules": "lm_head"}, 'fix: write modules = ["lm_head"]: a list, even of one'),
        ({"modules": "a, b"}, 'fix: write modules = ["a", "b"]'),
        ({"group_size": True}, "is true/false, not an integer"),
        ({"group_size": 64.5}, "is a number, not an integer"),
        ({"modules": ["a", 1]}, "list of string"),
        ({"group_size": 8}, "use 32, 64, 128 or -1"),
    ],
)
def test_bad_values_name_file_table_key_and_fix(table, expected):
    with pytest.raises(RecipeError) as err:
        parse(table)
    text = str(err.value)
    assert text.startswith("r.toml: [quantize.x]")
    assert expected in text


def test_field_docs_cover_every_field():
    names = [name for name, *_ in field_docs(Demo)]
    assert names == ["bits", "group_size", "ratio", "sym", "modules"]
    assert all(doc for *_, doc in field_docs(Demo))
