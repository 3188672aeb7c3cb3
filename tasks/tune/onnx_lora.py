"""LoRA in an ONNX decoder: empty adapter slots in the graph, adapter files that fill them.

A slot is added beside every decoder projection the builder wrote (MatMul, or MatMulNBits for
int4): y = x W + (x A) B, with A [in, rank] and B [rank, out] graph inputs named as the
builder names its own LoRA weights (`model.layers.0.attn.qkv_proj.lora_A.MatMul.weight`). Each
input keeps an empty initializer of rank 0 under the same name, so the model runs unchanged
when no adapter is active, and any adapter of any rank fills the slots at run time. The base
therefore depends on the base model only, and every adapter trained on it shares it.

The builder packs q/k/v into one `qkv_proj` (and sometimes gate/up into `gate_up_proj`); an
adapter's separate q, k and v LoRA pairs become one pair for the packed slot: A side by side,
B block-diagonal, so x A B = [x A_q B_q, x A_k B_k, x A_v B_v].
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.errors import StageError

if TYPE_CHECKING:
    import numpy as np

ADAPTER_FILE = "adapter.onnx_adapter"
PROJECTION_NODE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+_proj)/(MatMul|MatMulNBits)$")
# A packed slot's parts, in output order: the Hugging Face module names it stands for.
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
HF_BLOCK = {"attn": "self_attn", "mlp": "mlp"}


@dataclass(frozen=True)
class Slot:
    layer: int
    block: str  # "attn" or "mlp", as the builder names it
    proj: str  # "qkv_proj", "o_proj", ...
    in_features: int
    out_features: int

    @property
    def prefix(self) -> str:
        return f"model.layers.{self.layer}.{self.block}.{self.proj}"

    @property
    def a_name(self) -> str:
        return f"{self.prefix}.lora_A.MatMul.weight"

    @property
    def b_name(self) -> str:
        return f"{self.prefix}.lora_B.MatMul.weight"

    def hf_modules(self) -> list[str]:
        """The Hugging Face modules ('model.layers.0.self_attn.q_proj') this slot stands for."""
        parts = PACKED.get(self.proj, (self.proj,))
        return [f"model.layers.{self.layer}.{HF_BLOCK[self.block]}.{p}" for p in parts]


def _dims(node: Any, initializers: dict[str, Any]) -> tuple[int, int]:
    if node.op_type == "MatMulNBits":
        attrs = {a.name: a.i for a in node.attribute}
        return attrs["K"], attrs["N"]
    weight = initializers.get(node.input[1])
    if weight is None:
        raise StageError(f"{node.name}: its weight {node.input[1]!r} is not an initializer")
    return int(weight.dims[0]), int(weight.dims[1])


def add_lora_slots(model_path: Path) -> list[Slot]:
    """Rewrite the model file with an empty LoRA slot beside every decoder projection. Weights
    in external data stay where they are: only the graph is rewritten."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    io_type = next(o.type.tensor_type.elem_type for o in graph.output if o.name == "logits")
    slots, nodes = [], []
    for node in graph.node:
        nodes.append(node)
        match = PROJECTION_NODE.match(node.name)
        if not match:
            continue
        in_features, out_features = _dims(node, initializers)
        slot = Slot(int(match[1]), match[2], match[3], in_features, out_features)
        slots.append(slot)
        y = node.output[0]
        base_out = f"{y}/base"
        node.output[0] = base_out
        root = f"/model/layers.{slot.layer}/{slot.block}/{slot.proj}"
        a_out, b_out = f"{root}/lora_A/MatMul/output_0", f"{root}/lora_B/MatMul/output_0"
        nodes += [
            helper.make_node(
                "MatMul", [node.input[0], slot.a_name], [a_out], f"{root}/lora_A/MatMul"
            ),
            helper.make_node("MatMul", [a_out, slot.b_name], [b_out], f"{root}/lora_B/MatMul"),
            helper.make_node("Add", [base_out, b_out], [y], f"{root}/lora/Add"),
        ]
        for name, shape, empty in (
            (slot.a_name, [in_features, "lora_rank"], [in_features, 0]),
            (slot.b_name, ["lora_rank", out_features], [0, out_features]),
        ):
            graph.input.append(helper.make_tensor_value_info(name, io_type, shape))
            graph.initializer.append(helper.make_tensor(name, io_type, empty, []))
    if not slots:
        raise StageError(
            f"{model_path}: no decoder projection named like /model/layers.N/attn/q_proj/MatMul: "
            "this graph is not one onnxruntime-genai's builder wrote"
        )
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(model_path))
    return slots


def read_slots(model_path: Path) -> list[Slot]:
    """The LoRA slots of a model file written by add_lora_slots."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    shapes = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value or d.dim_param for d in dims]
    slots = []
    for name, shape in shapes.items():
        match = re.match(
            r"^model\.layers\.(\d+)\.(attn|mlp)\.(\w+_proj)\.lora_A\.MatMul\.weight$", name
        )
        if match:
            b_shape = shapes[name.replace("lora_A", "lora_B")]
            slots.append(Slot(int(match[1]), match[2], match[3], int(shape[0]), int(b_shape[1])))
    return slots


def packed_widths(hf_config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Output width of each part of a packed slot, from the Hugging Face config."""
    heads = hf_config["num_attention_heads"]
    head_size = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    kv = (hf_config.get("num_key_value_heads") or heads) * head_size
    inter = hf_config.get("intermediate_size", 0)
    return {"qkv_proj": (heads * head_size, kv, kv), "gate_up_proj": (inter, inter)}


def adapter_tensors(
    lora: dict[str, tuple[np.ndarray, np.ndarray]],
    slots: list[Slot],
    widths: dict[str, tuple[int, ...]],
    dtype: Any,
) -> dict[str, np.ndarray]:
    """ONNX slot inputs from LoRA pairs: module name -> (A [r, in], B [out, r] with the scaling
    already applied). A part of a packed slot the adapter does not train gets no rank."""
    import numpy as np

    tensors: dict[str, np.ndarray] = {}
    used = set()
    for slot in slots:
        parts = slot.hf_modules()
        if not any(m in lora for m in parts):
            continue
        part_widths = widths.get(slot.proj, (slot.out_features,))
        if len(part_widths) != len(parts) or sum(part_widths) != slot.out_features:
            raise StageError(
                f"{slot.prefix}: its {slot.out_features} outputs do not split into "
                f"{'/'.join(parts)} as the model's config says ({part_widths})"
            )
        a_cols, b_blocks, offset = [], [], 0
        for module, width in zip(parts, part_widths, strict=True):
            if module in lora:
                a, b = lora[module]
                used.add(module)
                block = np.zeros((a.shape[0], slot.out_features), dtype=np.float32)
                block[:, offset : offset + width] = b.T
                a_cols.append(a.T)
                b_blocks.append(block)
            offset += width
        tensors[slot.a_name] = np.concatenate(a_cols, axis=1).astype(dtype)
        tensors[slot.b_name] = np.concatenate(b_blocks, axis=0).astype(dtype)
    unplaced = sorted(set(lora) - used)
    if unplaced:
        raise StageError(
            f"the ONNX base has no LoRA slot for {len(unplaced)} adapted modules "
            f"({', '.join(unplaced[:3])}{', ...' if len(unplaced) > 3 else ''})",
            "adapt only decoder projections (q/k/v/o_proj, gate/up/down_proj) in target_modules",
        )
    return tensors


def peft_pairs(adapter_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Module name -> (A [r, in], B [out, r] times alpha / r) from a PEFT LoRA adapter."""
    import json
    import math

    from safetensors.numpy import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise StageError("per-module ranks (rank_pattern/alpha_pattern) are not supported yet")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_A.weight"):
            continue
        module = name.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        b = tensors[name.replace(".lora_A.", ".lora_B.")]
        pairs[module] = (a, b * scaling)
    return pairs
