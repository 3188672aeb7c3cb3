"""GPTQ/AWQ checkpoints on the tiny model: written, read back dequantized, refused where they
would not convert exactly, and converted exactly by onnxruntime-genai's builder (capture)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tasks.quant.checkpoint import is_quantized, load_dequantized, write_quantized
from tasks.quant.pack import pack_awq, pack_gptq, unpack_awq, unpack_gptq
from tasks.quant.primitives import QuantizedLinear, QuantSpec, rtn_quantize
from tasks.runtimes.onnx import prompt_ids

SIDECARS = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


@pytest.fixture(scope="module")
def tiny(tiny_model: Path) -> Any:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def act_order_rtn(w: torch.Tensor, spec: QuantSpec, seed: int) -> QuantizedLinear:
    """RTN in a random column order, as GPTQ's act-order does: groups of permuted columns."""
    perm = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(seed))
    q = rtn_quantize(w[:, perm], spec)
    inverse = torch.argsort(perm)
    return QuantizedLinear(q.codes[:, inverse], q.scales, q.zeros, q.g_idx[inverse], spec)


def quantize_tiny(model: Any, spec: QuantSpec, act_order: bool = False, zero_edges: bool = False):
    """(float tensors, quantized linears): every decoder Linear quantized with RTN."""
    quantized = {}
    for i, (name, module) in enumerate(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            w = module.weight.detach()
            q = act_order_rtn(w, spec, i) if act_order else rtn_quantize(w, spec)
            if zero_edges:  # zero points at both ends of the range, 0 stored as -1 by GPTQ v1
                q.zeros[:, ::7] = 0
                q.zeros[:, 1::7] = spec.maxq
            quantized[name] = q
    weights = {f"{name}.weight" for name in quantized}
    floats = {k: v for k, v in model.state_dict().items() if k not in weights}
    return floats, quantized


def write(out: Path, model: Any, tiny_model: Path, layout: str, spec: QuantSpec, **kw) -> Path:
    floats, quantized = quantize_tiny(model, spec, **kw)
    write_quantized(out, model.config.to_dict(), floats, dict(quantized), layout, spec)
    for name in SIDECARS:
        shutil.copy(tiny_model / name, out / name)
    return out


def as_stored(model: Any, quantized: dict[str, QuantizedLinear], layout: str) -> Any:
    """A copy of the model whose Linears hold the weights a reader of the layout sees."""
    ref = copy.deepcopy(model)
    for name, q in quantized.items():
        if layout == "gptq":
            back = unpack_gptq(pack_gptq(q), q.spec.bits, q.spec.group_size)
        else:
            back = unpack_awq(pack_awq(q), q.spec.group_size)
        ref.get_submodule(name).weight.data = back.dequantize()
    return ref


def logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize(
    ("layout", "spec"),
    [
        ("gptq", QuantSpec(4, 32, False)),
        ("gptq", QuantSpec(3, 32, True)),
        ("awq", QuantSpec(4, 16, True)),
    ],
)
def test_load_dequantized_is_the_stored_weights(tiny, tiny_model, tmp_path, layout, spec):
    floats, quantized = quantize_tiny(tiny, spec)
    write_quantized(tmp_path, tiny.config.to_dict(), floats, dict(quantized), layout, spec)
    ids = prompt_ids(tiny_model)
    loaded = load_dequantized(tmp_path)
    assert "quantization_config" not in loaded.config.to_dict()
    want = logits(as_stored(tiny, quantized, layout), ids)
    assert torch.equal(logits(loaded, ids), want)
    assert not torch.equal(want, logits(tiny, ids))  # the weights are quantized


def test_sharded_checkpoint_has_an_index_and_loads(tiny, tiny_model, tmp_path):
    spec = QuantSpec(8, 32, True)
    floats, quantized = quantize_tiny(tiny, spec)
    write_quantized(
        tmp_path, tiny.config.to_dict(), floats, dict(quantized), "gptq", spec, shard_bytes=40_000
    )
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
    assert "model.layers.0.mlp.down_proj.qweight" in index["weight_map"]
    ids = prompt_ids(tiny_model)
    assert torch.equal(
        logits(load_dequantized(tmp_path), ids), logits(as_stored(tiny, quantized, "gptq"), ids)
    )


def test_quantization_config_is_the_standard_one(tiny, tmp_path):
    spec = QuantSpec(4, 32, True)
    floats, quantized = quantize_tiny(tiny, spec, act_order=True)
    extra = {"damp_percent": 0.05, "meta": {"quantizer": ["modelkiln"]}}
    write_quantized(tmp_path / "g", tiny.config.to_dict(), floats, quantized, "gptq", spec, extra)
    gptq = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert gptq["quant_method"] == "gptq" and gptq["checkpoint_format"] == "gptq"
    assert (gptq["bits"], gptq["group_size"], gptq["sym"], gptq["desc_act"]) == (4, 32, True, True)
    assert gptq["damp_percent"] == 0.05 and gptq["meta"] == extra["meta"]
    assert not gptq["static_groups"] and not gptq["lm_head"]

    spec = QuantSpec(4, 32, False)
    floats, quantized = quantize_tiny(tiny, spec)
    write_quantized(tmp_path / "a", tiny.config.to_dict(), floats, quantized, "awq", spec)
    awq = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert awq == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 32,
        "zero_point": True,
        "version": "gemm",
        "format": "gemm",
        "modules_to_not_convert": ["lm_head", "model.embed_tokens"],
    }
    assert is_quantized(tmp_path / "a") and is_quantized(tmp_path / "g")


def test_is_quantized_is_false_for_a_float_model(tiny_model, tmp_path):
    assert not is_quantized(tiny_model)
    assert not is_quantized(tmp_path)  # no config.json


@pytest.mark.parametrize(
    ("layout", "spec", "act_order", "extra", "message"),
    [
        ("gptq", QuantSpec(4, 32, False), True, {}, "asymmetric zero points converts to wrong"),
        ("gptq", QuantSpec(4, -1, True), False, {}, "power-of-two block size of at least 16"),
        ("gptq", QuantSpec(4, 8, True), False, {}, "group_size 8 does not convert"),
        ("awq", QuantSpec(8, 32, False), False, {}, "4-bit weights only"),
        ("awq", QuantSpec(4, 32, True), True, {}, "act-order .* needs the gptq layout"),
        ("gptq", QuantSpec(4, 32, True), False, {"bits": 8}, r"extra_config sets \['bits'\]"),
        ("exl2", QuantSpec(4, 32, True), False, {}, "is not one of"),
    ],
)
def test_refusals(tiny, tmp_path, layout, spec, act_order, extra, message):
    floats, quantized = quantize_tiny(tiny, spec, act_order=act_order)
    with pytest.raises(ValueError, match=message):
        write_quantized(tmp_path, {}, floats, quantized, layout, spec, extra)
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_one_spec_for_every_layer(tiny, tmp_path):
    floats, quantized = quantize_tiny(tiny, QuantSpec(4, 32, True))
    with pytest.raises(ValueError, match="one spec for all"):
        write_quantized(tmp_path, {}, floats, quantized, "gptq", QuantSpec(4, 64, True))


def test_hf_runner_reads_a_quantized_checkpoint(tiny, tiny_model, tmp_path):
    """transformers alone cannot load GPTQ without gptqmodel: evaluate dequantizes."""
    from tasks.runtimes.runners import HfRunner

    out = write(tmp_path / "q", tiny, tiny_model, "gptq", QuantSpec(4, 32, True))
    ids = prompt_ids(tiny_model)
    assert torch.equal(
        torch.from_numpy(HfRunner(out).logits(ids)), logits(load_dequantized(out), ids)
    )


def test_capture_refuses_3_bits_before_building(tiny, tiny_model, tmp_path):
    from tasks.errors import StageError
    from tasks.stages import StepContext
    from tasks.stages.capture import Config, run

    hf = write(tmp_path / "hf", tiny, tiny_model, "gptq", QuantSpec(3, 32, False))
    ctx = StepContext(task="capture:test", out=tmp_path / "onnx", artifacts=tmp_path, input=hf)
    with pytest.raises(StageError, match="MatMulNBits takes 2, 4, 8 bits"):
        run(Config(precision="int4"), ctx)


# One capture (builder run) per case: its logits check compares ONNX with load_dequantized.
CONVERSIONS = {
    "gptq-4-sym": ("gptq", QuantSpec(4, 32, True), {}),
    "gptq-4-asym-zero-edges": ("gptq", QuantSpec(4, 32, False), {"zero_edges": True}),
    "gptq-8-asym": ("gptq", QuantSpec(8, 32, False), {}),
    "gptq-4-act-order-sym": ("gptq", QuantSpec(4, 32, True), {"act_order": True}),
    "gptq-2-asym": ("gptq", QuantSpec(2, 16, False), {}),
    "awq-4-asym": ("awq", QuantSpec(4, 32, False), {}),
}


@pytest.mark.parametrize("case", list(CONVERSIONS))
def test_builder_converts_exactly(tiny, tiny_model, tmp_path, case):
    import onnx

    from tasks.stages import StepContext
    from tasks.stages.capture import Config, run

    layout, spec, kw = CONVERSIONS[case]
    hf = write(tmp_path / "hf", tiny, tiny_model, layout, spec, **kw)
    out = tmp_path / "onnx"
    out.mkdir()
    ctx = StepContext(task="capture:test", out=out, artifacts=tmp_path, input=hf)
    metrics = run(Config(precision="int4"), ctx)
    assert metrics["max_abs_logit_diff"] < 1e-5, metrics
    assert metrics["top1_agreement"] == 1.0
    nodes = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
    nbits = [{a.name: a.i for a in n.attribute} for n in nodes if n.op_type == "MatMulNBits"]
    # Per layer 7 Linears, or 5 where the builder fuses q/k/v and gate/up (not with act-order).
    assert len(nbits) == (7 if kw.get("act_order") else 5) * 2
    assert all(
        (a["bits"], a["block_size"], a["accuracy_level"]) == (spec.bits, spec.group_size, 1)
        for a in nbits
    )
    assert [n.name for n in nodes if n.op_type == "MatMul"] == ["/lm_head/MatMul"]  # float
