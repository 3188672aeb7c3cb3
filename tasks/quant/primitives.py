"""Group-wise integer quantization of a Linear weight, the representation every algorithm
produces and every checkpoint layout packs.

A weight W [out, in] is cut along the input dimension into groups of `group_size` columns
(-1: one group, per output channel). Each (group, output row) has a scale s and an integer zero
point z, and each weight an integer code q in [0, 2**bits): W ≈ (q - z) * s. Symmetric
quantization fixes z = 2**(bits-1). `g_idx[i]` is the group of input column i: with GPTQ's
act-order it is not monotone, otherwise it is i // group_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "QuantSpec",
    "QuantizedLinear",
    "fp16_scales",
    "quant_params",
    "quantize_codes",
    "rtn_quantize",
]

# Smallest positive float16 (a subnormal): a smaller scale would be stored as 0.
_FP16_TINY = 2.0**-24
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int  # -1: per output channel (one group spanning every input column)
    sym: bool

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def width(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


@dataclass
class QuantizedLinear:
    codes: torch.Tensor  # int32 [out, in], in [0, 2**bits)
    scales: torch.Tensor  # float32 [groups, out]
    zeros: torch.Tensor  # int32 [groups, out], in [0, 2**bits)
    g_idx: torch.Tensor  # int32 [in]: the group of each input column
    spec: QuantSpec

    def compact(self) -> QuantizedLinear:
        """The same on the CPU with one byte per code (not four): what is kept for every layer
        until the checkpoint is written, so a 1B model's codes stay well under its bf16 size."""
        return QuantizedLinear(
            self.codes.to("cpu", torch.uint8), self.scales.cpu(), self.zeros.cpu(),
            self.g_idx.cpu(), self.spec,
        )  # fmt: skip

    def dequantize(self) -> torch.Tensor:
        """The float weight [out, in] these codes stand for: (q - z) * s."""
        g = self.g_idx.long()
        scales = self.scales[g].T  # [out, in]
        zeros = self.zeros[g].T
        return (self.codes - zeros).to(scales.dtype) * scales


def fp16_scales(scales: torch.Tensor) -> torch.Tensor:
    """Scales as float32 holding float16 values: checkpoints store float16 scales, so codes
    computed with these dequantize to exactly what a runtime computes."""
    return scales.float().clamp(_FP16_TINY, _FP16_MAX).half().float()


def quant_params(w: torch.Tensor, spec: QuantSpec, max_val: torch.Tensor | None = None):
    """Scale and zero point per row of w [rows, cols] from its range (min-max, or clipped to
    ±max_val per row as AWQ's clip search finds). Returns float32 scales [rows] with float16
    values (see fp16_scales), int32 zeros [rows]."""
    w = w.float()
    if max_val is not None:
        w = w.clamp(-max_val[:, None], max_val[:, None])
    if spec.sym:
        scales = fp16_scales(2 * w.abs().amax(dim=1) / spec.maxq)
        zeros = torch.full_like(scales, 2 ** (spec.bits - 1), dtype=torch.int32)
        return scales, zeros
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    # The zero point follows the rounded scale, so the range still maps onto [0, maxq].
    scales = fp16_scales((hi - lo) / spec.maxq)
    zeros = torch.round(-lo / scales).clamp(0, spec.maxq).to(torch.int32)
    return scales, zeros


def quantize_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, maxq: int):
    """Integer codes of w [rows, cols] with per-row scales and zeros."""
    q = torch.round(w.float() / scales[:, None]) + zeros[:, None]
    return q.clamp(0, maxq).to(torch.int32)


def rtn_quantize(
    w: torch.Tensor, spec: QuantSpec, max_val: torch.Tensor | None = None
) -> QuantizedLinear:
    """Round-to-nearest, group by group. max_val: optional clip [out, groups]."""
    out_features, in_features = w.shape
    width, groups = spec.width(in_features), spec.groups(in_features)
    dev = w.device
    codes = torch.empty(out_features, in_features, dtype=torch.int32, device=dev)
    scales = torch.empty(groups, out_features, device=dev)
    zeros = torch.empty(groups, out_features, dtype=torch.int32, device=dev)
    for g in range(groups):
        cols = slice(g * width, (g + 1) * width)
        clip = None if max_val is None else max_val[:, g]
        scales[g], zeros[g] = quant_params(w[:, cols], spec, clip)
        codes[:, cols] = quantize_codes(w[:, cols], scales[g], zeros[g], spec.maxq)
    g_idx = torch.arange(in_features, dtype=torch.int32, device=dev) // width
    return QuantizedLinear(codes, scales, zeros, g_idx, spec)
