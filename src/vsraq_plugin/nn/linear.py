"""``QuantLinear``: a linear layer stored as GPTQ v1 tensors (torch dequantize path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import takes_triton_path
from ..packing import dequantize_packed, packed_rows


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as GPTQ v1 ``qweight``/``qzeros``/``scales``/``g_idx``.

    On CUDA (fp16/bf16 activations, triton installed) it runs the Triton dequant-GEMM on a kernel layout
    made once, at first use, from the GPTQ v1 tensors. Elsewhere it dequantizes to the activation dtype and
    calls ``F.linear``: bit for bit an ``nn.Linear`` holding the dequantized weight. ``use_triton`` forces
    either path (True also works on the CPU under ``TRITON_INTERPRET=1``, for tests).
    """

    use_triton: bool | None = None

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

    def _triton_path(self, x: torch.Tensor) -> bool:
        return takes_triton_path(x, self.use_triton)

    def kernel_weight(self):
        """The kernel layout of this layer's weight, built once (``kernels/layout.py``)."""
        if getattr(self, "_kernel_weight", None) is None:
            from ..kernels.layout import to_kernel_layout

            self._kernel_weight = to_kernel_layout(
                self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.in_features, self.out_features
            )
        return self._kernel_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._triton_path(x):
            from ..kernels.gptq_gemm import dequant_gemm

            y = dequant_gemm(x, self.kernel_weight())
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )
