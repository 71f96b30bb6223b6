"""GPTQ v1 packing (the AutoGPTQ checkpoint format), for 2, 3, 4 and 8 bits.

Layout, for a linear layer with ``in_features`` K and ``out_features`` N:

- ``qweight`` int32 ``(ceil(K * bits / 32), N)``: the codes of each output column, packed along the input
  dimension as one little-endian bit stream (element k occupies bits ``[k*bits, (k+1)*bits)``). For 2/4/8
  bits this is ``32/bits`` codes per word; for 3 bits a code may straddle two words, exactly as AutoGPTQ's
  3-bit packer lays out 32 codes in 3 words.
- ``qzeros`` int32 ``(groups, ceil(N * bits / 32))``: the zero points, packed the same way along the output
  dimension, **stored minus one** (the v1 convention). A zero point of 0 is stored as ``maxq`` (the masked
  -1), which no valid zero point uses, and unpacks back to 0.
- ``scales`` fp16 ``(groups, N)``; ``g_idx`` int32 ``(K,)``: the group of each input column.

Shapes that do not fill a whole word are zero-padded at the end of the stream (AutoGPTQ requires whole
words; every real model has them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantizer import QuantizedWeight

SUPPORTED_BITS = (2, 3, 4, 8)
_MASK32 = (1 << 32) - 1


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} cannot be packed; GPTQ v1 supports {SUPPORTED_BITS}.")


def packed_rows(n: int, bits: int) -> int:
    """Number of int32 words that hold ``n`` codes of ``bits`` bits."""
    return (n * bits + 31) // 32


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``(n, m)`` along dim 0 into int32 ``(packed_rows(n), m)``."""
    _check_bits(bits)
    n, _ = codes.shape
    if codes.numel():
        lo, hi = torch.aminmax(codes)
        if lo < 0 or hi > (1 << bits) - 1:
            raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing.")
    if 32 % bits == 0 and n % (32 // bits) == 0:
        return _pack_words(codes, bits)
    return _pack_stream(codes, bits)


def _pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Whole words of a power-of-two width (every real layer at 2/4/8 bits): word r ORs codes ``r * per + j``
    shifted by ``j * bits``. torch shifts int32 as unsigned, so the top code lands in the sign bit as the v1
    word has it. About 4x faster than ``_pack_stream`` (``benchmarks/bench_packing.py``)."""
    n, m = codes.shape
    per = 32 // bits
    c = codes.to(torch.int32).reshape(n // per, per, m)
    out = c[:, 0].clone()
    for j in range(1, per):
        out |= c[:, j] << (bits * j)
    return out


def _pack_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Any width and length: the codes as one little-endian bit stream, a code straddling two words (3 bits)
    split between them; the stream is zero-padded to whole words."""
    n, m = codes.shape
    c = codes.to(torch.int64)
    words = packed_rows(n, bits)
    pos = torch.arange(n, device=codes.device) * bits
    word, offset = pos // 32, pos % 32
    out = torch.zeros(words + 1, m, dtype=torch.int64, device=codes.device)
    # Fields never overlap, so adding equals OR-ing. The low part lands in `word`, a straddling code's
    # high part in `word + 1`.
    out.index_add_(0, word, (c << offset[:, None]) & _MASK32)
    spill = offset + bits > 32
    if spill.any():
        out.index_add_(0, word[spill] + 1, c[spill] >> (32 - offset[spill])[:, None])
    out = out[:words]
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)


def unpack_codes(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: int32 ``(packed_rows(n), m)`` to int64 codes ``(n, m)``."""
    _check_bits(bits)
    if packed.shape[0] != packed_rows(n, bits):
        raise ValueError(
            f"packed tensor has {packed.shape[0]} rows; {n} codes of {bits} bits need {packed_rows(n, bits)}."
        )
    p = packed.to(torch.int64) & _MASK32
    p = torch.cat([p, torch.zeros_like(p[:1])])
    pos = torch.arange(n, device=packed.device) * bits
    word, offset = pos // 32, pos % 32
    mask = (1 << bits) - 1
    low = p[word] >> offset[:, None]
    high = p[word + 1] << (32 - offset)[:, None]
    spill = (offset + bits > 32)[:, None]
    return torch.where(spill, low | high, low) & mask


@dataclass
class PackedLinear:
    """GPTQ v1 tensors of one linear layer, ready for safetensors."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    in_features: int
    out_features: int

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}


def pack_linear(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> PackedLinear:
    """Pack one layer's codes ``(out, in)``, ``scales``/``zeros`` ``(out, groups)``, ``g_idx`` ``(in,)``."""
    out_f, in_f = codes.shape
    if scales.shape != zeros.shape or scales.shape[0] != out_f:
        raise ValueError(f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must be (out, groups).")
    if g_idx.shape != (in_f,):
        raise ValueError(f"g_idx must have shape ({in_f},); got {tuple(g_idx.shape)}.")
    zm1 = (zeros.to(torch.int64) - 1) & ((1 << bits) - 1)  # v1 stores zero - 1; -1 wraps to maxq
    return PackedLinear(
        qweight=pack_codes(codes.T.contiguous(), bits),
        qzeros=pack_codes(zm1, bits).T.contiguous(),
        scales=scales.T.contiguous().to(torch.float16),
        g_idx=g_idx.to(torch.int32).clone(),
        bits=bits,
        in_features=in_f,
        out_features=out_f,
    )


def pack_quantized(qw: QuantizedWeight) -> PackedLinear:
    """Pack a single-matrix ``QuantizedWeight`` (``codes`` ``(out, in)``)."""
    return pack_linear(qw.codes, qw.scales, qw.zeros, qw.g_idx, qw.bits)


def unpack_linear(
    qweight: torch.Tensor, qzeros: torch.Tensor, bits: int, in_features: int, out_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``(out, in)`` and zero points ``(out, groups)`` (with the v1 +1 undone) from packed tensors."""
    codes = unpack_codes(qweight, in_features, bits).T
    zeros = (unpack_codes(qzeros.T.contiguous(), out_features, bits) + 1) & ((1 << bits) - 1)
    return codes, zeros


def dequantize_packed(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    in_features: int,
    out_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The dense weight ``(out, in)`` a GPTQ v1 layer represents: ``scale[g] * (code - zero[g])``."""
    codes, zeros = unpack_linear(qweight, qzeros, bits, in_features, out_features)
    g = g_idx.long()
    s = scales.float().T[:, g]  # (out, in)
    z = zeros[:, g].float()
    return (s * (codes.float() - z)).to(dtype)
