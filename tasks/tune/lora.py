"""Load a base model for LoRA training and attach the adapter.

A GPTQ/AWQ/RTN/QuaRot checkpoint is loaded de-quantized, W = (q - z) * s: exactly the weights
its int4 ONNX form computes with, so the adapter learns to correct the model that ships, not
the float model it came from. `qlora` on a float base quantizes it to bitsandbytes NF4 on load.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.errors import PreflightError, StageError

if TYPE_CHECKING:
    import torch

# Decoder projections LoRA targets by default: every linear of every layer (not the LM head).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_base(hf_dir: Path, method: str, device: torch.device) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.quant.checkpoint import is_quantized, load_dequantized

    if is_quantized(hf_dir):
        if method == "qlora":
            raise StageError(
                f"{hf_dir} is already quantized; qlora would quantize it again to NF4",
                'use method = "lora": its adapter trains against these quantized weights',
            )
        return load_dequantized(hf_dir, dtype=torch.float32).to(device)
    if method == "lora":
        return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise PreflightError(
            "qlora needs bitsandbytes: pip install 'modelkiln[finetune]'"
        ) from None
    from transformers import BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, quantization_config=nf4, device_map={"": device}
    )
    keep_4bit_trainable(model)
    return model


def keep_4bit_trainable(model: Any) -> int:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, `Linear4bit` repacks its weight in place on the first eval /
    no-grad forward, and from then on its matmul has no backward: the gradients of every LoRA
    layer before it silently vanish (only a UserWarning about gemv_4bit). Our training
    evaluates held-out loss between steps, so the repack is switched off on every layer."""
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def attach_lora(model: Any, r: int, alpha: int, dropout: float, targets: tuple[str, ...]) -> Any:
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)} - {"lm_head"}
        )
        raise StageError(
            f"target_modules names {missing}, which the model does not have",
            f"use some of its linear layers: {linear}",
        )
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
        task_type="CAUSAL_LM", bias="none",
    )  # fmt: skip
    return get_peft_model(model, config)


def _is_linear(module: Any) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Linear4bit"


def lora_layers(model: Any) -> dict[str, list[Any]]:
    """Module name -> its trainable LoRA parameters (A and B)."""
    layers: dict[str, list[Any]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad and ".lora_" in name:
            layers.setdefault(name.split(".lora_")[0], []).append(param)
    return layers


def layers_without_gradient(model: Any) -> list[str]:
    """LoRA layers none of whose parameters got a non-zero, finite gradient. After the first
    backward only B has one (B starts at zero, so A's gradient is zero), which suffices."""
    import torch

    dead = []
    for name, params in lora_layers(model).items():
        grads = [p.grad for p in params if p.grad is not None]
        if not any(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads):
            dead.append(name)
    return dead
