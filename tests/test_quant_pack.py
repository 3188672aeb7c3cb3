"""GPTQ v1 and AWQ GEMM packing: round trips, bit layouts, zero-point edge cases."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tasks.quant.pack import (
    AWQ_ORDER,
    pack_awq,
    pack_bits,
    pack_gptq,
    trivial_g_idx,
    unpack_awq,
    unpack_bits,
    unpack_gptq,
)
from tasks.quant.primitives import QuantizedLinear, QuantSpec, rtn_quantize


def quantized(bits: int, sym: bool, out: int = 64, inp: int = 128, group: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return rtn_quantize(torch.randn(out, inp, generator=gen), QuantSpec(bits, group, sym))


def permuted(q: QuantizedLinear, seed: int = 1) -> QuantizedLinear:
    """Act-order: the same group sizes, columns assigned to groups in a random order."""
    order = torch.randperm(q.g_idx.numel(), generator=torch.Generator().manual_seed(seed))
    return QuantizedLinear(q.codes, q.scales, q.zeros, q.g_idx[order], q.spec)


def assert_same(a: QuantizedLinear, b: QuantizedLinear) -> None:
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.zeros, b.zeros)
    assert torch.equal(a.g_idx, b.g_idx)
    assert torch.equal(a.scales, b.scales.half().float())  # stored in fp16
    assert a.spec == b.spec


def autogptq_pack_3bit(values: np.ndarray) -> np.ndarray:
    """AutoGPTQ's 3-bit packing loop (rows of 32 values -> 3 uint32 words), for reference."""
    v = values.astype(np.uint64)
    words = np.zeros((v.shape[0] // 32 * 3,) + v.shape[1:], dtype=np.uint64)
    i = row = 0
    while row < words.shape[0]:
        for j in range(i, i + 10):
            words[row] |= v[j] << (3 * (j - i))
        i += 10
        words[row] |= v[i] << 30
        row += 1
        words[row] |= (v[i] >> 2) & 1
        i += 1
        for j in range(i, i + 10):
            words[row] |= v[j] << (3 * (j - i) + 1)
        i += 10
        words[row] |= v[i] << 31
        row += 1
        words[row] |= (v[i] >> 1) & 0x3
        i += 1
        for j in range(i, i + 10):
            words[row] |= v[j] << (3 * (j - i) + 2)
        i += 10
        row += 1
    return (words & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bits_round_trip(bits):
    values = torch.randint(0, 2**bits, (3, 5, 64), dtype=torch.int32)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, 5, 64 * bits // 32)
    assert torch.equal(unpack_bits(packed, bits), values)


def test_4bit_is_least_significant_nibble_first():
    packed = pack_bits(torch.arange(8, dtype=torch.int32)[None], 4)
    assert packed.item() == 0x76543210


def test_3bit_matches_autogptqs_packing():
    values = torch.randint(0, 8, (64, 7), dtype=torch.int32)
    want = autogptq_pack_3bit(values.numpy())  # packs along rows, as qweight does
    assert np.array_equal(pack_bits(values.T, 3).T.numpy(), want)


def test_words_must_fill():
    with pytest.raises(ValueError, match="whole int32 words"):
        pack_bits(torch.zeros(1, 48, dtype=torch.int32), 3)  # 3 bits: multiples of 32


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_round_trip(bits, sym):
    q = quantized(bits, sym)
    tensors = pack_gptq(q)
    assert tensors["qweight"].shape == (128 * bits // 32, 64)
    assert tensors["qzeros"].shape == (4, 64 * bits // 32)
    assert tensors["scales"].dtype == torch.float16 and tensors["scales"].shape == (4, 64)
    assert tensors["g_idx"].dtype == torch.int32
    assert_same(unpack_gptq(tensors, bits, 32), q)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_act_order_round_trip(bits):
    q = permuted(quantized(bits, sym=True))
    back = unpack_gptq(pack_gptq(q), bits, 32)
    assert_same(back, q)
    as_stored = dataclasses.replace(q, scales=q.scales.half().float())
    assert torch.equal(back.dequantize(), as_stored.dequantize())


def test_gptq_v1_stores_zero_minus_one():
    q = quantized(4, sym=True)  # every zero point is 8
    assert (pack_gptq(q)["qzeros"] == 0x77777777).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_zero_point_edges(bits):
    """0 is stored as -1 (all ones, masked per value) and 2**bits - 1 as itself minus one:
    both come back as they were."""
    q = quantized(bits, sym=False)
    q.zeros[:, ::3] = 0
    q.zeros[:, 1::3] = q.spec.maxq
    back = unpack_gptq(pack_gptq(q), bits, 32)
    assert torch.equal(back.zeros, q.zeros)
    assert torch.equal(back.codes, q.codes)


def test_awq_round_trip_and_shapes():
    q = quantized(4, sym=False)
    tensors = pack_awq(q)
    assert set(tensors) == {"qweight", "qzeros", "scales"}
    assert tensors["qweight"].shape == (128, 8) and tensors["qzeros"].shape == (4, 8)
    assert_same(unpack_awq(tensors, 32), q)


def test_awq_nibble_order():
    codes = (torch.arange(64, dtype=torch.int32) % 8)[:, None].repeat(1, 32)  # output o: o % 8
    zeros = torch.zeros(1, 64, dtype=torch.int32)
    q = QuantizedLinear(
        codes, torch.ones(1, 64), zeros, trivial_g_idx(32, 32), QuantSpec(4, 32, False)
    )
    word = pack_awq(q)["qweight"][0, 0].item()
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == list(AWQ_ORDER)


def test_awq_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="4-bit only"):
        pack_awq(quantized(8, sym=False))
    with pytest.raises(ValueError, match="act-order"):
        pack_awq(permuted(quantized(4, sym=True)))


def test_unpacked_symmetry_is_inferred():
    assert unpack_awq(pack_awq(quantized(4, sym=True)), 32).spec.sym
    assert not unpack_gptq(pack_gptq(quantized(4, sym=False)), 4, 32).spec.sym


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_zeros_need_only_whole_words(bits):
    """2, 4 and 8 bits fill a word with 16, 8 or 4 values: out_features 48 packs."""
    q = quantized(bits, sym=False, out=48)
    assert_same(unpack_gptq(pack_gptq(q), bits, 32), q)
