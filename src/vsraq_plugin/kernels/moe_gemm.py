"""Fused MoE GEMM over GPTQ experts (the layout of vLLM's ``fused_moe``): every (token, expert) slot is
sorted by expert and padded to the block size, so one launch runs every expert's GEMM; each program owns
``BLOCK_M`` slots of one expert. Gate/up is one launch, down another, with the routing weight applied in
the down launch's epilogue; the per-token sum over the top-k slots is a reshape-and-sum.

Mixed precision (experts of one layer at different widths) keeps the two launches: ``stack_experts`` pads
every expert to the widest container and records each expert's width in an int32 table, and the kernel,
compiled with ``BITS = 0``, reads its block's width from the table and unpacks with runtime shifts. A
uniform layer keeps the width as a compile-time constant.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gptq_gemm import _dequant_tile, dot_dtype, group_tiling, tl_dtype
from .layout import KernelWeight


def align_slots(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots ``t * k + j`` grouped by expert, each group padded to a multiple of ``block_m`` with the
    sentinel ``T * k``; returns the padded slot order and the expert of each block (empty experts get none).
    Slots whose expert id is negative are left out (a launch over a subset of the experts)."""
    flat = topk_ids.reshape(-1).long()
    sentinel = flat.numel()
    kept = (flat >= 0).nonzero().flatten()
    ids = flat[kept]
    counts = torch.bincount(ids, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    order = kept[torch.argsort(ids, stable=True)]
    out = torch.full((int(padded.sum()),), sentinel, dtype=torch.int64, device=flat.device)
    starts = torch.cumsum(padded, 0) - padded
    pos = starts.repeat_interleave(counts) + (
        torch.arange(ids.numel(), device=flat.device) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    )
    out[pos] = order
    block_expert = torch.arange(num_experts, device=flat.device).repeat_interleave(padded // block_m)
    return out, block_expert


@triton.jit
def _moe_kernel(
    a_ptr,
    qw_ptr,
    z_ptr,
    s_ptr,
    perm_ptr,
    bits_ptr,
    out_ptr,
    slots_ptr,
    block_expert_ptr,
    rw_ptr,
    num_slots,
    N,
    K,
    TOP_K: tl.constexpr,
    stride_am,
    stride_ak,
    stride_qe,
    stride_qk,
    stride_qn,
    stride_ze,
    stride_zg,
    stride_se,
    stride_sg,
    stride_pe,
    stride_om,
    stride_on,
    A_PER_SLOT: tl.constexpr,
    MUL_ROUTED: tl.constexpr,
    FUSE_SILU: tl.constexpr,
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
    e = tl.load(block_expert_ptr + pid_m)
    slots = tl.load(slots_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = slots < num_slots
    rows = slots if A_PER_SLOT else slots // TOP_K
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    qw_e = qw_ptr + e * stride_qe
    z_e = z_ptr + e * stride_ze
    s_e = s_ptr + e * stride_se
    p_e = perm_ptr + e * stride_pe
    # Mixed widths (BITS = 0): this block's expert's container width, read once from the per-expert table.
    cbits = tl.load(bits_ptr + e) if BITS == 0 else 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # FUSE_SILU: the weight is [gate; up] along N (2 * N columns); this program also accumulates the up
    # columns rn + N and writes silu(gate) * up, so the (slots, 2N) intermediate never reaches memory.
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    N_W = 2 * N if FUSE_SILU else N
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        ka = tl.load(p_e + k, mask=k < K, other=0) if HAS_PERM else k  # act-order: this expert's column order
        a = tl.load(
            a_ptr + rows[:, None] * stride_am + ka[None, :] * stride_ak,
            mask=valid[:, None] & (k < K)[None, :],
            other=0.0,
        )
        w = _dequant_tile(
            qw_e,
            z_e,
            s_e,
            k0,
            k,
            rn,
            K,
            N_W,
            stride_qk,
            stride_qn,
            stride_zg,
            stride_sg,
            cbits,
            BITS,
            GROUP_SIZE,
            TILE_IN_GROUP,
            DTYPE,
        )
        a_dot = a.to(DTYPE).to(DOT_DTYPE)
        acc += tl.dot(a_dot, w.to(DOT_DTYPE), out_dtype=tl.float32)
        if FUSE_SILU:
            w_up = _dequant_tile(
                qw_e,
                z_e,
                s_e,
                k0,
                k,
                rn + N,
                K,
                N_W,
                stride_qk,
                stride_qn,
                stride_zg,
                stride_sg,
                cbits,
                BITS,
                GROUP_SIZE,
                TILE_IN_GROUP,
                DTYPE,
            )
            acc_up += tl.dot(a_dot, w_up.to(DOT_DTYPE), out_dtype=tl.float32)
    if FUSE_SILU:
        # Round gate and up to the activation dtype first, as the unfused path's (slots, 2N) store does.
        g = acc.to(DTYPE).to(tl.float32)
        acc = g * tl.sigmoid(g) * acc_up.to(DTYPE).to(tl.float32)
    if MUL_ROUTED:
        rw = tl.load(rw_ptr + slots, mask=valid, other=0.0).to(tl.float32)
        acc = acc * rw[:, None]
    tl.store(
        out_ptr + slots[:, None] * stride_om + rn[None, :] * stride_on,
        acc.to(DTYPE),
        mask=valid[:, None] & (rn < N)[None, :],
    )


def stack_experts(weights: list[KernelWeight]) -> KernelWeight:
    """One ``KernelWeight`` with a leading expert dimension (all experts of one projection, same shape and
    group size). Experts of different container widths are padded to the widest and get an ``expert_bits``
    table, so they still share one launch."""
    w0 = weights[0]
    key = (w0.in_features, w0.out_features, w0.group_size)
    if any((w.in_features, w.out_features, w.group_size) != key for w in weights):
        raise ValueError("experts of one fused launch must share shape and group size.")
    if any(w.expert_bits is not None for w in weights):
        raise ValueError("stack single experts, not already stacked ones.")
    widths = [w.bits for w in weights]
    rows = max(w.qweight.shape[0] for w in weights)
    # Each expert's packed rows first, zero rows after: a narrower expert never reads past its own rows.
    qweight = torch.stack([torch.nn.functional.pad(w.qweight, (0, 0, 0, rows - w.qweight.shape[0])) for w in weights])
    perms = None
    if any(w.perm is not None for w in weights):
        ident = torch.arange(w0.in_features, dtype=torch.int32, device=w0.g_idx.device)
        perms = torch.stack([w.perm if w.perm is not None else ident for w in weights])
    table = None
    if len(set(widths)) > 1:
        table = torch.tensor(widths, dtype=torch.int32, device=qweight.device)
    return KernelWeight(
        qweight,
        torch.stack([w.zeros for w in weights]),
        torch.stack([w.scales for w in weights]),
        torch.stack([w.g_idx for w in weights]),
        max(widths),
        w0.in_features,
        w0.out_features,
        w0.group_size,
        perms,
        table,
    )


def moe_gemm(
    a: torch.Tensor,
    w: KernelWeight,
    slots: torch.Tensor,
    block_expert: torch.Tensor,
    num_slots: int,
    top_k: int,
    a_per_slot: bool,
    routed_weights: torch.Tensor | None = None,
    block_m: int = 16,
    block_n: int = 64,
    block_k: int = 64,
    fuse_silu: bool = False,
) -> torch.Tensor:
    """One launch over every expert: rows of ``a`` (tokens, or slots when ``a_per_slot``) times each slot's
    expert weight; returns ``(num_slots, N)`` (slot order ``t * k + j``). ``fuse_silu``: ``w`` is [gate; up]
    and the result is ``silu(gate) * up``, ``(num_slots, N / 2)``."""
    N, K = w.out_features, w.in_features
    if fuse_silu:
        N //= 2
    out = torch.zeros(num_slots, N, dtype=a.dtype, device=a.device)
    if slots.numel() == 0:
        return out
    rw = routed_weights.reshape(-1).contiguous() if routed_weights is not None else out
    grid = (slots.numel() // block_m, triton.cdiv(N, block_n))
    block_k, tile_in_group = group_tiling(block_k, w.group_size)
    perm = w.perm if w.perm is not None else w.g_idx
    table = w.expert_bits if w.expert_bits is not None else w.g_idx  # unread when the width is uniform
    _moe_kernel[grid](
        a,
        w.qweight,
        w.zeros,
        w.scales,
        perm,
        table,
        out,
        slots,
        block_expert,
        rw,
        num_slots,
        N,
        K,
        top_k,
        a.stride(0),
        a.stride(1),
        w.qweight.stride(0),
        w.qweight.stride(1),
        w.qweight.stride(2),
        w.zeros.stride(0),
        w.zeros.stride(1),
        w.scales.stride(0),
        w.scales.stride(1),
        perm.stride(0),
        out.stride(0),
        out.stride(1),
        A_PER_SLOT=a_per_slot,
        MUL_ROUTED=routed_weights is not None,
        FUSE_SILU=fuse_silu,
        BITS=0 if w.expert_bits is not None else w.bits,
        GROUP_SIZE=w.group_size,
        TILE_IN_GROUP=tile_in_group,
        HAS_PERM=w.perm is not None,
        DTYPE=tl_dtype(a.dtype),
        DOT_DTYPE=dot_dtype(a.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return out


def fused_moe(
    x: torch.Tensor,
    gate_up: KernelWeight,
    down: KernelWeight,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    act=torch.nn.functional.silu,
    block_m: int = 16,
    fuse_act: bool | None = None,
) -> torch.Tensor:
    """The whole MoE block's experts: ``sum_j w_tj * down_e(act(gate_e(x_t)) * up_e(x_t))``, two launches.

    ``fuse_act`` (default: when ``act`` is SiLU) applies ``silu(gate) * up`` in the gate/up launch's
    epilogue; other activations run between the launches in torch."""
    T, k = topk_ids.shape
    E = gate_up.qweight.shape[0]
    slots, block_expert = align_slots(topk_ids, E, block_m)
    silu = act is torch.nn.functional.silu or isinstance(act, torch.nn.SiLU)
    if fuse_act and not silu:
        raise ValueError(f"fuse_act=True needs a SiLU activation, got {act!r}.")
    if silu if fuse_act is None else fuse_act:
        inter = moe_gemm(x, gate_up, slots, block_expert, T * k, k, a_per_slot=False, block_m=block_m, fuse_silu=True)
    else:
        h = moe_gemm(x, gate_up, slots, block_expert, T * k, k, a_per_slot=False, block_m=block_m)
        g, u = h.chunk(2, dim=-1)
        inter = (act(g.float()) * u.float()).to(x.dtype)
    y = moe_gemm(
        inter,
        down,
        slots,
        block_expert,
        T * k,
        k,
        a_per_slot=True,
        routed_weights=topk_weights.to(x.dtype),
        block_m=block_m,
    )
    return y.view(T, k, -1).float().sum(1).to(x.dtype)
