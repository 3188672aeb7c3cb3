import dataclasses
import pickle
from dataclasses import dataclass
from typing import Literal

import pytest

from tasks.config import (
    ConfigValueError,
    PowerOfTwo,
    StageConfig,
    as_params,
    field_docs,
    option,
    parse_config,
    stage_config,
)
from tasks.errors import KilnError, PreflightError, RecipeError, StageError


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


@dataclass(frozen=True, kw_only=True)
class Bounded:
    bits: int = option(4, "bits", ge=2, le=8)
    samples: int = option(16, "calibration sequences", ge=1)
    damp: float = option(0.01, "dampening", ge=0, le=0.5)
    level: int | None = option(None, "unset: the tool's choice", ge=0, le=4)
    group_size: int = option(128, "columns per scale", rule=PowerOfTwo(16, divides="the widths"))
    block_size: int = option(32, "weights per scale", rule=PowerOfTwo(16, 256, why="the kernels"))


def parse_bounded(table):
    return parse_config(Bounded, table, "r.toml", "quantize.gptq")


@pytest.mark.parametrize(
    ("table", "problem", "fix"),
    [
        ({"bits": 9}, "bits = 9 is above the maximum 8", "use a value from 2 to 8"),
        ({"bits": 1}, "bits = 1 is below the minimum 2", "use a value from 2 to 8"),
        ({"samples": 0}, "samples = 0 is below the minimum 1", "use 1 or more"),
        ({"damp": 0.75}, "damp = 0.75 is above the maximum 0.5", "use a value from 0 to 0.5"),
        ({"level": 5}, "level = 5 is above the maximum 4", "use a value from 0 to 4"),
    ],
)
def test_a_value_out_of_bounds_names_the_bound_and_the_range(table, problem, fix):
    with pytest.raises(RecipeError) as err:
        parse_bounded(table)
    assert str(err.value) == f"r.toml: [quantize.gptq] {problem}\n  fix: {fix}"


def test_values_on_the_bounds_and_unset_optionals_pass():
    config = parse_bounded({"bits": 8, "samples": 1, "damp": 0, "level": None})
    assert (config.bits, config.samples, config.damp, config.level) == (8, 1, 0.0, None)
    assert parse_bounded({"bits": 2, "level": 0, "damp": 0.5}).level == 0


@pytest.mark.parametrize("group_size", [-1, 0, 8, 48, 96])
def test_a_group_size_not_a_power_of_two_from_16_is_refused(group_size):
    with pytest.raises(RecipeError) as err:
        parse_bounded({"group_size": group_size})
    assert str(err.value) == (
        f"r.toml: [quantize.gptq] group_size = {group_size} is not a power of two >= 16\n"
        "  fix: use one of 16, 32, 64, ... that divides the widths (the step checks that "
        "before it reads any weight)"
    )


@pytest.mark.parametrize("block_size", [8, 48, 512])
def test_a_block_size_outside_the_kernels_sizes_says_which_they_take(block_size):
    with pytest.raises(RecipeError) as err:
        parse_bounded({"block_size": block_size})
    assert str(err.value).endswith(
        f"block_size = {block_size} is not a power of two from 16 to 256 (the kernels)\n"
        "  fix: use one of 16, 32, 64, 128, 256"
    )


@pytest.mark.parametrize("size", [16, 32, 1024])
def test_powers_of_two_from_16_pass(size):
    assert parse_bounded({"group_size": size}).group_size == size
    assert parse_bounded({"block_size": min(size, 256)}).block_size == min(size, 256)


def test_docs_show_bounds_and_rules_with_the_type():
    kinds = {name: kind for name, kind, *_ in field_docs(Bounded)}
    assert kinds == {
        "bits": "integer, 2 to 8",
        "samples": "integer, 1 or more",
        "damp": "number, 0 to 0.5",
        "level": "integer, 0 to 4",
        "group_size": "integer, a power of two >= 16 dividing the widths",
        "block_size": "integer, a power of two from 16 to 256",
    }


def test_every_stage_default_is_inside_its_own_bounds():
    from tasks.stages import REGISTRY, spec_for

    for stage, algorithms in REGISTRY.items():
        for algorithm in algorithms:
            for f in dataclasses.fields(spec_for(stage, algorithm).config):
                ge, le, rule = (f.metadata.get(k) for k in ("ge", "le", "rule"))
                if f.default is None:
                    continue
                assert ge is None or f.default >= ge, (stage, algorithm, f.name)
                assert le is None or f.default <= le, (stage, algorithm, f.name)
                assert rule is None or rule.accepts(f.default), (stage, algorithm, f.name)


@pytest.mark.parametrize("error", [KilnError, StageError, PreflightError])
def test_stage_errors_take_a_fix_and_format_it_like_recipe_errors(error):
    assert str(error("model.gguf is truncated", "download it again")) == (
        "model.gguf is truncated\n  fix: download it again"
    )
    assert str(error("model.gguf is truncated")) == "model.gguf is truncated"
    recipe = RecipeError("r.toml", "model", "model.gguf is truncated", "download it again")
    assert str(recipe) == "r.toml: [model] model.gguf is truncated\n  fix: download it again"


def test_field_docs_cover_every_field():
    names = [name for name, *_ in field_docs(Demo)]
    assert names == ["bits", "group_size", "ratio", "sym", "modules"]
    assert all(doc for *_, doc in field_docs(Demo))


@stage_config
class Light(StageConfig):
    """A stage config as the stages declare theirs."""

    bits: Literal[2, 4, 8] = option(4, "weight bits")
    modules: tuple[str, ...] = option(("lm_head",), "names")
    seen: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.bits == 2:
            raise ConfigValueError("bits", "2 is too few", "use 4 or 8")


@stage_config
class Heavier(Light):
    extra: int = option(1, "one more")


def test_a_stage_config_behaves_as_a_frozen_keyword_only_dataclass():
    config = Light(bits=8)
    assert (config.bits, config.modules, config.seen) == (8, ("lm_head",), [])
    assert Light().seen is not Light().seen  # a fresh default per instance, as default_factory
    assert config == Light(bits=8) and config != Light() and Light() != Heavier()
    assert hash(Light(seen=())) == hash(Light(seen=()))
    assert repr(config) == "Light(bits=8, modules=('lm_head',), seen=[])"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.bits = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        del config.bits
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['bitz'\\]"):
        Light(bitz=4)
    with pytest.raises(ConfigValueError, match="2 is too few"):  # __post_init__ ran
        Light(bits=2)
    assert dataclasses.replace(config, bits=4) == Light()
    assert dataclasses.asdict(Heavier(extra=3)) == {
        "bits": 4, "modules": ("lm_head",), "seen": [], "extra": 3
    }  # fmt: skip
    assert [f.name for f in dataclasses.fields(Heavier)] == ["bits", "modules", "seen", "extra"]
    assert pickle.loads(pickle.dumps(Heavier(extra=3))) == Heavier(extra=3)
    assert parse_config(Heavier, {"extra": 2}, "r.toml", "x").extra == 2


def test_a_required_field_without_default_is_required():
    @stage_config
    class Needs(StageConfig):
        name: str

    assert Needs(name="a").name == "a"
    with pytest.raises(TypeError, match="missing argument 'name'"):
        Needs()


def test_a_stage_config_must_derive_from_the_base():
    with pytest.raises(TypeError, match="must derive from StageConfig"):

        @stage_config
        class Plain:
            bits: int = 4


def test_every_stage_config_is_a_stage_config():
    """So that equality, hash and freezing are StageConfig's everywhere (the registry's)."""
    from tasks.stages import REGISTRY, spec_for

    for stage, algorithms in REGISTRY.items():
        for algorithm in algorithms:
            config = spec_for(stage, algorithm).config
            assert issubclass(config, StageConfig), (stage, algorithm)


def test_each_fields_type_is_what_get_type_hints_says():
    """parse_config evaluates only the types of the keys a recipe sets (tasks.config._hint):
    for every registered config and field, the same type typing.get_type_hints gives."""
    import typing

    from tasks.config import _hint
    from tasks.stages import REGISTRY, spec_for

    for stage, algorithms in REGISTRY.items():
        for algorithm in algorithms:
            config = spec_for(stage, algorithm).config
            hints = typing.get_type_hints(config)
            for f in dataclasses.fields(config):
                assert _hint(config, f.name) == hints[f.name], (stage, algorithm, f.name)
