"""The kernel-friendly layout, made once at load from GPTQ v1 tensors.

2/4/8-bit layers keep GPTQ v1's ``qweight`` as is (``32 / bits`` codes per int32 along the input
dimension). 3-bit codes straddle words, which a tile loader cannot index cheaply, so 3-bit layers are
repacked into a 4-bit container (8 codes per word; code values stay < 8 and the grid is unchanged).
Zero points are unpacked to int32 ``(groups, out)`` with the v1 "+1" undone. ``g_idx`` is kept: the kernel
reads each input row's group from it, so act-order checkpoints need no reordering of weights or activations.
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
    g_idx: torch.Tensor  # int32 (K,)
    bits: int  # container bits: 2, 4 or 8
    in_features: int
    out_features: int


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
    cbits = container_bits(bits)
    if cbits != bits or in_features % (32 // cbits):
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
    )
