"""ONNX quantizers (ort-dynamic, bnb4) on the tiny model's fp32 capture: outputs load and stay close."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tasks.config import parse_config
from tasks.errors import RecipeError, StageError
from tasks.hostinfo import saturates_int8
from tasks.runtimes.onnx import genai_generate, onnx_logits, op_counts, prompt_ids
from tasks.stages import StepContext, spec_for
from tasks.stages.quantize import bnb4


def step(stage: str, algorithm: str | None, src: Path, out: Path, **table: Any) -> dict[str, Any]:
    spec = spec_for(stage, algorithm)
    out.mkdir(parents=True)
    ctx = StepContext(task=f"{stage}:test", out=out, artifacts=out.parent, input=src)
    return spec.run(parse_config(spec.config, table, "recipe.toml", stage), ctx)


@pytest.fixture(scope="module")
def nf4(fp32: Path, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("quantize") / "nf4"
    return out, step("quantize", "bnb4", fp32, out)


# onnxruntime advises 7-bit weights where its int8 kernels saturate (hostinfo.saturates_int8).
NO_VNNI = {"reduce_range": saturates_int8()}
CASES = {
    "dynamic-per-tensor": ("ort-dynamic", NO_VNNI, "MatMulInteger", 0.1),
    "dynamic-per-channel": ("ort-dynamic", {"per_channel": True, **NO_VNNI}, "MatMulInteger", 0.1),
    "bnb4-fp4": ("bnb4", {"quant_type": "fp4", "block_size": 32}, "MatMulBnb4", 0.5),
}


def assert_loads_everywhere(out: Path, fp32: Path, quantized_op: str, metrics: dict[str, Any]):
    import onnx

    # Every tensor lives in the output's own data file, which genai_config's model names.
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["filename"] == "model.onnx"
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    assert locations == {"model.onnx.data"}
    assert op_counts(out / "model.onnx").get(quantized_op, 0) == metrics["quantized_nodes"] > 0
    assert {p.name for p in fp32.iterdir()} == {p.name for p in out.iterdir()}
    # Loaded afresh here, not only inside the stage.
    ids = prompt_ids(out)
    assert onnx_logits(out, ids).shape == onnx_logits(fp32, ids).shape
    assert isinstance(genai_generate(out), str)


@pytest.mark.parametrize("case", CASES)
def test_quantized_output_loads_and_stays_close(case, fp32, tmp_path):
    algorithm, table, quantized_op, tolerance = CASES[case]
    metrics = step("quantize", algorithm, fp32, tmp_path / "out", **table)
    assert 0 < metrics["max_abs_logit_diff"] < tolerance
    assert metrics["top1_agreement"] >= 0.5
    assert isinstance(metrics["genai_text"], str)
    assert_loads_everywhere(tmp_path / "out", fp32, quantized_op, metrics)


def test_bnb4_nf4_default(nf4, fp32):
    out, metrics = nf4
    assert 0 < metrics["max_abs_logit_diff"] < 0.5
    assert_loads_everywhere(out, fp32, "MatMulBnb4", metrics)


def test_per_channel_writes_one_scale_per_column(fp32, tmp_path):
    import onnx

    step("quantize", "ort-dynamic", fp32, tmp_path / "pc", per_channel=True)
    graph = onnx.load(str(tmp_path / "pc" / "model.onnx"), load_external_data=False).graph
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMulInteger"]
    assert all(len(shapes[n.input[3]]) == 1 for n in matmuls)  # B's zero point: one per column


def test_nothing_left_to_quantize_is_an_error(nf4, tmp_path):
    with pytest.raises(StageError, match="no MatMul with constant weights"):
        step("quantize", "ort-dynamic", nf4[0], tmp_path / "again")


def test_an_output_with_non_finite_logits_is_refused(fp32, tmp_path):
    """What a broken quantizer looks like: the step fails instead of publishing it."""
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from tasks.formats.genai import model_file, save_with_external_data
    from tasks.stages.quantize.onnx_common import check_quantized

    out = tmp_path / "broken"
    shutil.copytree(fp32, out)
    model = onnx.load(str(model_file(fp32)))
    weight = next(t for t in model.graph.initializer if "down_proj" in t.name)
    broken = numpy_helper.to_array(weight).copy()
    broken[0, 0] = np.nan
    weight.CopyFrom(numpy_helper.from_array(broken, weight.name))
    for f in out.glob("model.onnx*"):
        f.unlink()
    save_with_external_data(model, out / "model.onnx")
    with pytest.raises(StageError, match="non-finite logits"):
        check_quantized(fp32, out, "MatMul")


@pytest.mark.parametrize("block_size", [8, 48, 0, -64])
def test_bnb4_block_size_must_be_a_power_of_two_from_16(block_size):
    with pytest.raises(RecipeError, match=f"block_size = {block_size} is not a power of two"):
        parse_config(bnb4.Config, {"block_size": block_size}, "recipe.toml", "quantize.bnb4")


def test_ort_dynamic_needs_matmul_in_op_types():
    spec = spec_for("quantize", "ort-dynamic")
    with pytest.raises(RecipeError, match="leaves out MatMul"):
        parse_config(spec.config, {"op_types": ["Gather"]}, "recipe.toml", "quantize.int8")


@pytest.mark.parametrize(
    ("algorithm", "quantized_op"), [("ort-dynamic", "MatMulInteger"), ("bnb4", "MatMulBnb4")]
)
def test_nodes_to_exclude_stay_in_float(algorithm, quantized_op, fp32, tmp_path):
    all_quantized = op_counts(fp32 / "model.onnx").get("MatMul", 0)
    step("quantize", algorithm, fp32, tmp_path / "q", nodes_to_exclude=["/lm_head/MatMul"])
    counts = op_counts(tmp_path / "q" / "model.onnx")
    assert counts.get("MatMul") == 1  # the LM head only
    assert counts[quantized_op] == all_quantized - 1


@pytest.mark.parametrize(
    ("algorithm", "key", "messy", "tidy"),
    [
        ("ort-dynamic", "op_types", ["Gather", "MatMul", "Gather"], ["Gather", "MatMul"]),
        ("ort-dynamic", "nodes_to_exclude", ["/b", "/a", "/b"], ["/a", "/b"]),
        ("bnb4", "nodes_to_exclude", ["/b", "/a", "/b"], ["/a", "/b"]),
    ],
)
def test_set_like_lists_do_not_rekey_when_reordered_or_repeated(algorithm, key, messy, tidy):
    from tasks.config import as_params

    config = spec_for("quantize", algorithm).config

    def params(value: list[str]) -> dict[str, Any]:
        return as_params(parse_config(config, {key: value}, "recipe.toml", "quantize.q"))

    assert params(messy) == params(tidy)
    assert params(messy)[key] == tidy


def test_nodes_to_exclude_takes_globs_and_refuses_a_pattern_matching_nothing(fp32, tmp_path):
    step("quantize", "ort-dynamic", fp32, tmp_path / "q", nodes_to_exclude=["*/mlp/down_proj/*"])
    assert op_counts(tmp_path / "q" / "model.onnx").get("MatMul") == 2  # one per layer
    with pytest.raises(StageError, match="matches no node"):
        step("quantize", "bnb4", fp32, tmp_path / "typo", nodes_to_exclude=["*/mlp/dwn_proj/*"])
