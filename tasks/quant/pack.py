"""Pack a QuantizedLinear into the GPTQ (v1) and AWQ (GEMM) checkpoint layouts, and back.

GPTQ v1, what AutoGPTQ/GPTQModel write with `checkpoint_format = "gptq"`:
  qweight int32 [in*bits/32, out]   codes packed along the input dimension
  qzeros  int32 [groups, out*bits/32] zero points minus one, packed along the output dimension
  scales  fp16  [groups, out]
  g_idx   int32 [in]
Values are a little-endian bit stream across int32 words: value k takes bits k*bits ..
k*bits+bits-1, so 2, 4 and 8 bits fill each word and 3 bits put 32 values in 3 words, one
value straddling each word boundary (GPTQ's 3-bit packing).

A zero point of 0 is stored as -1, i.e. all ones (per value, masked). Readers that unpack
value by value and add one back (onnxruntime-genai's builder, exllama kernels, `unpack_gptq`)
recover 0; GPTQModel's v1->v2 conversion adds 0x11111111 to whole words, carrying into the
next zero point, so such a checkpoint is only exact for the former.

AWQ GEMM (AutoAWQ, 4 bits only):
  qweight int32 [in, out/8]      codes packed along the output dimension
  qzeros  int32 [groups, out/8]  zero points as is
  scales  fp16  [groups, out]
with the 8 values of a word in AutoAWQ's order: nibble i holds output column 8c + AWQ_ORDER[i].
No g_idx: AWQ has no act-order.

Scales are stored in float16, so `unpack_*(...).dequantize()` is the weight a reader sees.
"""

from __future__ import annotations

import math

import torch

from tasks.quant.primitives import QuantizedLinear, QuantSpec

__all__ = [
    "AWQ_ORDER",
    "GPTQ_BITS",
    "pack_awq",
    "pack_bits",
    "pack_gptq",
    "trivial_g_idx",
    "unpack_awq",
    "unpack_bits",
    "unpack_gptq",
]

GPTQ_BITS = (2, 3, 4, 8)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
WORD = 32
_LOW32 = (1 << WORD) - 1


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the same bits as int32."""
    return (words - ((words >> (WORD - 1)) << WORD)).to(torch.int32)


def _chunk(bits: int) -> tuple[int, int]:
    """(values, words) of the smallest run of values that fills whole words: 32/bits values in
    one word for 2, 4 and 8 bits; 32 values in 3 words for 3 bits."""
    common = math.gcd(WORD, bits)
    return WORD // common, bits // common


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in [0, 2**bits) along the last dimension, little-endian bit stream:
    [..., n] -> int32 [..., n*bits/32]; n must fill whole words (a multiple of 32 for 3 bits)."""
    n = values.shape[-1]
    per_chunk, words_per_chunk = _chunk(bits)
    if n % per_chunk:
        raise ValueError(f"{n} values of {bits} bits do not fill whole int32 words")
    chunks = values.to(torch.int64).reshape(*values.shape[:-1], n // per_chunk, per_chunk)
    words = torch.zeros(*chunks.shape[:-1], words_per_chunk, dtype=torch.int64)
    for k in range(per_chunk):
        word, offset = divmod(k * bits, WORD)
        v = chunks[..., k]
        words[..., word] |= (v << offset) & _LOW32
        if offset + bits > WORD:  # the value straddles two words (3 bits)
            words[..., word + 1] |= v >> (WORD - offset)
    return _to_int32(words.reshape(*values.shape[:-1], n * bits // WORD))


def unpack_bits(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_bits: int32 [..., m] -> int32 [..., m*32/bits]."""
    m = words.shape[-1]
    per_chunk, words_per_chunk = _chunk(bits)
    if m % words_per_chunk:
        raise ValueError(f"{m} int32 words are not whole runs of {bits}-bit values")
    shape = (*words.shape[:-1], m // words_per_chunk, words_per_chunk)
    chunks = (words.to(torch.int64) & _LOW32).reshape(shape)
    mask = (1 << bits) - 1
    out = []
    for k in range(per_chunk):
        word, offset = divmod(k * bits, WORD)
        v = chunks[..., word] >> offset
        if offset + bits > WORD:
            v = v | (chunks[..., word + 1] << (WORD - offset))
        out.append(v & mask)
    return torch.stack(out, dim=-1).reshape(*words.shape[:-1], m * WORD // bits).to(torch.int32)


def trivial_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """g_idx without act-order: column i is in group i // group_size (-1: one group)."""
    width = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32) // width


def _check_spec(q: QuantizedLinear) -> tuple[int, int]:
    out_features, in_features = q.codes.shape
    spec = q.spec
    if spec.group_size != -1 and in_features % spec.group_size:
        raise ValueError(
            f"in_features {in_features} is not a multiple of group_size {spec.group_size}"
        )
    if q.scales.shape != (spec.groups(in_features), out_features):
        raise ValueError(
            f"scales {tuple(q.scales.shape)} do not fit {spec} and [{out_features}, {in_features}]"
        )
    return out_features, in_features


def pack_gptq(q: QuantizedLinear) -> dict[str, torch.Tensor]:
    """qweight, qzeros (zero minus one), scales (fp16) and g_idx in GPTQ's v1 layout."""
    bits = q.spec.bits
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ packs {GPTQ_BITS} bits, not {bits}")
    _check_spec(q)
    return {
        "qweight": pack_bits(q.codes, bits).T.contiguous(),
        # Masked per value: 0 becomes all ones (see the module docstring).
        "qzeros": pack_bits((q.zeros - 1) & q.spec.maxq, bits),
        "scales": q.scales.to(torch.float16).contiguous(),
        "g_idx": q.g_idx.to(torch.int32).contiguous(),
    }


def _spec_from(zeros: torch.Tensor, bits: int, group_size: int) -> QuantSpec:
    # The layouts do not record symmetry; zero points all at the midpoint are symmetric.
    return QuantSpec(bits, group_size, sym=bool((zeros == 2 ** (bits - 1)).all()))


def unpack_gptq(tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> QuantizedLinear:
    """A QuantizedLinear (fp16-rounded scales in float32) from GPTQ v1 tensors."""
    codes = unpack_bits(tensors["qweight"].T, bits)
    zeros = (unpack_bits(tensors["qzeros"], bits) + 1) & (2**bits - 1)
    g_idx = tensors["g_idx"].to(torch.int32)
    return QuantizedLinear(
        codes.contiguous(),
        tensors["scales"].float(),
        zeros,
        g_idx,
        _spec_from(zeros, bits, group_size),
    )


def _awq_order(values: torch.Tensor) -> torch.Tensor:
    """Columns 8c..8c+7 reordered so that position i holds column 8c + AWQ_ORDER[i]."""
    n = values.shape[-1]
    order = torch.tensor(AWQ_ORDER)
    return values.reshape(*values.shape[:-1], n // 8, 8)[..., order].reshape(values.shape)


def _awq_unorder(values: torch.Tensor) -> torch.Tensor:
    n = values.shape[-1]
    inverse = torch.argsort(torch.tensor(AWQ_ORDER))
    return values.reshape(*values.shape[:-1], n // 8, 8)[..., inverse].reshape(values.shape)


def pack_awq(q: QuantizedLinear) -> dict[str, torch.Tensor]:
    """qweight, qzeros and scales (fp16) in AutoAWQ's GEMM layout (4 bits, no act-order)."""
    if q.spec.bits != 4:
        raise ValueError(f"AWQ's GEMM layout is 4-bit only, not {q.spec.bits}")
    out_features, in_features = _check_spec(q)
    if out_features % 8:
        raise ValueError(f"AWQ packs 8 output columns per word; out_features is {out_features}")
    if not torch.equal(q.g_idx, trivial_g_idx(in_features, q.spec.group_size)):
        raise ValueError("AWQ's layout has no g_idx: act-order (a permuted g_idx) cannot be stored")
    return {
        "qweight": pack_bits(_awq_order(q.codes.T), 4),
        "qzeros": pack_bits(_awq_order(q.zeros), 4),
        "scales": q.scales.to(torch.float16).contiguous(),
    }


def unpack_awq(tensors: dict[str, torch.Tensor], group_size: int) -> QuantizedLinear:
    """A QuantizedLinear (fp16-rounded scales in float32) from AWQ GEMM tensors."""
    codes = _awq_unorder(unpack_bits(tensors["qweight"], 4)).T.contiguous()
    zeros = _awq_unorder(unpack_bits(tensors["qzeros"], 4))
    g_idx = trivial_g_idx(codes.shape[1], group_size)
    return QuantizedLinear(
        codes, tensors["scales"].float(), zeros, g_idx, _spec_from(zeros, 4, group_size)
    )
