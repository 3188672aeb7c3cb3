"""AWQ's scale and clip searches against plain RTN, and the scale-folding helpers."""

from __future__ import annotations

import pytest
import torch

from tasks.quant.awq import (
    _output_error,
    fake_quantize,
    scale_linear_inputs,
    scale_prev_linear_outputs,
    scale_prev_rms_norm,
    search_clip,
    search_scales,
)
from tasks.quant.primitives import QuantSpec, rtn_quantize

SPECS = [QuantSpec(4, 32, True), QuantSpec(4, 32, False), QuantSpec(3, 64, False)]


def inputs(outliers: bool, seed: int = 0) -> torch.Tensor:
    """x [512, 128]: LLM-like activations have a few channels ~20x larger than the rest."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 128, generator=gen)
    if outliers:
        x[:, [3, 40, 77, 101]] *= 20
    return x


def weights(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 100)
    return [torch.randn(96, 128, generator=gen) * 0.05, torch.randn(64, 128, generator=gen) * 0.05]


def mse(x: torch.Tensor, ws: list[torch.Tensor], s: torch.Tensor, spec: QuantSpec) -> float:
    """Output MSE of the scaled, quantized linears, as search_scales measures it."""
    w = torch.cat(ws)
    return (x @ w.T - (x / s) @ fake_quantize(w * s, spec).T).pow(2).mean().item()


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_scales_beat_rtn_with_outlier_channels(spec):
    x, ws = inputs(outliers=True), weights()
    s = search_scales(x, ws, spec)
    rtn, awq = mse(x, ws, torch.ones(128), spec), mse(x, ws, s, spec)
    print(f"{spec}: AWQ/RTN output MSE {awq / rtn:.3f} (RMS ratio {(awq / rtn) ** 0.5:.3f})")
    assert awq < 0.8 * rtn
    assert s.shape == (128,) and (s > 0).all()
    assert s[[3, 40, 77, 101]].min() > s.median()  # salient channels get larger scales


@pytest.mark.parametrize("duo_scaling", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_scales_never_worse_than_rtn(seed, duo_scaling):
    spec = QuantSpec(4, 32, False)
    x, ws = inputs(outliers=False, seed=seed), weights(seed)
    s = search_scales(x, ws, spec, grid=5, duo_scaling=duo_scaling)
    assert mse(x, ws, s, spec) <= mse(x, ws, torch.ones(128), spec)


def test_scales_subsample_tokens():
    spec = QuantSpec(4, 32, True)
    x, ws = inputs(outliers=True), weights()
    s = search_scales(x, ws, spec, max_tokens=100)
    assert mse(x, ws, s, spec) < mse(x, ws, torch.ones(128), spec)


def test_output_error_through_the_gram_matrix_is_the_direct_one():
    """More tokens than input channels takes the Gram-matrix form: same loss, cheaper."""
    spec = QuantSpec(4, 32, False)
    x, w = inputs(outliers=True), torch.cat(weights())
    s = torch.rand(128, generator=torch.Generator().manual_seed(3)) + 0.5
    q = fake_quantize(w * s, spec)
    gram = _output_error(x, w)  # 512 tokens > 128 channels
    direct = _output_error(x[:100], w)  # 100 tokens < 128 channels: the direct form
    assert gram(q, s).item() == pytest.approx(mse(x, ws=[w], s=s, spec=spec), rel=1e-4)
    assert direct(q, s).item() == pytest.approx(mse(x[:100], ws=[w], s=s, spec=spec), rel=1e-4)


def group_errors(w, x, spec, max_val=None) -> torch.Tensor:
    """MSE over tokens of each (row, group)'s partial output, as search_clip measures it."""
    width = spec.width(w.shape[1])
    xg, groups = x.reshape(x.shape[0], -1, width), spec.groups(w.shape[1])
    diff = (w - fake_quantize(w, spec, max_val)).reshape(w.shape[0], groups, width)
    return torch.einsum("ngk,rgk->rng", xg, diff).pow(2).mean(dim=1)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_clip_lowers_error(spec):
    torch.manual_seed(1)  # StudentT.sample takes no generator
    # Heavy-tailed weights: a few large values stretch the range of their groups.
    w = torch.distributions.StudentT(3.0).sample((96, 128)) * 0.02
    x = torch.randn(256, 128)
    max_val = search_clip(w, x, spec, row_batch=40)
    assert max_val.shape == (96, spec.groups(128))
    assert (max_val <= w.abs().reshape(96, -1, spec.width(128)).amax(-1) + 1e-7).all()
    assert (group_errors(w, x, spec, max_val) <= group_errors(w, x, spec) + 1e-12).all()
    full = (x @ (w - rtn_quantize(w, spec).dequantize()).T).pow(2).mean()
    clipped = (x @ (w - rtn_quantize(w, spec, max_val).dequantize()).T).pow(2).mean()
    print(f"{spec}: clipped/unclipped output MSE {clipped / full:.3f}")
    assert clipped < full


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_clip_picks_what_a_direct_search_picks(spec):
    """The clip search measures errors through per-group Gram matrices; each (row, group) must
    still get the candidate with the least error measured directly on the tokens."""
    torch.manual_seed(2)
    w = torch.distributions.StudentT(3.0).sample((48, 128)) * 0.02
    x = inputs(outliers=True)[:256]
    chosen = group_errors(w, x, spec, search_clip(w, x, spec, grid=20, n_tokens=256))
    amax = w.abs().reshape(48, spec.groups(128), -1).amax(-1)
    direct = torch.stack([group_errors(w, x, spec, amax * (1 - i / 20)) for i in range(10)])
    torch.testing.assert_close(chosen, direct.min(dim=0).values, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("spec", [*SPECS, QuantSpec(4, -1, True)], ids=str)
def test_fake_quantize_is_rtn(spec):
    w = torch.randn(16, 128)
    max_val = w.abs().reshape(16, spec.groups(128), -1).amax(-1) * 0.8
    for clip in (None, max_val):
        torch.testing.assert_close(
            fake_quantize(w, spec, clip), rtn_quantize(w, spec, clip).dequantize()
        )


def test_scale_folding_keeps_outputs():
    gen = torch.Generator().manual_seed(2)
    x, g = torch.randn(8, 32, generator=gen), torch.rand(32, generator=gen) + 0.5
    w, s = torch.randn(16, 32, generator=gen), torch.rand(32, generator=gen) + 0.5
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    folded = (normed * scale_prev_rms_norm(g, s)) @ scale_linear_inputs(w, s).T
    torch.testing.assert_close(folded, (normed * g) @ w.T)
    up, bias, down = torch.randn(32, 8), torch.randn(32), torch.randn(16, 32)
    up_s, bias_s = scale_prev_linear_outputs(up, bias, s)
    x8 = x[:, :8]
    folded = (x8 @ up_s.T + bias_s) @ scale_linear_inputs(down, s).T
    torch.testing.assert_close(folded, (x8 @ up.T + bias) @ down.T)
    assert scale_linear_inputs(w.bfloat16(), s).dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_awq_on_cuda():
    spec = QuantSpec(4, 32, True)
    x, ws = inputs(outliers=True), weights()
    s = search_scales(x.cuda(), [w.cuda() for w in ws], spec)
    assert s.is_cuda and mse(x, ws, s.cpu(), spec) < mse(x, ws, torch.ones(128), spec)
    max_val = search_clip(ws[0].cuda() * s, x.cuda() / s, spec)
    assert max_val.is_cuda and max_val.shape == (96, 4)
    assert rtn_quantize(ws[0].cuda(), spec, max_val).codes.is_cuda
