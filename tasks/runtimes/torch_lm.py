"""PyTorch models on this machine: the device to use, a folder's causal LM in fp32 (a GPTQ/AWQ
checkpoint dequantized), a fine-tune's PEFT model on its base, and their logits."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.errors import StageError

if TYPE_CHECKING:
    import numpy as np
    import torch


def pick_device(choice: str) -> torch.device:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise StageError('device = "cuda" but torch sees no GPU', 'use device = "auto" or "cpu"')
    cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


def load_causal_lm(hf_dir: Path) -> Any:
    """The folder's causal LM in fp32 on the CPU, in eval mode. A GPTQ/AWQ checkpoint is
    dequantized ((q - z) * s, what its ONNX conversion computes): transformers alone cannot
    load one without gptqmodel, whose CPU kernels run in bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.quant.checkpoint import is_quantized, load_dequantized

    if is_quantized(hf_dir):
        return load_dequantized(hf_dir, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def torch_logits(hf_dir: Path, input_ids: list[int]) -> np.ndarray:
    """Logits [seq, vocab] of the Hugging Face model in fp32 on the CPU."""
    import torch

    model = load_causal_lm(hf_dir)
    with torch.no_grad():
        logits = model(torch.tensor([input_ids])).logits[0]
    return logits.float().numpy()


def load_peft_model(hf_base: Path, adapter_dir: Path) -> Any:
    """The base (a quantized one de-quantized, as it was trained) with the adapter, fp32, eval."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_causal_lm(hf_base), str(adapter_dir)).eval()


def torch_logits_of(model: Any, ids: list[int], adapter: bool = True) -> Any:
    """Logits [seq, vocab] as float32 numpy; adapter=False: the base alone."""
    import contextlib

    import torch

    off = contextlib.nullcontext() if adapter else model.disable_adapter()
    with torch.no_grad(), off:
        return model(torch.tensor([ids])).logits[0].float().numpy()
