"""The uniform integer grid with GPTQ's conventions: per-(row, group) scale and zero point, sym or asym.

Conventions (those of the GPTQ reference ``quant.py``, which every GPTQ v1 loader assumes):
the range always contains 0 (``xmin <= 0 <= xmax``); an all-zero group gets the range [-1, 1];
``sym`` uses ``zero = (maxq + 1) / 2``; codes are ``clamp(round(x / scale) + zero, 0, maxq)`` and
dequantize to ``scale * (code - zero)``. Scales are rounded to fp16 here, because fp16 is what the
checkpoint stores: the weight the solver sees is then exactly the weight a loader reconstructs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .validation import InputError

# Smallest positive fp16 (a subnormal); a smaller scale would be stored as 0.
_FP16_TINY = 2.0**-24


def all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN or Inf. A sum is NaN or Inf whenever an element is, so a finite sum in ``t``'s
    own precision settles it (a reduction, far cheaper than materialising ``isfinite``; 10x cheaper than a float64
    sum, which converts every element); only a sum that overflowed is redone in float64, finite exactly when no
    element is NaN or Inf (for |t| < 1e300)."""
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


def maxq_for(bits: int) -> int:
    return (1 << bits) - 1


def compute_qparams(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point over the last dimension of ``w`` (one group per leading index).

    Returns ``scale`` (float32, fp16-representable) and ``zero`` (float32 holding an integer in
    ``[0, maxq]``), both shaped ``w.shape[:-1]``.
    """
    xmin, xmax = _range(w, sym)
    return _range_qparams(xmin, xmax, maxq_for(bits), sym)


def _range(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid's range over the last dimension: always holding 0, symmetric with ``sym``, [-1, 1] when empty."""
    w = w.float()
    xmin = w.amin(dim=-1).clamp(max=0)
    xmax = w.amax(dim=-1).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    return xmin, xmax


def _range_qparams(
    xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool, check: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-exact) and zero of the grid over ``[xmin, xmax]``; ``check``: refuse a scale fp16 cannot hold
    (a host read: a narrower range of the same group needs no second one)."""
    scale = ((xmax - xmin) / maxq).clamp(min=_FP16_TINY).half().float()
    if check and not torch.isfinite(scale).all():
        raise InputError(
            "a weight group's range overflows the fp16 scale of the GPTQ format (|w| > ~1e6); "
            "check the model's weights for corruption."
        )
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


# The clipping search (``mse``): candidate ranges from the full one down to ``MSE_MIN_SHRINK`` of it, in
# ``MSE_STEPS`` equal steps (40 steps down to 0.4 did as well on tiny-qwen3-moe W3: within 0.1 points of agreement).
MSE_STEPS = 20
MSE_MIN_SHRINK = 0.6


def search_qparams(w: torch.Tensor, bits: int, sym: bool, norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``compute_qparams`` with each group's range shrunk by the factor (1 down to ``MSE_MIN_SHRINK``) that gives
    the least ``sum_j |w_j - deq(q(w_j))|^norm`` over the last dimension: the clipping search of the GPTQ
    reference's ``mse`` option and gptqmodel's ``mse``. A large weight clipped costs less than a coarser grid for
    every other weight of its group; ``norm`` > 2 leans toward keeping the large ones."""
    maxq = maxq_for(bits)
    w = w.float()
    xmin, xmax = _range(w, sym)
    best = scale = zero = None
    for i, p in enumerate(torch.linspace(1.0, MSE_MIN_SHRINK, MSE_STEPS).tolist()):
        s, z = _range_qparams(p * xmin, p * xmax, maxq, sym, check=i == 0)
        q = nearest_codes(w, s[..., None], z[..., None], maxq)
        err = (s[..., None] * (q - z[..., None]) - w).abs_().pow_(norm).sum(-1)
        if best is None:
            best, scale, zero = err, s, z
        else:
            better = err < best  # ties keep the wider range (the earlier candidate)
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def grid_params(w: torch.Tensor, bits: int, sym: bool, mse: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The group grids of ``w`` (last dimension): the full range (``mse`` = 0, stock GPTQ) or the clipping search
    in the ``mse`` norm."""
    return compute_qparams(w, bits, sym) if not mse else search_qparams(w, bits, sym, mse)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` on the grid (``scale``/``zero`` broadcast against ``w``), as float32."""
    return nearest_codes(w.float(), scale, zero, maxq_for(bits))


def nearest_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """``quantize`` with the largest code given and ``w``'s dtype kept (float64 references use it too)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes.float() - zero)


@dataclass
class QuantizedWeight:
    """A weight on the GPTQ grid. ``scales``/``zeros`` are ``(..., rows, groups)``; ``g_idx`` maps each
    input column to its group; ``weight`` is the dequantized float32 weight."""

    codes: torch.Tensor  # (..., rows, in) uint8
    scales: torch.Tensor  # (..., rows, groups) float32, fp16-representable
    zeros: torch.Tensor  # (..., rows, groups) int32
    g_idx: torch.Tensor  # (..., in) int32
    weight: torch.Tensor | None  # (..., rows, in) float32 (None: codes only, ``solve.dequantize_grid`` rebuilds it)
    bits: int
    group_size: int
    bits_per_matrix: torch.Tensor | None = None  # (B,) when the matrices of a batch have different widths
    # The values the solver rounded (GPTQ's compensated weights), kept only on request: where refinement
    # (refine.py) starts from, since round(prequant / scale) + zero == codes.
    prequant: torch.Tensor | None = None


def group_count(in_features: int, group_size: int) -> int:
    if group_size == -1:
        return 1
    if in_features % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the input dimension {in_features}; "
            "choose a group size that divides it, or -1."
        )
    return in_features // group_size


def rtn(w: torch.Tensor, bits: int, group_size: int = -1, sym: bool = True, mse: float = 0.0) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w`` (``(..., rows, in)``) with contiguous groups, on grids from the full
    range or (``mse`` > 0) from the clipping search in that norm, as the GPTQ solve makes them."""
    *lead, rows, cols = w.shape
    if not all_finite(w):
        raise ValueError("the weight holds NaN or Inf values; it cannot be quantized.")
    groups = group_count(cols, group_size)
    gs = cols // groups
    wg = w.float().reshape(*lead, rows, groups, gs)
    scale, zero = grid_params(wg, bits, sym, mse)
    codes = quantize(wg, scale[..., None], zero[..., None], bits)
    deq = dequantize(codes, scale[..., None], zero[..., None]).reshape(*lead, rows, cols)
    g_idx = (torch.arange(cols, device=w.device) // gs).to(torch.int32).expand(*lead, cols).contiguous()
    return QuantizedWeight(
        codes=codes.reshape(*lead, rows, cols).to(torch.uint8),
        scales=scale,
        zeros=zero.to(torch.int32),
        g_idx=g_idx,
        weight=deq,
        bits=bits,
        group_size=group_size,
    )
