"""Calibration windows: the token sequences every calibrating quantizer (Hugging Face or ONNX)
reads from a data set's train split, chosen one way for all of them."""

from __future__ import annotations

from tasks.errors import StageError


def calibration_windows(ids: list[int], num_samples: int, seq_len: int) -> list[list[int]]:
    """num_samples windows of seq_len tokens, evenly spread over ids from its start to its end.
    Too few tokens for that many disjoint windows is an error, never fewer windows."""
    if len(ids) < num_samples * seq_len:
        raise StageError(
            f"calibration needs {num_samples} x {seq_len} tokens but the train split has "
            f"{len(ids)}",
            "lower num_samples or seq_len, or use a larger data set",
        )
    import torch

    # torch's float32 linspace, truncated: the starts the Hugging Face quantizers have always
    # used, so their outputs (and keys) stay as they were.
    starts = torch.linspace(0, len(ids) - seq_len, num_samples).long().tolist()
    return [ids[s : s + seq_len] for s in starts]
