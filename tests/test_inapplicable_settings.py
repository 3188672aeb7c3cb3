"""A setting its step does not read would change the step's key but not its output: each class
of such settings is refused with one message, and writing out a default stays accepted."""

from __future__ import annotations

from pathlib import Path

import pytest
from workspace import ROOT

from tasks.config import as_params, parse_config
from tasks.errors import RecipeError
from tasks.recipe import load_recipe
from tasks.stages import spec_for

CAL = {"data": "d"}
FINETUNE = {"data": "t", "text_template": "{text}"}

# (stage, algorithm, table, the key refused)
REFUSED = [
    # rtn never calibrates; quarot does only with GPTQ.
    ("quantize", "rtn", {"num_samples": 100000}, "num_samples"),
    ("quantize", "rtn", {"seq_len": 4096}, "seq_len"),
    ("quantize", "quarot", {"weight_quantizer": "rtn", "num_samples": 4}, "num_samples"),
    # GPTQ's own settings when QuaRot rounds the rotated weights to nearest.
    ("quantize", "quarot", {"weight_quantizer": "rtn", "damp_percent": 0.1}, "damp_percent"),
    ("quantize", "quarot", {"weight_quantizer": "rtn", "act_order": False}, "act_order"),
    # Scoring settings without data, and data that neither calibrates nor scores.
    ("quantize", "rtn", {"eval_tokens": 1024}, "eval_tokens"),
    ("quantize", "rtn", {"data": "d", "eval_tokens": 0}, "data"),
    # ONNX quantizers that do not calibrate, given calibration settings.
    ("quantize", "inc-weight-only", {"method": "rtn", "num_samples": 4}, "num_samples"),
    ("quantize", "nvmo", {"method": "rtn_dq", "seq_len": 128}, "seq_len"),
    # nvmo's int4 block settings in int8 mode.
    ("quantize", "nvmo", {"mode": "int8", "block_size": 32} | CAL, "block_size"),
    ("quantize", "nvmo", {"mode": "int8", "use_zero_point": True} | CAL, "use_zero_point"),
    # The builder's settings for torch.onnx, its int4 settings at another precision.
    ("capture", None, {"ort_genai": False, "extra_options": ["a=b"]}, "extra_options"),
    ("capture", None, {"int4_block_size": 64}, "int4_block_size"),
    # A held-out loss interval without held-out examples.
    ("finetune", None, FINETUNE | {"eval_samples": 0, "eval_every": 5}, "eval_every"),
    # Perplexity and answer settings without data.
    ("evaluate", None, {"seq_len": 128}, "seq_len"),
    ("evaluate", None, {"max_tokens": 128}, "max_tokens"),
    ("evaluate", None, {"split": "train"}, "split"),
    ("evaluate", None, {"data": "d", "answers": 0, "answer_tokens": 4}, "answer_tokens"),
]


def parse(stage: str, algorithm: str | None, table: dict) -> object:
    spec = spec_for(stage, algorithm)
    return parse_config(spec.config, table, "recipe.toml", f"{stage}.x")


@pytest.mark.parametrize(("stage", "algorithm", "table", "key"), REFUSED)
def test_a_setting_the_step_does_not_read_is_refused(stage, algorithm, table, key):
    with pytest.raises(RecipeError) as err:
        parse(stage, algorithm, table)
    message = str(err.value)
    assert f"{key}: only applies to " in message
    assert "here it would change the step's key, not the output" in message
    assert f"remove {key}" in message


@pytest.mark.parametrize(
    ("stage", "algorithm", "table"),
    [
        ("quantize", "rtn", {"num_samples": 16, "seq_len": 512, "eval_tokens": 4096}),
        ("quantize", "quarot", {"weight_quantizer": "rtn", "damp_percent": 0.01}),
        ("quantize", "nvmo", {"mode": "int8", "block_size": 128} | CAL),
        ("quantize", "nvmo", {"method": "rtn_dq", "num_samples": 8, "seq_len": 256}),
        ("evaluate", None, {"seq_len": 512, "max_tokens": 4096}),
    ],
)
def test_a_default_written_out_is_accepted_and_keeps_the_key(stage, algorithm, table):
    given = {k: v for k, v in table.items() if k in ("data", "mode", "method", "weight_quantizer")}
    assert as_params(parse(stage, algorithm, table)) == as_params(parse(stage, algorithm, given))


@pytest.mark.parametrize(
    ("stage", "algorithm", "table"),
    [
        ("quantize", "gptq", {"num_samples": 4, "seq_len": 128} | CAL),
        ("quantize", "quarot", {"num_samples": 4, "damp_percent": 0.1} | CAL),
        ("quantize", "rtn", {"eval_tokens": 1024} | CAL),
        ("quantize", "nvmo", {"block_size": 32, "use_zero_point": True} | CAL),
        ("capture", None, {"ort_genai": True, "extra_options": ["a=b"]}),
        ("finetune", None, FINETUNE | {"eval_every": 5}),
        ("evaluate", None, {"data": "d", "seq_len": 128, "answer_tokens": 4}),
    ],
)
def test_the_same_settings_where_they_apply_are_accepted(stage, algorithm, table):
    parse(stage, algorithm, table)


@pytest.mark.parametrize(
    "recipe", [ROOT / "recipes" / "default.toml", *sorted((ROOT / "bench").glob("*.toml"))]
)
def test_the_shipped_recipes_stay_valid(recipe: Path):
    assert load_recipe(recipe).steps
