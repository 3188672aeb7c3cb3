"""AWQ (Lin et al., 2023): activation-aware per-input-channel scales and weight clipping.

Scaling input channel j of a Linear's weight by s_j and its input by 1/s_j leaves the output
unchanged but lets salient channels (large activations) keep more precision once quantized.
The scales fold into whatever produces the input (an RMSNorm's weight, a previous Linear's
output rows), so nothing runs online. Mirrors AutoAWQ's `auto_scale.py` (`_search_best_scale`)
and `auto_clip.py` (`_compute_best_clip`), with the loss measured on the given linears' outputs
rather than a whole attention or MLP block.

Order of use, as in AutoAWQ: search_scales on the block's inputs; fold s (scale_linear_inputs
and scale_prev_*); then search_clip on the scaled weight with inputs x / s (AutoAWQ skips
q_proj and k_proj, whose errors softmax amplifies); quantize with rtn_quantize(w, spec, max_val).

Deterministic by construction, whatever the thread count (tasks.quant.threads): the Gram
matrices over tokens and every loss's final sum run on one thread, and both searches break ties
the same stated way: candidates are tried in a fixed order and a later one must be strictly
better (`<`), so on equal losses the earlier candidate (no scaling, then the smaller α; no
clipping, then the least shrink) wins. Equal quantized weights give bit-equal losses, as each
loss is a fixed sequence of operations on them.
"""

from __future__ import annotations

import torch

from tasks.quant.primitives import QuantSpec, quant_params, quantize_codes
from tasks.quant.threads import fixed_threads, token_gram, total

__all__ = [
    "fake_quantize",
    "scale_linear_inputs",
    "scale_prev_linear_outputs",
    "scale_prev_rms_norm",
    "search_clip",
    "search_scales",
]


def fake_quantize(
    w: torch.Tensor, spec: QuantSpec, max_val: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize-dequantize w [out, in] group-wise in one shot (rtn_quantize, vectorised).
    max_val: optional clip [out, groups]."""
    out_features, in_features = w.shape
    rows = w.float().reshape(-1, spec.width(in_features))  # one row per (out row, group)
    clip = None if max_val is None else max_val.reshape(-1)
    scales, zeros = quant_params(rows, spec, clip)
    codes = quantize_codes(rows, scales, zeros, spec.maxq)
    return ((codes - zeros[:, None]).float() * scales[:, None]).reshape(out_features, in_features)


def _subsample(x: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """Every k-th row so at most max_tokens remain (evenly spread, deterministic)."""
    x = x.reshape(-1, x.shape[-1])
    return x[:: -(-x.shape[0] // max_tokens)]


def _weight_mean(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Mean over rows of |w| relative to its group's max: AutoAWQ's w_mean [in]."""
    width = spec.width(w.shape[1])
    groups = w.abs().reshape(-1, width)
    return (groups / (groups.amax(dim=1, keepdim=True) + 1e-6)).reshape(w.shape).mean(dim=0)


def search_scales(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    spec: QuantSpec,
    grid: int = 20,
    duo_scaling: bool = True,
    max_tokens: int = 4096,
) -> torch.Tensor:
    """Per-input-channel scales s [in] for the linears that all read x [n, in].

    Candidates are s = x_mean^α / w_mean^(1-α) (duo_scaling) or x_mean^α for α in
    {0, 1/grid, ..., (grid-1)/grid}, normalised by sqrt(max·min), plus s = 1; the winner
    minimises the MSE between x W^T and (x / s) Q(W diag(s))^T over all weights at once. s = 1
    (plain RTN) is tried first and only beaten strictly, so the result is never worse than RTN
    on the tokens searched. x_mean uses every row; the loss uses at most max_tokens evenly
    spaced rows, which bounds the cost at grid × (one RTN pass + one [max_tokens, in] × [in,
    Σ out] matmul).
    """
    x = x.detach().reshape(-1, x.shape[-1]).float()
    w = torch.cat([wi.detach().to(x.device, torch.float32) for wi in weights])
    x_mean = x.abs().mean(dim=0)
    w_mean = _weight_mean(w, spec)
    output_error = _output_error(_subsample(x, max_tokens), w)
    best_s = torch.ones_like(x_mean)
    best = output_error(fake_quantize(w, spec), best_s)
    for alpha in (i / grid for i in range(grid)):
        s = x_mean.pow(alpha)
        if duo_scaling:
            s = s / (w_mean.pow(1 - alpha) + 1e-4)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = output_error(fake_quantize(w * s, spec), s)
        # Tie rule: strictly better only. On equal losses the earlier candidate stays: s = 1,
        # then the smallest α (a NaN loss never wins).
        if loss < best:
            best, best_s = loss, s
    return best_s


def _output_error(xs: torch.Tensor, w: torch.Tensor):
    """A function (q, s) -> mean((xs W^T - (xs / s) q^T)^2): the output MSE of the scaled,
    quantized weight q = Q(W diag(s)) on the tokens xs [n, in].

    With fewer input channels than tokens it goes through the Gram matrix G = xs^T xs: with
    D = W^T - diag(1/s) q^T, the loss is sum(D * (G D)) / (n out), which costs in² out per
    candidate instead of n in out (3.6x less for a 576-wide layer on 2,048 tokens)."""
    n, in_features = xs.shape
    scale = 1.0 / (n * w.shape[0])
    if in_features >= n:
        ref = xs @ w.T
        return lambda q, s: total((ref - (xs / s) @ q.T).pow(2)) * scale
    gram = token_gram(xs)

    def error(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        d = w.T - q.T / s[:, None]
        return total(d * (gram @ d)) * scale

    return error


def search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    spec: QuantSpec,
    grid: int = 20,
    max_shrink: float = 0.5,
    n_tokens: int = 512,
    row_batch: int = 256,
) -> torch.Tensor:
    """Clip thresholds max_val [out, groups] minimising each group's output error.

    For each (row, group), max_val = amax·(1 - i/grid) for i < max_shrink·grid; i = 0 (no
    clipping) is tried first and only beaten strictly. The error is the MSE over at most
    n_tokens evenly spaced rows of x of the group's partial dot products, computed as
    d^T G_g d / n with d the group's rounding error and G_g the group's Gram matrix of x (width²
    per row and group instead of n_tokens × width). Rows are handled row_batch at a time.
    """
    out_features, in_features = w.shape
    width, groups = spec.width(in_features), spec.groups(in_features)
    w = w.detach().float()
    xg = _subsample(x.detach().to(w.device, torch.float32), n_tokens).reshape(-1, groups, width)
    with fixed_threads(1):  # a sum over the tokens (see token_gram)
        gram = torch.einsum("ngk,ngl->gkl", xg, xg) / xg.shape[0]  # [groups, width, width]
    best_all = []
    for r in range(0, out_features, row_batch):
        wb = w[r : r + row_batch].reshape(-1, groups, width)
        amax = wb.abs().amax(dim=-1)  # [rows, groups]
        best_val, best_err = amax.clone(), None
        for i in range(int(max_shrink * grid)):
            max_val = amax * (1 - i / grid)
            q = fake_quantize(wb.reshape(-1, in_features), spec, max_val).reshape(wb.shape)
            d = q - wb
            # d^T G_g d per (row, group): a sum along one dimension, each by one thread.
            err = (torch.einsum("rgk,gkl->rgl", d, gram) * d).sum(dim=-1)
            if best_err is None:
                best_err = err
                continue
            # Tie rule: strictly better only. On equal errors the earlier candidate stays (no
            # clipping, then the least shrink); a NaN error never wins.
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_val = torch.where(better, max_val, best_val)
        best_all.append(best_val)
    return torch.cat(best_all)


def _scaled(t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """t * factor in float32, back in t's dtype (bf16 weights lose less that way)."""
    return (t.float() * factor.to(t.device)).to(t.dtype)


def scale_linear_inputs(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W diag(s): the weight [out, in] of a Linear whose input is divided by s."""
    return _scaled(weight, s[None, :])


def scale_prev_rms_norm(norm_weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """An RMSNorm weight [in] divided by s, so its output arrives already divided by s."""
    return _scaled(norm_weight, 1 / s)


def scale_prev_linear_outputs(
    weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A previous Linear's weight [out, in] and bias [out] with output rows divided by s
    (up_proj before down_proj; v_proj before o_proj only without GQA, where shapes match)."""
    return _scaled(weight, 1 / s[:, None]), None if bias is None else _scaled(bias, 1 / s)
