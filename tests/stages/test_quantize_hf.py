"""The Hugging Face quantizer stages (rtn, gptq, awq, quarot) on the tiny model: their output
folders, their conversion through capture, QuaRot's exact rotation, and one clear error for
each bad setting."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_text
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from workspace import Workspace, tiny_recipe

from tasks.config import parse_config
from tasks.errors import RecipeError, StageError
from tasks.quant.checkpoint import load_dequantized
from tasks.runtimes.onnx import op_counts, prompt_ids
from tasks.runtimes.perplexity import heldout_perplexity
from tasks.stages import StepContext, spec_for
from tasks.stages.capture import Config as CaptureConfig
from tasks.stages.capture import run as run_capture

ALGORITHMS = ("rtn", "gptq", "awq", "quarot")
# Small enough for seconds per run; group_size 32 divides every width (64 and 160).
COMMON = {"group_size": 32, "eval_tokens": 256, "data": "prose"}
CALIBRATION = {"num_samples": 4, "seq_len": 64}  # only for the algorithms that calibrate
LINEARS = 7 * 2  # q, k, v, o, gate, up, down in each of 2 layers
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# name: (algorithm, recipe keys, expected quantization_config, bound on the relative logit error)
OUTPUTS: dict[str, tuple[str, dict[str, Any], dict[str, Any], float]] = {
    "rtn": ("rtn", {}, {"quant_method": "gptq", "bits": 4, "sym": False}, 0.15),
    "gptq": ("gptq", {}, {"quant_method": "gptq", "bits": 4, "desc_act": False}, 0.15),
    "awq": ("awq", {}, {"quant_method": "awq", "bits": 4, "version": "gemm"}, 0.15),
    "awq-3bit": ("awq", {"bits": 3}, {"quant_method": "gptq", "bits": 3}, 0.25),
    "quarot": ("quarot", {}, {"quant_method": "gptq", "bits": 4, "desc_act": False}, 0.15),
}


def quantize(algorithm: str, src: Path, data_dir: Path, out: Path, **table: Any) -> dict[str, Any]:
    """Run one quantize step directly, with COMMON's keys (and CALIBRATION's where it
    calibrates; eval_tokens only with data) unless table overrides them."""
    spec = spec_for("quantize", algorithm)
    table = COMMON | table
    if algorithm != "rtn" and table.get("weight_quantizer", "gptq") == "gptq":
        table = CALIBRATION | table
    if not table["data"]:
        del table["eval_tokens"]
    config = parse_config(spec.config, table, "recipe.toml", f"quantize.{algorithm}")
    out.mkdir(parents=True)
    ctx = StepContext(task=f"quantize:{algorithm}", out=out, artifacts=out.parent, input=src,
                      data={"prose": data_dir})  # fmt: skip
    return spec.run(config, ctx)


def capture(src: Path, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True)
    ctx = StepContext(task="capture:int4", out=out, artifacts=out.parent, input=src)
    return run_capture(CaptureConfig(precision="int4"), ctx)


def tensor_names(folder: Path) -> set[str]:
    names: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names


def centered_logits(model: Any, ids: list[int]) -> torch.Tensor:
    """Logits minus their mean per position: softmax ignores the mean, so only this counts."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return logits - logits.mean(-1, keepdim=True)


def relative_error(model: Any, reference: Any, ids: list[int]) -> float:
    ref = centered_logits(reference, ids)
    return float((centered_logits(model, ids) - ref).norm() / ref.norm())


def float_model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A data step's output written by hand: train and held-out splits of tiny prose."""
    out = tmp_path_factory.mktemp("data") / "prose"
    out.mkdir()
    paragraphs = tiny_text(120).split("\n\n")
    for split, part in (("train", paragraphs[:90]), ("heldout", paragraphs[90:])):
        lines = [json.dumps({"text": p.strip()}) for p in part]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def built(tiny_model, data_dir, tmp_path_factory) -> Callable[[str], tuple[Path, dict[str, Any]]]:
    """OUTPUTS[name] quantized once per module: (folder, metrics)."""
    root = tmp_path_factory.mktemp("quantize-hf")
    done: dict[str, tuple[Path, dict[str, Any]]] = {}

    def get(name: str) -> tuple[Path, dict[str, Any]]:
        if name not in done:
            algorithm, table, _, _ = OUTPUTS[name]
            out = root / name
            done[name] = out, quantize(algorithm, tiny_model, data_dir, out, **table)
        return done[name]

    return get


@pytest.fixture(scope="module")
def tiny_float(tiny_model) -> Any:
    torch.set_num_threads(1)
    return float_model(tiny_model)


@pytest.fixture(scope="module")
def tied_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with its LM head tied to the embedding (no lm_head.weight stored)."""
    out = tmp_path_factory.mktemp("tied") / "model"
    shutil.copytree(tiny_model, out)
    tensors = load_file(out / "model.safetensors")
    tensors["model.embed_tokens.weight"] = tensors.pop("lm_head.weight")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    return out


# --- output folders -----------------------------------------------------------------------


@pytest.mark.parametrize("name", OUTPUTS)
def test_output_folder(name, built, tiny_model, tiny_float):
    out, metrics = built(name)
    _, _, expected, bound = OUTPUTS[name]
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant | expected == quant, quant
    assert quant["group_size"] == 32
    if quant["quant_method"] == "awq":
        assert quant["zero_point"] is True  # awq's default sym = false
    else:
        assert quant["checkpoint_format"] == "gptq" and quant["lm_head"] is False
    for file in TOKENIZER_FILES:
        assert (out / file).read_bytes() == (tiny_model / file).read_bytes()
    # Every decoder linear packed, nothing left of its float weight; the LM head in float.
    names = tensor_names(out)
    assert sum(n.endswith(".qweight") for n in names) == LINEARS == metrics["quantized_linears"]
    assert not any(n.endswith("_proj.weight") for n in names)
    assert "lm_head.weight" in names
    model = load_dequantized(out)
    ids = prompt_ids(out)
    assert relative_error(model, tiny_float, ids) < bound
    assert metrics["device"] == "cpu"
    assert metrics["layout"] == ("awq" if quant["quant_method"] == "awq" else "gptq")
    assert len(metrics["seconds_per_layer"]) == 2
    assert all(s > 0 for s in metrics["seconds_per_layer"])
    assert metrics.get("peak_rss_bytes", metrics.get("process_peak_rss_bytes", 0)) > 0
    assert metrics["tokens_scored"] == 256
    assert 1 < metrics["perplexity"] < 2 * 320  # a random model: about the vocabulary size


def test_gptq_beats_rtn(built, tiny_float):
    """The same bits and groups: GPTQ's error correction must show, even on random weights."""
    ids = prompt_ids(built("rtn")[0])
    errors = {
        n: relative_error(load_dequantized(built(n)[0]), tiny_float, ids) for n in ("rtn", "gptq")
    }
    assert errors["gptq"] < errors["rtn"], errors


# --- through capture ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gptq", "awq"])
def test_capture_converts_exactly(name, built, tmp_path):
    out, _ = built(name)
    metrics = capture(out, tmp_path / "onnx")
    # capture compares its ONNX logits with load_dequantized's PyTorch model.
    assert metrics["max_abs_logit_diff"] < 1e-3, metrics
    assert metrics["top1_agreement"] == 1.0
    counts = op_counts(tmp_path / "onnx" / "model.onnx")
    assert counts.get("MatMulNBits", 0) > 0
    assert counts.get("MatMul") == 1  # the float LM head


def test_capture_refuses_3_bits(built, tmp_path):
    out, _ = built("awq-3bit")
    with pytest.raises(StageError, match=r"bits = 3.*takes 2, 4, 8 bits"):
        capture(out, tmp_path / "onnx")


# --- QuaRot -------------------------------------------------------------------------------


def test_quarot_unties_and_8_bits_stay_close(tied_model, data_dir, tmp_path):
    out = tmp_path / "quarot8"
    metrics = quantize("quarot", tied_model, data_dir, out, bits=8)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= tensor_names(out)
    # The rotation is exact, so what is left is 8-bit rounding: small.
    reference = float_model(tied_model)
    assert relative_error(load_dequantized(out), reference, prompt_ids(out)) < 0.01
    ctx = StepContext(task="evaluate:float", out=tmp_path, artifacts=tmp_path)
    floor = heldout_perplexity(tied_model, data_dir, ctx, max_tokens=256)["perplexity"]
    assert metrics["perplexity"] == pytest.approx(floor, rel=0.01)


def test_quarot_output_of_an_untied_model_is_untied(built):
    out, _ = built("quarot")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


# --- modules_to_not_convert ---------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_modules_to_not_convert_stay_float_and_capture_refuses_them(
    algorithm, tiny_model, data_dir, tmp_path
):
    out = tmp_path / algorithm
    keep = ["lm_head", "mlp.down_proj"]
    metrics = quantize(algorithm, tiny_model, data_dir, out, modules_to_not_convert=keep)
    assert metrics["quantized_linears"] == LINEARS - 2
    names = tensor_names(out)
    source = load_file(tiny_model / "model.safetensors")
    stored = load_file(out / "model.safetensors")
    for layer in range(2):
        down = f"model.layers.{layer}.mlp.down_proj"
        assert f"{down}.weight" in names and f"{down}.qweight" not in names
        # Kept as it was: AWQ's scales are folded into what produces an input, not into it.
        assert torch.equal(stored[f"{down}.weight"], source[f"{down}.weight"])
        assert f"model.layers.{layer}.mlp.up_proj.qweight" in names
    load_dequantized(out)
    # onnxruntime-genai's builder reads every decoder projection as packed: it would crash.
    with pytest.raises(
        StageError, match=r"(?s)model\.layers\.0\.mlp\.down_proj.*modules_to_not_convert"
    ):
        capture(out, tmp_path / "onnx")


def test_a_module_to_not_convert_must_match_a_linear(tiny_model, data_dir, tmp_path):
    with pytest.raises(
        StageError, match=r"(?s)'mlp.dwn_proj' matches no linear.*did you mean mlp.down_proj"
    ):
        quantize("rtn", tiny_model, data_dir, tmp_path / "q",
                 modules_to_not_convert=["lm_head", "mlp.dwn_proj"])  # fmt: skip


def test_gptq_keeps_its_sequential_order_without_the_float_linears():
    from tasks.quant.handlers import DOWN, GATE, KP, OP, QP, UP, VP, Gptq
    from tasks.quant.primitives import QuantSpec

    gptq = Gptq(QuantSpec(4, 32, False))
    assert gptq.groups([QP, KP, VP, OP, GATE, UP]) == [(QP, KP, VP), (OP,), (GATE, UP)]
    assert gptq.groups([QP, KP, VP, OP, GATE, UP, DOWN])[-1] == (DOWN,)


# --- bad parameters -----------------------------------------------------------------------


def recipe_error(algorithm: str, **table: Any) -> str:
    spec = spec_for("quantize", algorithm)
    with pytest.raises(RecipeError) as err:
        parse_config(spec.config, table, "recipe.toml", f"quantize.{algorithm}")
    return str(err.value)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_bits_5_lists_the_allowed_widths(algorithm):
    message = recipe_error(algorithm, bits=5, data="prose")
    assert "bits = 5" in message and "2 | 3 | 4 | 8" in message


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("group_size", [-1, 0, 48])
def test_group_size_must_be_a_power_of_two_from_16(algorithm, group_size):
    message = recipe_error(algorithm, group_size=group_size, data="prose")
    assert f"group_size = {group_size} is not a power of two >= 16" in message
    assert "that divides the model's layer widths" in message


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_group_size_that_does_not_divide_a_layer(algorithm, tiny_model, data_dir, tmp_path):
    with pytest.raises(StageError) as err:
        quantize(algorithm, tiny_model, data_dir, tmp_path / "q", group_size=128)
    message = str(err.value)
    assert "group_size 128 does not divide hidden_size" in message and "= 64" in message
    assert "use group_size = 16 or 32" in message  # 64 does not divide intermediate_size 160
    assert not any(tmp_path.joinpath("q").iterdir())  # refused before anything was written


@pytest.mark.parametrize("algorithm", ["gptq", "awq", "quarot"])
def test_calibrated_algorithms_need_data(algorithm):
    assert "needs calibration data" in recipe_error(algorithm)


def test_rtn_and_quarot_with_rtn_need_no_data(tiny_model, data_dir, tmp_path):
    for algorithm, table in (("rtn", {}), ("quarot", {"weight_quantizer": "rtn"})):
        metrics = quantize(algorithm, tiny_model, data_dir, tmp_path / algorithm, data="", **table)
        assert "perplexity" not in metrics  # nothing to score it on


@pytest.mark.parametrize("algorithm", ["gptq", "quarot"])
def test_act_order_asymmetric_without_static_groups(algorithm):
    message = recipe_error(algorithm, data="prose", act_order=True, sym=False, static_groups=False)
    assert "act_order" in message and "static_groups = true" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(tiny_model, data_dir, tmp_path):
    with pytest.raises(StageError, match='device = "cuda" but torch sees no GPU'):
        quantize("gptq", tiny_model, data_dir, tmp_path / "q", device="cuda")


def test_awq_from_an_onnx_step_fails_at_load(tmp_path, tiny_model, prose_file):
    ws = Workspace(tmp_path)
    extra = '\n[quantize.awq]\nfrom = "capture.fp32"\ndata = "prose"\n'
    ws.write(tiny_recipe(tiny_model, prose_file, extra=extra))
    proc = ws.doit("list", check=False)
    assert proc.returncode != 0
    assert "[quantize.awq] takes a Hugging Face model" in proc.stderr, proc.stderr
    assert "from = 'capture.fp32' gives an ONNX model" in proc.stderr
    assert 'set from = "model"' in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("quantize_keys", "capture_keys", "message", "fix"),
    [
        ("bits = 3", 'precision = "int4"', "is a 3-bit checkpoint", "set bits = 4 in [quantize.q]"),
        ("", 'precision = "fp32"', 'with precision = "int4"', 'set precision = "int4"'),
        ('modules_to_not_convert = ["lm_head", "down_proj"]', 'precision = "int4"',
         "keeps decoder linears in float", 'set modules_to_not_convert = ["lm_head"]'),
    ],
    ids=["3 bits", "not int4", "float decoder linear"],
)  # fmt: skip
def test_a_capture_the_builder_would_refuse_fails_at_load(
    tmp_path, tiny_model, prose_file, quantize_keys, capture_keys, message, fix
):
    """Refused when the recipe loads, not after the quantize step has run for minutes."""
    from tasks.recipe import load_recipe

    extra = f'\n[quantize.q]\nalgorithm = "rtn"\ngroup_size = 32\n{quantize_keys}\n'
    extra += f'\n[capture.q]\nfrom = "quantize.q"\n{capture_keys}\n'
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(tiny_recipe(tiny_model, prose_file, extra=extra))
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    assert "[capture.q]" in str(err.value) and message in str(err.value)
    assert f"fix: {fix}" in str(err.value)


# --- GPU ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gptq_on_cuda_matches_the_cpu(built, tiny_model, data_dir, tmp_path):
    _, cpu = built("gptq")
    metrics = quantize("gptq", tiny_model, data_dir, tmp_path / "cuda", device="cuda")
    assert metrics["device"] == "cuda" and metrics["peak_cuda_bytes"] > 0
    assert metrics["perplexity"] == pytest.approx(cpu["perplexity"], rel=0.01)
