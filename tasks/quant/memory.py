"""Peak memory of a quantizer's work: RSS (tasks/procmem.py) and CUDA's own peak counter."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from tasks.procmem import peak_rss, reset_peak


class PeakMemory:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset = False

    def __enter__(self) -> PeakMemory:
        self.reset = reset_peak()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        self.rss = peak_rss()
        self.cuda = (
            torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        )

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.rss is not None:
            # Without the reset the figure is the whole process's peak: say so.
            out["peak_rss_bytes" if self.reset else "process_peak_rss_bytes"] = self.rss
        if self.cuda is not None:
            out["peak_cuda_bytes"] = self.cuda
        return out


def release_freed_memory() -> None:
    """Hand memory freed by torch back to the OS (glibc keeps freed heap pages otherwise): a
    layer-by-layer pass frees a layer's worth of buffers each step, and without this the
    process's resident set creeps up by the fragments."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
