"""The capture stage on the tiny model: the genai builder and torch.onnx export, proved vs torch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tasks.config import ConfigValueError, parse_config
from tasks.errors import PreflightError, RecipeError, StageError
from tasks.runtimes.onnx import op_counts, prompt_ids
from tasks.stages import StepContext
from tasks.stages.capture import Config, run
from tasks.store import read_manifest


def capture(model: Path, out: Path, config: Config) -> dict[str, Any]:
    out.mkdir(parents=True)
    ctx = StepContext(task="capture:test", out=out, artifacts=out.parent, input=model)
    return run(config, ctx)


@pytest.fixture(scope="module")
def builder_fp32(fp32: Path) -> tuple[Path, dict[str, Any]]:
    """The default capture (the tiny recipe's capture:fp32 entry) and the step's metrics."""
    return fp32, read_manifest(fp32)["metrics"]


@pytest.fixture(scope="module")
def torch_export(tiny_model: Path, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("capture") / "torch"
    return out, capture(tiny_model, out, Config(ort_genai=False))


def io_names(folder: Path) -> tuple[set[str], set[str]]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return {i.name for i in session.get_inputs()}, {o.name for o in session.get_outputs()}


def test_builder_fp32_matches_torch(builder_fp32):
    out, metrics = builder_fp32
    assert metrics["max_abs_logit_diff"] < 1e-4
    assert metrics["top1_agreement"] == 1.0
    assert isinstance(metrics["genai_text"], str)
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= names
    assert not names & {"builder.log", "cache_dir"}  # the log and the cache stay out


def test_builder_fp32_greedy_tokens_match_transformers(builder_fp32, tiny_model):
    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM

    ids = prompt_ids(tiny_model)[:8]
    model = og.Model(str(builder_fp32[0]))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 6, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    hf = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0]
    assert list(generator.get_sequence(0)) == want.tolist()


def test_torch_export_matches_torch_with_the_builders_names(torch_export, builder_fp32):
    out, metrics = torch_export
    assert metrics["max_abs_logit_diff"] < 1e-4
    assert metrics["top1_agreement"] == 1.0
    assert "genai_text" not in metrics  # no genai_config: a plain ONNX decoder
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "config.json", "tokenizer.json"} <= names
    assert not any(n.endswith(".safetensors") for n in names)
    assert io_names(out) == io_names(builder_fp32[0])


def test_int4_passes_block_size_and_accuracy_level(tiny_model, tmp_path):
    config = Config(precision="int4", int4_block_size=16, int4_accuracy_level=1)
    metrics = capture(tiny_model, tmp_path / "int4", config)
    assert metrics["max_abs_logit_diff"] < 1.0  # recorded, not tight: 4-bit weights
    assert isinstance(metrics["genai_text"], str)
    import onnx

    graph = onnx.load(str(tmp_path / "int4" / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert nbits and "MatMul" not in op_counts(tmp_path / "int4" / "model.onnx")
    for node in nbits:
        attrs = {a.name: a.i for a in node.attribute}
        assert (attrs["block_size"], attrs["accuracy_level"]) == (16, 1)


def test_builder_failure_shows_the_log_tail(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(StageError, match="model builder failed") as err:
        capture(model, tmp_path / "out", Config())
    assert "is not currently supported" in str(err.value)  # the builder's own words
    assert (tmp_path / "out" / "builder.log").is_file()  # kept for inspection


def quantized_model(tmp_path: Path, bits: int) -> Path:
    """A directory with only a config.json: the checks run before anything reads weights."""
    tmp_path.mkdir(exist_ok=True)
    quant = {"quant_method": "gptq", "bits": bits, "group_size": 32}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": quant}))
    return tmp_path


def test_quantized_input_with_unsupported_bits(tmp_path):
    with pytest.raises(StageError, match="MatMulNBits takes 2, 4, 8 bits"):
        capture(quantized_model(tmp_path / "m", 3), tmp_path / "out", Config(precision="int4"))


def test_quantized_input_needs_int4(tmp_path):
    with pytest.raises(StageError, match='set precision = "int4"'):
        capture(quantized_model(tmp_path / "m", 4), tmp_path / "out", Config())


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"precision": "fp16"}, "fp16 does not run on the CPU"),
        ({"ort_genai": False, "precision": "int4"}, "torch.onnx writes fp32"),
        ({"precision": "int4", "int4_block_size": 48}, "48 is not a power of two from 16 to 256"),
        ({"precision": "int4", "int4_accuracy_level": 5}, "5 is above the maximum 4"),
        ({"int4_block_size": 64}, 'int4_block_size: only applies to precision = "int4"'),
        ({"int4_accuracy_level": 1}, 'int4_accuracy_level: only applies to precision = "int4"'),
        ({"extra_options": ["block_size=64"]}, "set int4_block_size instead"),
        ({"extra_options": ["exclude_embeds"]}, "is not 'key=value'"),
    ],
)
def test_impossible_configs_are_recipe_errors(table, message):
    with pytest.raises(RecipeError, match=message):
        parse_config(Config, table, "recipe.toml", "capture.x")


def test_extra_options_reach_the_builder():
    from tasks.stages.capture import builder_command

    config = Config(precision="int4", extra_options=("nodes_to_exclude=/lm_head/MatMul",))
    cmd = builder_command(config, Path("hf"), Path("out"), Path("cache"))
    extra = cmd[cmd.index("--extra_options") + 1 :]
    assert extra == ["nodes_to_exclude=/lm_head/MatMul", "block_size=32", "accuracy_level=4"]
    assert "--extra_options" not in builder_command(Config(), Path("h"), Path("o"), Path("c"))


def test_quantized_input_converts_exactly_unless_told_otherwise():
    """A GPTQ/AWQ input keeps its float LM head in float and computes in fp32 (accuracy 1), so
    the ONNX model matches the checkpoint's (q - z) * s; the step's own settings win."""
    from tasks.stages.capture import builder_command

    def extra(config: Config, quant: dict[str, Any] | None) -> list[str]:
        cmd = builder_command(config, Path("hf"), Path("out"), Path("cache"), quant)
        return cmd[cmd.index("--extra_options") + 1 :]

    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    int4 = Config(precision="int4")
    assert extra(int4, gptq) == [
        "shared_embeddings=false",
        "nodes_to_exclude=/lm_head/MatMul",
        "block_size=32",
        "accuracy_level=1",
    ]
    assert extra(int4, None) == ["block_size=32", "accuracy_level=4"]
    assert extra(int4, gptq | {"lm_head": True}) == [
        "shared_embeddings=false",
        "block_size=32",
        "accuracy_level=1",
    ]
    own = Config(
        precision="int4",
        int4_accuracy_level=4,
        extra_options=("nodes_to_exclude=/x", "shared_embeddings=true"),
    )
    assert extra(own, gptq) == [
        "nodes_to_exclude=/x",
        "shared_embeddings=true",
        "block_size=32",
        "accuracy_level=4",
    ]


def test_cuda_without_a_gpu_is_refused_before_building(tiny_model, tmp_path):
    import onnxruntime_genai as og

    if og.is_cuda_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(PreflightError, match="build this step on such a machine"):
        capture(tiny_model, tmp_path / "out", Config(precision="fp16", execution_provider="cuda"))
    assert not any((tmp_path / "out").iterdir())


def test_kv_heads_and_head_size_come_from_the_config(tiny_model):
    from tasks.runtimes.onnx import decoder_dims

    assert decoder_dims(tiny_model) == {"kv_heads": 2, "head_size": 16}  # 4 heads of 64 / 4


def test_builder_libraries_enter_the_key():
    from tasks.stages.capture import SPEC

    assert {"onnx-ir", "onnxruntime-genai"} <= set(SPEC.libraries)


def test_config_value_error_names_the_key():
    with pytest.raises(ConfigValueError) as err:
        Config(precision="fp16")
    assert err.value.key == "precision"
