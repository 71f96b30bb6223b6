"""Checks that a quantization result is a consistent GPTQ checkpoint held by the model (tests only).

``codes.max() <= 2**bits - 1`` proves nothing: every code goes through a clamp to that range. What can fail is
the agreement between the stored pieces and the model: the weight must be the dequantization of the codes on
the stored grid, bit for bit; rounding that weight back on the grid must give the stored codes; the model must
compute with exactly that weight; scales must survive the fp16 the checkpoint stores them in.
"""

from __future__ import annotations

import torch

from vsraq_plugin.models import get_adapter
from vsraq_plugin.quantizer import QuantizedWeight


def model_tensor(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The model's tensor for a result key, as a batch ``(B, out, in)``: an ``nn.Linear`` weight, or a view of
    the fused experts (``...mlp.experts.gate_proj`` / ``up_proj`` / ``down_proj``)."""
    parent, _, leaf = name.rpartition(".")
    if parent.rpartition(".")[2] == "experts" and leaf in ("gate_proj", "up_proj", "down_proj"):
        return get_adapter(model).expert_weights(model.get_submodule(parent))[leaf]
    return model.get_submodule(name).weight[None]


def assert_consistent(name: str, qw: QuantizedWeight) -> None:
    """Codes, grid and weight of one result agree with each other (no model involved)."""
    B, R, _ = qw.codes.shape
    widths = qw.bits_per_matrix if qw.bits_per_matrix is not None else torch.full((B,), qw.bits)
    maxq = (2 ** widths.long() - 1)[:, None, None]
    codes = qw.codes.long()
    assert ((codes >= 0) & (codes <= maxq)).all(), name
    assert ((qw.zeros >= 0) & (qw.zeros <= maxq)).all(), name
    assert (qw.scales > 0).all() and torch.equal(qw.scales, qw.scales.half().float()), name  # fp16-exact
    g = qw.g_idx.long()[:, None, :].expand(B, R, -1)
    s = torch.gather(qw.scales, 2, g)
    z = torch.gather(qw.zeros, 2, g).float()
    # The weight is the dequantized codes, computed as the solver and every GPTQ loader compute it: bit for bit.
    assert torch.equal(s * (codes.float() - z), qw.weight), name
    # ... and rounding it back on the grid gives the stored codes (|weight / s - (c - z)| is a few ulp).
    assert torch.equal(torch.round(qw.weight / s) + z, codes.float()), name
    if qw.prequant is not None:  # the values the solver rounded round to its codes
        q = torch.clamp(torch.round(qw.prequant / s) + z, torch.zeros_like(maxq), maxq)
        assert torch.equal(q, codes.float()), name


def assert_model_holds_the_grid(model: torch.nn.Module, result) -> None:
    """Every quantized target of ``result``: consistent, and the model computes with exactly its weight."""
    assert result.weights, "nothing was quantized"
    for name, qw in result.weights.items():
        assert torch.isfinite(qw.weight).all(), name
        assert_consistent(name, qw)
        assert torch.equal(model_tensor(model, name), qw.weight), name
