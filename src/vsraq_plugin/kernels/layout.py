"""The kernel-friendly layout, made once at load from GPTQ v1 tensors.

2/4/8-bit layers keep GPTQ v1's ``qweight`` as is (``32 / bits`` codes per int32 along the input
dimension). 3-bit codes straddle words, which a tile loader cannot index cheaply, so 3-bit layers are
repacked into a 4-bit container (8 codes per word; code values stay < 8 and the grid is unchanged).
Zero points are unpacked to int32 ``(groups, out)`` with the v1 "+1" undone.

Act-order (a ``g_idx`` that is not ``k // group_size``) is repacked once, here: the input rows are sorted by
group, so every group is a contiguous run of ``group_size`` rows and the kernel reads one scale/zero row per
group; the sort order ``perm`` is kept so the kernel loads activation column ``perm[k]`` for weight row k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..packing import pack_codes, unpack_linear


@dataclass
class KernelWeight:
    qweight: torch.Tensor  # int32 (K * cbits / 32, N), codes along K
    zeros: torch.Tensor  # int32 (G, N)
    scales: torch.Tensor  # fp16 (G, N)
    g_idx: torch.Tensor  # int32 (K,), after the repack always k // group_size
    bits: int  # container bits: 2, 4 or 8
    in_features: int
    out_features: int
    group_size: int = 0  # rows per group after the repack (in_features for one group)
    perm: torch.Tensor | None = None  # int32 (K,): activation column of each weight row; None = identity
    # Stacked experts of different container widths: int32 (E,), each expert's container bits (2, 4 or 8);
    # ``bits`` is then the widest and each expert uses the first ``K * bits_e / 32`` rows of ``qweight``.
    # None: every expert has ``bits`` (the kernel's width is a compile-time constant).
    expert_bits: torch.Tensor | None = None


def container_bits(bits: int) -> int:
    return 4 if bits == 3 else bits


def to_kernel_layout(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    in_features: int,
    out_features: int,
) -> KernelWeight:
    """GPTQ v1 tensors of one linear -> the kernel layout (a pure re-arrangement, values unchanged)."""
    codes, zeros = unpack_linear(qweight, qzeros, bits, in_features, out_features)
    groups = scales.shape[0]
    group_size = in_features // groups
    g = g_idx.long()
    perm = None
    if not torch.equal(g, torch.arange(in_features, device=g.device) // group_size):
        order = torch.argsort(g, stable=True)
        if in_features % groups or not torch.equal(g[order], torch.arange(in_features, device=g.device) // group_size):
            raise NotImplementedError("the kernels need groups of equal size; this g_idx has uneven groups.")
        codes, perm, g_idx = codes[:, order], order.to(torch.int32).contiguous(), g[order]
    cbits = container_bits(bits)
    if perm is not None or cbits != bits or in_features % (32 // cbits):
        pad = (-in_features) % (32 // cbits)
        padded = torch.nn.functional.pad(codes.T, (0, 0, 0, pad))  # (K + pad, N)
        qw = pack_codes(padded, cbits)
    else:
        qw = qweight.clone()
    return KernelWeight(
        qw.contiguous(),
        zeros.T.contiguous().to(torch.int32),
        scales.contiguous(),
        g_idx.to(torch.int32).contiguous(),
        cbits,
        in_features,
        out_features,
        group_size,
        perm,
    )
