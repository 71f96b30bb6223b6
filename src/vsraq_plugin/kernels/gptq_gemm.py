"""Dequant-GEMM for GPTQ weights: ``y = x @ W^T`` with W held as packed 2/4/8-bit codes (3-bit through the
4-bit container of ``layout.py``), per-group fp16 scales and int zero points, fp16/bf16 activations, fp32
accumulation. One kernel body serves the dense layer and the fused MoE GEMM (``moe_gemm.py``).

Tiles: the weight tile ``(BLOCK_K, BLOCK_N)`` is unpacked in registers (``(word >> shift) & mask``), its
group read per input row from ``g_idx`` (act-order needs no reordering), dequantized and fed to ``tl.dot``.
Small M (decode) and large M (prefill) use different tile shapes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .layout import KernelWeight


@triton.jit
def _dequant_tile(
    qw_ptr,
    z_ptr,
    s_ptr,
    g_ptr,
    k,
    rn,
    K,
    N,
    stride_qk,
    stride_qn,
    stride_zg,
    stride_sg,
    BITS: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """The dequantized weight tile ``(BLOCK_K, BLOCK_N)`` for input rows ``k`` and output columns ``rn``."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    kmask = k < K
    nmask = rn < N
    m2 = kmask[:, None] & nmask[None, :]
    words = tl.load(qw_ptr + (k // PACK)[:, None] * stride_qk + rn[None, :] * stride_qn, mask=m2, other=0)
    codes = (words >> ((k % PACK) * BITS)[:, None]) & MASK
    g = tl.load(g_ptr + k, mask=kmask, other=0)
    s = tl.load(s_ptr + g[:, None] * stride_sg + rn[None, :], mask=m2, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g[:, None] * stride_zg + rn[None, :], mask=m2, other=0)
    return ((codes - z).to(tl.float32) * s).to(DTYPE)


@triton.jit
def _dense_kernel(
    x_ptr,
    qw_ptr,
    z_ptr,
    s_ptr,
    g_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_qk,
    stride_qn,
    stride_zg,
    stride_sg,
    stride_om,
    stride_on,
    BITS: tl.constexpr,
    DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + k[None, :] * stride_xk,
            mask=(rm < M)[:, None] & (k < K)[None, :],
            other=0.0,
        )
        w = _dequant_tile(
            qw_ptr, z_ptr, s_ptr, g_ptr, k, rn, K, N, stride_qk, stride_qn, stride_zg, stride_sg, BITS, DTYPE
        )
        acc += tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), out_dtype=tl.float32)
    tl.store(
        out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
        acc.to(DTYPE),
        mask=(rm < M)[:, None] & (rn < N)[None, :],
    )


def dot_dtype(dtype: torch.dtype):
    """The operand type of ``tl.dot``: the activation type, except bf16 under ``TRITON_INTERPRET=1``, whose
    CPU emulation of a bf16 dot is wrong in triton 3.9 (the operands, already bf16-rounded, go as fp32)."""
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32
    return tl_dtype(dtype)


def tl_dtype(dtype: torch.dtype):
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16:
        return tl.bfloat16
    raise TypeError(f"activations must be fp16 or bf16 for the GPTQ kernels; got {dtype}.")


def tile_config(M: int) -> dict[str, int]:
    """Decode (small M) favours wide N/K tiles and one M tile; prefill square-ish tiles."""
    if M <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}
    if M <= 64:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}


def dequant_gemm(x: torch.Tensor, w: KernelWeight, config: dict[str, int] | None = None) -> torch.Tensor:
    """``x @ W^T`` for ``x`` ``(..., K)`` fp16/bf16; returns ``(..., N)`` in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    M, K = x2.shape
    if w.in_features != K:
        raise ValueError(f"x has {K} features; the layer expects {w.in_features}.")
    N = w.out_features
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    cfg = config or tile_config(M)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _dense_kernel[grid](
        x2,
        w.qweight,
        w.zeros,
        w.scales,
        w.g_idx,
        out,
        M,
        N,
        K,
        x2.stride(0),
        x2.stride(1),
        w.qweight.stride(0),
        w.qweight.stride(1),
        w.zeros.stride(0),
        w.scales.stride(0),
        out.stride(0),
        out.stride(1),
        BITS=w.bits,
        DTYPE=tl_dtype(x.dtype),
        DOT_DTYPE=dot_dtype(x.dtype),
        **cfg,
    )
    return out.reshape(*lead, N)
