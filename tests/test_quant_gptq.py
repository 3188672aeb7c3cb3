"""GPTQ against RTN, against a plain sequential OBS reference, and its edge cases."""

from __future__ import annotations

import pytest
import torch

from tasks.quant.gptq import add_to_hessian, gptq_quantize
from tasks.quant.primitives import QuantSpec, quant_params, rtn_quantize

SPECS = [
    QuantSpec(4, 32, True),
    QuantSpec(4, 32, False),
    QuantSpec(3, 32, False),
    QuantSpec(8, 32, True),
    QuantSpec(4, -1, True),
]


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated inputs x [256, 128] (x = z A) and a weight w [64, 128]."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=gen) @ torch.randn(128, 128, generator=gen)
    return x, torch.randn(64, 128, generator=gen) * 0.05


def hessian(x: torch.Tensor) -> torch.Tensor:
    h, count = add_to_hessian(None, x[:100], 0)
    h, count = add_to_hessian(h, x[100:], count)
    assert count == x.shape[0]
    return h


def output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return (x @ w.T - x @ wq.T).norm().item()


def reference_gptq(w, h, spec, damp=0.01, act_order=False) -> torch.Tensor:
    """Sequential OBS without Cholesky or blocks: after each column, downdate H^-1 by
    Gaussian elimination. Returns the dequantized weight in original column order."""
    w, h = w.double().clone(), h.double().clone()
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(len(h))
    w, h = w[:, perm], h[perm][:, perm]
    hinv = torch.linalg.inv(h + damp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype))
    width, q = spec.width(w.shape[1]), torch.zeros_like(w)
    for i in range(w.shape[1]):
        if i % width == 0:  # a group starts: measure it on the updated weights
            scales, zeros = (p.double() for p in quant_params(w[:, i : i + width].float(), spec))
        codes = (torch.round(w[:, i] / scales) + zeros).clamp(0, spec.maxq)
        q[:, i] = (codes - zeros) * scales
        err = (w[:, i] - q[:, i]) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[None, i, i:]
        hinv = hinv - hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    return q[:, torch.argsort(perm)].float()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_gptq_beats_rtn(layer, spec, act_order):
    x, w = layer
    ql = gptq_quantize(w, hessian(x), spec, act_order=act_order, block_size=64)
    rtn = output_error(x, w, rtn_quantize(w, spec).dequantize())
    gptq = output_error(x, w, ql.dequantize())
    print(f"{spec} act_order={act_order}: GPTQ/RTN output error {gptq / rtn:.3f}")
    assert gptq < 0.9 * rtn
    groups = spec.groups(w.shape[1])
    assert ql.codes.min() >= 0 and ql.codes.max() <= spec.maxq
    assert ql.zeros.min() >= 0 and ql.zeros.max() <= spec.maxq
    assert ql.scales.shape == ql.zeros.shape == (groups, w.shape[0])
    assert torch.equal(ql.scales, ql.scales.half().float())  # stored as float16 losslessly
    assert torch.equal(torch.bincount(ql.g_idx.long()), torch.full((groups,), spec.width(128)))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", [s for s in SPECS if s.bits < 8], ids=str)
def test_gptq_matches_sequential_reference(layer, spec, act_order):
    """dequantize() (after undoing act-order) is what the algorithm quantized to."""
    x, w = layer
    h = hessian(x)
    ql = gptq_quantize(w, h, spec, act_order=act_order, block_size=32)
    ref = reference_gptq(w, h, spec, act_order=act_order)
    close = torch.isclose(ql.dequantize(), ref, atol=1e-5).float().mean().item()
    assert close > 0.99  # float32 vs float64: a rare rounding tie may flip a code


def test_act_order_g_idx(layer):
    x, w = layer
    h, spec = hessian(x), QuantSpec(4, 32, True)
    perm = torch.argsort(torch.diag(h), descending=True)
    ql = gptq_quantize(w, h, spec, act_order=True)
    assert torch.equal(ql.g_idx[perm].long(), torch.arange(128) // 32)
    static = gptq_quantize(w, h, spec, act_order=True, static_groups=True)
    assert torch.equal(static.g_idx.long(), torch.arange(128) // 32)
    rtn = output_error(x, w, rtn_quantize(w, spec).dequantize())
    assert output_error(x, w, static.dequantize()) < 0.9 * rtn


def test_identity_hessian_is_rtn(layer):
    """With uncorrelated, equal-variance inputs there is no error to spread."""
    _, w = layer
    spec = QuantSpec(4, 32, False)
    ql = gptq_quantize(w, torch.eye(128), spec)
    assert torch.equal(ql.codes, rtn_quantize(w, spec).codes)


def test_block_size_does_not_change_result(layer):
    x, w = layer
    h, spec = hessian(x), QuantSpec(4, 32, True)
    a = gptq_quantize(w, h, spec, block_size=32).codes
    b = gptq_quantize(w, h, spec, block_size=128).codes
    assert (a == b).float().mean() > 0.99


def test_dead_column(layer):
    x, w = layer
    x = x.clone()
    x[:, 5] = 0
    spec = QuantSpec(4, 32, False)
    ql = gptq_quantize(w, hessian(x), spec, act_order=True)
    wq = ql.dequantize()
    assert torch.isfinite(wq).all() and (wq[:, 5] == 0).all()
    assert output_error(x, w, wq) < output_error(x, w, rtn_quantize(w, spec).dequantize())


def test_non_positive_definite_hessian_is_a_clear_error(layer):
    _, w = layer
    with pytest.raises(ValueError, match="damp_percent"):
        gptq_quantize(w, -torch.eye(128), QuantSpec(4, 32, True))


def test_hessian_is_running_mean(layer):
    x, _ = layer
    torch.testing.assert_close(hessian(x), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gptq_on_cuda(layer):
    x, w = layer
    spec = QuantSpec(4, 32, False)
    ql = gptq_quantize(w.cuda(), hessian(x.cuda()), spec, act_order=True)
    assert all(t.is_cuda for t in (ql.codes, ql.scales, ql.zeros, ql.g_idx))
    cpu = gptq_quantize(w, hessian(x), spec, act_order=True)
    assert (ql.codes.cpu() == cpu.codes).float().mean() > 0.95
