"""Model-level quantization: which weights get quantized, in which order, and with which method.

The quantization targets of a decoder layer, in true-sequential order (DESIGN 3.2): attention linears,
then (MoE layers) the experts' gate/up and down projections as batched ``(E, out, in)`` views of the fused
weights, then shared experts or the dense MLP. Routers, norms, embeddings and ``lm_head`` stay in 16 bits.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .models import EXPERT_PROJECTIONS, MoEAdapter, MoELayer, get_adapter
from .quantizer import QuantizedWeight, rtn


@dataclass
class Target:
    """One batch of same-shape weights to quantize: ``weight`` is ``(B, out, in)`` (a view into the model)."""

    name: str  # module path inside the model, e.g. "model.layers.0.mlp.experts.down_proj"
    weight: torch.Tensor
    kind: str  # "attention" | "expert" | "shared" | "mlp"


def layer_targets(adapter: MoEAdapter, layer: MoELayer) -> Iterator[Target]:
    """The quantization targets of one decoder layer, in true-sequential order."""
    prefix = f"model.layers.{layer.index}"
    for name, lin in adapter.attention_linears(layer).items():
        yield Target(f"{prefix}.{name}", lin.weight[None], "attention")
    if layer.is_moe:
        views = adapter.expert_weights(layer.experts)
        for proj in EXPERT_PROJECTIONS:
            yield Target(f"{prefix}.mlp.experts.{proj}", views[proj], "expert")
    for name, lin in adapter.dense_mlp_linears(layer).items():
        yield Target(f"{prefix}.{name}", lin.weight[None], "shared" if layer.is_moe else "mlp")


def _group_size_for(config: QuantConfig, name: str, in_features: int) -> int:
    config.check_in_features(in_features, name)
    return config.group_size


@torch.no_grad()
def quantize_rtn(model: nn.Module, config: QuantConfig, progress: bool = True) -> dict[str, QuantizedWeight]:
    """Round-to-nearest every target in place (the model then computes with the dequantized weights).

    Returns the quantized weights by target name (codes, scales, zeros, ``g_idx``) for packing.
    """
    adapter = get_adapter(model)
    results: dict[str, QuantizedWeight] = {}
    layers = adapter.layers(model)
    for layer in tqdm(layers, desc=f"rtn W{config.bits}g{config.group_size}", unit="layer", disable=not progress):
        for target in layer_targets(adapter, layer):
            gs = _group_size_for(config, target.name, target.weight.shape[-1])
            qw = rtn(target.weight.float(), config.bits, gs, config.sym)
            target.weight.copy_(qw.weight.to(target.weight.dtype))
            results[target.name] = qw
    return results
