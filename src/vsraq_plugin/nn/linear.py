"""``QuantLinear``: a linear layer stored as GPTQ v1 tensors (torch dequantize path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..packing import dequantize_packed, packed_rows


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as GPTQ v1 ``qweight``/``qzeros``/``scales``/``g_idx``.

    The CPU path dequantizes to the activation dtype and calls ``F.linear``: the result is bit for bit the
    one of an ``nn.Linear`` holding the dequantized weight. The kernel issue adds a Triton path on CUDA.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size
        groups = 1 if group_size == -1 else in_features // group_size
        self.register_buffer("qweight", torch.zeros(packed_rows(in_features, bits), out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, packed_rows(out_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_packed(
            self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.in_features, self.out_features, dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )
