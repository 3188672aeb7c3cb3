"""GPTQ (Frantar et al., 2022): quantize a Linear weight column by column, spreading each
column's rounding error over the columns not yet quantized through the inverse Hessian of the
layer's reconstruction loss, H = 2 X^T X / n.

Follows the reference `gptq.py` (IST-DASLab/gptq, as used by AutoGPTQ and transformers): the
upper Cholesky factor of the damped inverse Hessian, blocks of columns with lazy batch updates,
dead inputs (H_ii = 0) zeroed, and act-order (columns by descending H_ii) with a g_idx in the
original column order. One deliberate difference: a group's scale and zero point come from the
weights as updated by every earlier column (the reference reads them from the matrix as it was
at the start of the block when a group begins inside a block).

The result does not depend on the thread count (tasks.quant.threads): X^T X, whose inner
dimension is the tokens, and the Cholesky factorisations run on one thread; the rest splits
its work over outputs.
"""

from __future__ import annotations

import torch

from tasks.quant.primitives import QuantizedLinear, QuantSpec, quant_params, quantize_codes
from tasks.quant.threads import fixed_threads, token_gram

__all__ = ["add_to_hessian", "gptq_quantize"]


def add_to_hessian(
    h: torch.Tensor | None, x: torch.Tensor, count: int, gram: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Fold a batch of inputs x [..., in] into the running mean H = 2 X^T X / count.

    count is the number of tokens (rows) seen so far; the reference counts sequences instead,
    which only rescales H, and GPTQ's damping is relative to mean(diag H), so both agree.
    gram: token_gram(x) when the caller already has it (linears that read one input share it).
    """
    n = x.reshape(-1, x.shape[-1]).shape[0]
    if gram is None:
        gram = token_gram(x)
    if h is None:
        h = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
    total = count + n
    # Rescale before adding so H stays a mean of O(1) terms however many tokens arrive.
    h = h * (count / total) + gram * (2.0 / total)
    return h, total


def _inverse_hessian_factor(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)^-1, whose rows drive the updates.
    Damps h in place (the caller's private copy) and frees each intermediate as soon as it can:
    for a 5632-wide down_proj every [in, in] matrix is 127 MB. On one thread: LAPACK's
    factorisations give other bits with other thread counts (and take milliseconds here)."""
    with fixed_threads(1):
        h.diagonal().add_(damp_percent * torch.mean(torch.diag(h)))
        lower, info = torch.linalg.cholesky_ex(h)
        del h
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
    raise ValueError(
        f"GPTQ: the Hessian is not positive definite after damping with damp_percent="
        f"{damp_percent}; raise damp_percent (e.g. to {min(1.0, damp_percent * 10):g}) or "
        "calibrate on more tokens."
    )


def _quantize_block(
    w1: torch.Tensor,
    hinv1: torch.Tensor,
    spec: QuantSpec,
    width: int,
    table: list[tuple[torch.Tensor, torch.Tensor]],
    group: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize one block's columns in order, updating w1 in place; returns (codes, errors
    scaled by 1/[H^-1]_ii). table[group[i]] holds column i's (scales, zeros); a group not
    yet there starts at column i and is measured on the weights as updated so far."""
    codes = torch.empty_like(w1, dtype=torch.int32)
    err = torch.empty_like(w1)
    for i, g in enumerate(group.tolist()):
        if g == len(table):
            table.append(quant_params(w1[:, i : i + width], spec))
        scales, zeros = table[g]
        w = w1[:, i]
        q = quantize_codes(w[:, None], scales, zeros, spec.maxq)[:, 0]
        codes[:, i] = q
        err[:, i] = (w - (q - zeros).float() * scales) / hinv1[i, i]
        # Spread this column's error over the block's remaining columns.
        w1[:, i:] -= err[:, i, None] * hinv1[None, i, i:]
    return codes, err


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    spec: QuantSpec,
    damp_percent: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    static_groups: bool = False,
) -> QuantizedLinear:
    """GPTQ-quantize w [out, in] given the Hessian h [in, in] of its inputs (add_to_hessian).

    static_groups: every group's scale and zero point from the unquantized weight, in
    original column order, so g_idx stays i // group_size even with act_order.
    block_size is rounded up to a multiple of group_size so groups never straddle blocks.
    """
    in_features = w.shape[1]
    width = spec.width(in_features)
    if in_features % width:
        raise ValueError(f"GPTQ: in_features {in_features} is not a multiple of group_size {width}")
    w = w.detach().float().clone()
    h = h.to(device=w.device, dtype=torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1  # any positive value: the column is zero, so its error is zero too
    w[:, dead] = 0
    groups = in_features // width
    # Static groups and per-channel parameters come from the weight before any update.
    table: list[tuple[torch.Tensor, torch.Tensor]] = []
    if static_groups or groups == 1:
        table = [quant_params(w[:, g * width : (g + 1) * width], spec) for g in range(groups)]
    # Stable: equal H_ii (dead columns, all set to 1) keep their original order.
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, damp_percent)
    if groups > 1:
        block_size = -(-block_size // width) * width
    codes = torch.empty_like(w, dtype=torch.int32)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        w1 = w[:, i1:i2].clone()
        orig = perm[i1:i2] if perm is not None else torch.arange(i1, i2, device=w.device)
        group = orig // width if static_groups else torch.arange(i1, i2, device=w.device) // width
        codes[:, i1:i2], err = _quantize_block(w1, hinv[i1:i2, i1:i2], spec, width, table, group)
        # The lazy batch update: the block's errors reach later columns in one matmul.
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return _assemble(codes, table, spec, width, perm, static_groups)


def _assemble(
    codes: torch.Tensor,
    table: list[tuple[torch.Tensor, torch.Tensor]],
    spec: QuantSpec,
    width: int,
    perm: torch.Tensor | None,
    static_groups: bool,
) -> QuantizedLinear:
    """Undo the act-order permutation and stack the per-group parameters."""
    scales = torch.stack([s for s, _ in table])
    zeros = torch.stack([z for _, z in table])
    g_idx = torch.arange(codes.shape[1], dtype=torch.int32, device=codes.device) // width
    if perm is not None:
        invperm = torch.argsort(perm)
        codes = codes[:, invperm]
        if not static_groups:
            # Groups are runs of the permuted order: column c sits at position invperm[c].
            g_idx = g_idx[invperm]
    return QuantizedLinear(codes, scales, zeros, g_idx, spec)
