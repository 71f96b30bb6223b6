"""Dequant-GEMM for GPTQ weights: ``y = x @ W^T`` with W held as packed 2/4/8-bit codes (3-bit through the
4-bit container of ``layout.py``), per-group fp16 scales and int zero points, fp16/bf16 activations, fp32
accumulation. One kernel body serves the dense layer and the fused MoE GEMM (``moe_gemm.py``).

Tiles: the weight tile ``(BLOCK_K, BLOCK_N)`` is unpacked in registers (``(word >> shift) & mask``),
dequantized with one scale row and one zero row when the K tile lies inside a group (the K tile is sized
for that), and fed to ``tl.dot``. Act-order layers were repacked at load so groups are contiguous; the
kernel then reads activation column ``perm[k]`` for weight row k. Small M (decode) and large M (prefill)
use different tile shapes.
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
    k0,
    k,
    rn,
    K,
    N,
    stride_qk,
    stride_qn,
    stride_zg,
    stride_sg,
    cbits,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    TILE_IN_GROUP: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """The dequantized weight tile ``(BLOCK_K, BLOCK_N)`` for input rows ``k`` and output columns ``rn``.

    Groups are contiguous runs of ``GROUP_SIZE`` rows (act-order was repacked at load). When the K tile
    lies inside one group (``TILE_IN_GROUP``) one scale row and one zero row serve the whole tile.
    ``BITS = 0``: the container width is the runtime scalar ``cbits`` (2, 4 or 8; a mixed-width MoE launch).
    """
    kmask = k < K
    nmask = rn < N
    m2 = kmask[:, None] & nmask[None, :]
    if BITS == 0:
        # Widths are powers of two (3-bit lives in the 4-bit container), so with lb = log2(cbits) a word holds
        # 32 >> lb codes: row k // PACK = k >> (5 - lb), code k % PACK = k & (PACK - 1) at bit (k % PACK) << lb.
        # Shifts and ands only; lb is a scalar (cbits in {2, 4, 8} -> 1, 2, 3).
        lb = 1 + (cbits > 2).to(tl.int32) + (cbits > 4).to(tl.int32)
        row = k >> (5 - lb)
        shift = (k & ((32 >> lb) - 1)) << lb
        mask = (1 << cbits) - 1
    else:
        PACK: tl.constexpr = 32 // BITS
        row = k // PACK
        shift = (k % PACK) * BITS
        mask = (1 << BITS) - 1
    words = tl.load(qw_ptr + row[:, None] * stride_qk + rn[None, :] * stride_qn, mask=m2, other=0)
    codes = (words >> shift[:, None]) & mask
    if TILE_IN_GROUP:
        g = k0 // GROUP_SIZE
        s = tl.load(s_ptr + g * stride_sg + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        z = tl.load(z_ptr + g * stride_zg + rn, mask=nmask, other=0)[None, :]
    else:
        g = k // GROUP_SIZE
        s = tl.load(s_ptr + g[:, None] * stride_sg + rn[None, :], mask=m2, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g[:, None] * stride_zg + rn[None, :], mask=m2, other=0)
    return ((codes - z).to(tl.float32) * s).to(DTYPE)


@triton.jit
def _dense_kernel(
    x_ptr,
    qw_ptr,
    z_ptr,
    s_ptr,
    perm_ptr,
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
    GROUP_SIZE: tl.constexpr,
    TILE_IN_GROUP: tl.constexpr,
    HAS_PERM: tl.constexpr,
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
        kx = tl.load(perm_ptr + k, mask=k < K, other=0) if HAS_PERM else k  # act-order: x column of row k
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + kx[None, :] * stride_xk,
            mask=(rm < M)[:, None] & (k < K)[None, :],
            other=0.0,
        )
        w = _dequant_tile(
            qw_ptr,
            z_ptr,
            s_ptr,
            k0,
            k,
            rn,
            K,
            N,
            stride_qk,
            stride_qn,
            stride_zg,
            stride_sg,
            0,
            BITS,
            GROUP_SIZE,
            TILE_IN_GROUP,
            DTYPE,
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


def group_tiling(block_k: int, group_size: int) -> tuple[int, bool]:
    """A K tile that lies inside one group when possible (one scale row per tile), else per-row groups."""
    bk = block_k
    while bk > 16 and group_size % bk:
        bk //= 2
    if group_size % bk == 0:
        return bk, True
    return block_k, False


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
    block_k, tile_in_group = group_tiling(cfg["BLOCK_K"], w.group_size)
    cfg = {**cfg, "BLOCK_K": block_k}
    _dense_kernel[grid](
        x2,
        w.qweight,
        w.zeros,
        w.scales,
        w.perm if w.perm is not None else w.g_idx,
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
        GROUP_SIZE=w.group_size,
        TILE_IN_GROUP=tile_in_group,
        HAS_PERM=w.perm is not None,
        DTYPE=tl_dtype(x.dtype),
        DOT_DTYPE=dot_dtype(x.dtype),
        **cfg,
    )
    return out.reshape(*lead, N)
