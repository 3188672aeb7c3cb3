"""A fine-tune's PEFT model in PyTorch: the reference its ONNX form is checked against and the
model `evaluate` scores for a finetune step."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_peft_model(hf_base: Path, adapter_dir: Path) -> Any:
    """The base (a quantized one de-quantized, as it was trained) with the adapter, fp32, eval."""
    from peft import PeftModel

    from tasks.stages.onnx_run import load_causal_lm

    return PeftModel.from_pretrained(load_causal_lm(hf_base), str(adapter_dir)).eval()


def torch_logits_of(model: Any, ids: list[int], adapter: bool = True) -> Any:
    """Logits [seq, vocab] as float32 numpy; adapter=False: the base alone."""
    import contextlib

    import torch

    off = contextlib.nullcontext() if adapter else model.disable_adapter()
    with torch.no_grad(), off:
        return model(torch.tensor([ids])).logits[0].float().numpy()
