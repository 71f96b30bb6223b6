"""Triton kernels that serve GPTQ v1 weights: a dense dequant-GEMM and a fused MoE GEMM.

They run on CUDA; on the CPU they run under ``TRITON_INTERPRET=1`` (correctness only, small shapes).
Import is lazy so the package works where triton is absent.
"""

from __future__ import annotations


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def takes_triton_path(x, force: bool | None) -> bool:
    """Whether a quantized module runs its Triton kernel on ``x``: forced by ``force``, else CUDA fp16/bf16
    activations with triton installed."""
    import torch

    if force is not None:
        return force
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and triton_available()
