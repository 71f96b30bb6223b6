"""Model adapters and their registry: ``get_adapter(model_or_config)``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .base import (
    EXPERT_PROJECTIONS,
    MoEAdapter,
    MoELayer,
    UnsupportedModelError,
    child_name,
    sequential_stages,
    set_module,
)
from .deepseek_v3 import DeepseekV3Adapter
from .mixtral import MixtralAdapter
from .olmoe import OlmoeAdapter
from .qwen_moe import Qwen2MoeAdapter, Qwen3MoeAdapter

ADAPTERS: dict[str, type[MoEAdapter]] = {
    t: cls
    for cls in (MixtralAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter, OlmoeAdapter, DeepseekV3Adapter)
    for t in cls.model_types
}

# Config fields whose presence (> 0) marks a model as a mixture of experts.
_MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")


def _is_moe(config) -> bool:
    return any(isinstance(getattr(config, f, None), int) and getattr(config, f) > 0 for f in _MOE_FIELDS)


def get_adapter(model_or_config) -> MoEAdapter:
    """The adapter of a model (or its config). Dense models get the generic adapter (no routers)."""
    config = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
    model_type = getattr(config, "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type](config)
    if _is_moe(config):
        raise UnsupportedModelError(
            f"model_type {model_type!r} is a mixture of experts that vsraq-plugin has no adapter for; supported "
            f"MoE families: {sorted(ADAPTERS)}. Add an adapter in vsraq_plugin/models/ (see base.py)."
        )
    return MoEAdapter(config)


@contextmanager
def record_router_logits(layers: Sequence[MoELayer]) -> Iterator[list[list[torch.Tensor]]]:
    """While active, every forward of these MoE layers appends its router logits ``(tokens, E)`` (float32)
    to the list of that layer (same order as ``layers``)."""
    store: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = []
    for slot, layer in enumerate(layers):

        def hook(_module, _inputs, output, slot=slot):
            logits = output[0] if isinstance(output, tuple) else output
            store[slot].append(logits.detach().float().reshape(-1, logits.shape[-1]))

        handles.append(layer.router.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


__all__ = [
    "ADAPTERS",
    "EXPERT_PROJECTIONS",
    "MoEAdapter",
    "MoELayer",
    "UnsupportedModelError",
    "child_name",
    "get_adapter",
    "record_router_logits",
    "sequential_stages",
    "set_module",
]
