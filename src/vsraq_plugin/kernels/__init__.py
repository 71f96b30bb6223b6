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
