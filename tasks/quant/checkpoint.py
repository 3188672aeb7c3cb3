"""Quantized Hugging Face checkpoints on disk: write GPTQ/AWQ folders, read them back dequantized.

`write_quantized` writes what transformers + GPTQModel and onnxruntime-genai's model builder
read: safetensors with `<linear>.qweight/.qzeros/.scales(/.g_idx)` beside the float tensors, and
a config.json with a standard `quantization_config`. It refuses what the builder would not
convert exactly (see docs: BACKENDS.md). `load_dequantized` reads such a folder on a CPU
without gptqmodel or optimum: every packed Linear gets the float weight (q - z) * s, with the
fp16 scales as stored, i.e. the numbers an ONNX conversion computes with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from tasks.quant.pack import pack_awq, pack_gptq, trivial_g_idx, unpack_awq, unpack_gptq
from tasks.quant.primitives import QuantizedLinear, QuantSpec

__all__ = [
    "SHARD_BYTES",
    "is_quantized",
    "load_dequantized",
    "quantization_config",
    "write_quantized",
]

Layout = Literal["gptq", "awq"]
LAYOUTS = ("gptq", "awq")
SHARD_BYTES = 2 * 1024**3
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Where the model was read from (transformers' to_dict keeps it; its save_pretrained drops
# it): an absolute path would make the same checkpoint's bytes depend on where it was built.
LOCATION_KEYS = ("_name_or_path",)
# Written from the tensors and the spec: extra_config may not contradict them.
DERIVED_KEYS = {
    "quant_method", "bits", "group_size", "sym", "desc_act", "zero_point",
    "checkpoint_format", "format", "version",
}  # fmt: skip
# GPTQConfig's defaults in transformers, for the keys a GPTQ run sets (extra_config overrides).
GPTQ_DEFAULTS = {"damp_percent": 0.1, "true_sequential": True, "static_groups": False}


@dataclass
class Packed:
    """A linear already packed in a layout, its codes dropped: what the writer needs. The
    layer-streaming runner packs each layer as soon as it is quantized, so the whole model's
    codes are never held at once."""

    tensors: dict[str, torch.Tensor]
    spec: QuantSpec
    permuted: bool  # g_idx is not i // group_size: act-order (desc_act)


def pack_linear(q: QuantizedLinear | Packed, layout: Layout) -> Packed:
    if isinstance(q, Packed):
        return q
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    trivial = trivial_g_idx(q.codes.shape[1], q.spec.group_size)
    permuted = not torch.equal(q.g_idx.to(torch.int32).cpu(), trivial)
    if permuted and layout == "awq":
        raise ValueError(
            "the AWQ layout has no g_idx: act-order (a permuted g_idx) needs the gptq layout"
        )
    pack = pack_gptq if layout == "gptq" else pack_awq
    return Packed(pack(q), q.spec, permuted)


def check_layout(layout: str, spec: QuantSpec) -> None:
    """Refuse a layout and spec that do not convert exactly, before anything is packed."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    if layout == "awq" and spec.bits != 4:
        raise ValueError(
            f"the AWQ (GEMM) layout holds 4-bit weights only, not {spec.bits}: "
            "use bits = 4 or the gptq layout"
        )
    g = spec.group_size
    if g < 16 or g & (g - 1):
        raise ValueError(
            f"group_size {g} does not convert: onnxruntime's MatMulNBits needs a power-of-two "
            "block size of at least 16 (per-channel -1 builds but fails to load); use 32, 64 or 128"
        )


def check_writable(packed: dict[str, Packed], layout: str, spec: QuantSpec) -> bool:
    """Refuse what does not convert exactly; return desc_act."""
    check_layout(layout, spec)
    for name, p in packed.items():
        if p.spec != spec:
            raise ValueError(
                f"{name} is quantized with {p.spec}, the checkpoint with {spec}: one spec for all"
            )
    desc_act = any(p.permuted for p in packed.values())
    if desc_act and not spec.sym:
        raise ValueError(
            "act-order (desc_act) with asymmetric zero points converts to wrong logits: "
            "onnxruntime's MatMulNBits ignores zero points when it has a g_idx; "
            "use sym = true or no act-order"
        )
    return desc_act


def quantization_config(
    layout: Layout,
    spec: QuantSpec,
    desc_act: bool,
    float_modules: list[str],
    extra_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The config.json `quantization_config` GPTQModel/transformers write for this layout."""
    extra = dict(extra_config or {})
    clash = sorted(DERIVED_KEYS & extra.keys())
    if clash:
        raise ValueError(
            f"extra_config sets {clash}, which the checkpoint's layout and spec decide"
        )
    if layout == "gptq":
        base = {
            "quant_method": "gptq",
            "bits": spec.bits,
            "group_size": spec.group_size,
            "desc_act": desc_act,
            "sym": spec.sym,
            "lm_head": False,
            # v1: zeros stored minus one. The builder applies the +1 whatever this says.
            "checkpoint_format": "gptq",
            "format": "gptq",
            "pack_dtype": "int32",
            **GPTQ_DEFAULTS,
        }
    else:
        base = {
            "quant_method": "awq",
            "bits": 4,
            "group_size": spec.group_size,
            "zero_point": not spec.sym,
            "version": "gemm",
            "format": "gemm",
            "modules_to_not_convert": float_modules,
        }
    return base | extra


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written tensor by tensor. safetensors' own save_file first copies
    every tensor into Python bytes, which would double the peak memory of a model's save."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for name in sorted(tensors):
            t = tensors[name].detach().contiguous().cpu()
            if t.numel():
                fh.write(t.reshape(-1).view(torch.uint8).numpy().data)


def save_tensors(
    out_dir: Path, tensors: dict[str, torch.Tensor], shard_bytes: int = SHARD_BYTES
) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards and their index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
        total += nbytes
    if len(shards) == 1:
        write_safetensors(out_dir / WEIGHTS, shards[0])
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out_dir / file, shard)
        weight_map |= dict.fromkeys(shard, file)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_quantized(
    out_dir: Path,
    config: dict[str, Any],
    float_tensors: dict[str, torch.Tensor],
    quantized: dict[str, QuantizedLinear | Packed],
    layout: Layout,
    spec: QuantSpec,
    extra_config: dict[str, Any] | None = None,
    *,
    shard_bytes: int = SHARD_BYTES,
) -> None:
    """Write a GPTQ (v1) or AWQ (GEMM) checkpoint: config.json and safetensors.

    `config`: the model's config dict; `float_tensors`: every tensor kept as is (embeddings,
    norms, lm_head, biases); `quantized`: Linear name ("model.layers.0.self_attn.q_proj") ->
    its codes or its `Packed` tensors (the dict is emptied as they are packed). Refuses (ValueError) combinations that
    do not convert exactly."""
    check_layout(layout, spec)
    # Pack (and drop the codes) one linear at a time; the runner usually packed them already.
    packed = {name: pack_linear(quantized.pop(name), layout) for name in list(quantized)}
    desc_act = check_writable(packed, layout, spec)
    # Float 2-D weights (embeddings, lm_head): loaders must leave them alone.
    float_modules = sorted(
        n.removesuffix(".weight")
        for n, t in float_tensors.items()
        if n.endswith(".weight") and t.dim() == 2
    )
    quant = quantization_config(layout, spec, desc_act, float_modules, extra_config)
    tensors = dict(float_tensors)
    for name, p in packed.items():
        if f"{name}.weight" in float_tensors:
            raise ValueError(f"{name}.weight is both a float tensor and quantized")
        tensors |= {f"{name}.{suffix}": t for suffix, t in p.tensors.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(out_dir, tensors, shard_bytes)
    config = {k: v for k, v in config.items() if k not in LOCATION_KEYS}
    config["quantization_config"] = quant
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_quantization_config(model_dir: Path) -> dict[str, Any] | None:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    quant = json.loads(path.read_text()).get("quantization_config")
    return quant if isinstance(quant, dict) else None


def is_quantized(model_dir: Path) -> bool:
    """Whether the folder is a GPTQ or AWQ checkpoint (config.json's quantization_config)."""
    quant = read_quantization_config(model_dir)
    return quant is not None and quant.get("quant_method") in LAYOUTS


def read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors file or shards."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors |= load_file(file)
    return tensors


def dequantize_packed(
    tensors: dict[str, torch.Tensor], quant: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Replace every packed Linear's tensors in `tensors` by its float `<name>.weight`."""
    method, bits, group_size = quant["quant_method"], quant["bits"], quant["group_size"]
    gptq = method == "gptq"
    # What write_quantized writes: no per-layer overrides, no v2 zero convention.
    if gptq and (quant.get("dynamic") or quant.get("checkpoint_format", "gptq") != "gptq"):
        raise ValueError("only GPTQ v1 checkpoints without per-layer `dynamic` overrides are read")
    suffixes = ("qweight", "qzeros", "scales") + (("g_idx",) if gptq else ())
    for name in [k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")]:
        parts = {s: tensors.pop(f"{name}.{s}") for s in suffixes}
        q = unpack_gptq(parts, bits, group_size) if gptq else unpack_awq(parts, group_size)
        tensors[f"{name}.weight"] = q.dequantize()
    return tensors


def load_dequantized(model_dir: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The folder's causal LM with every GPTQ/AWQ Linear dequantized into a float weight."""
    from transformers import AutoConfig, AutoModelForCausalLM

    quant = read_quantization_config(model_dir)
    if quant is None or quant.get("quant_method") not in LAYOUTS:
        raise ValueError(f"{model_dir}/config.json has no gptq or awq quantization_config")
    config = AutoConfig.from_pretrained(model_dir)
    del config.quantization_config  # else the model would expect quantized layers
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = dequantize_packed(read_tensors(model_dir), quant)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = sorted(set(missing) - set(getattr(model, "all_tied_weights_keys", None) or {}))
    if missing or unexpected:
        raise ValueError(
            f"{model_dir}: its tensors do not fit {type(model).__name__}: "
            f"missing {missing}, unexpected {sorted(unexpected)}"
        )
    model.tie_weights()
    return model.eval()
