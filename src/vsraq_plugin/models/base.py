"""What every MoE family adapter answers: where each layer's router, experts and shared experts live, the
family's exact top-k rule, per-expert views of the fused 3-D expert weights, and checkpoint key names.

transformers 5 stores a layer's experts fused: ``experts.gate_up_proj`` ``(E, 2I, d)`` (gate rows first,
then up rows) and ``experts.down_proj`` ``(E, d, I)``. The per-expert GPTQ checkpoint names them one
linear per expert under the family's original names (DESIGN 5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..routing import RouterRule, Routing, route
from ..validation import InputError

# Expert projections, in true-sequential order (gate/up read the layer input, down reads their product).
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# True-sequential stage of a linear inside attention or an MLP, by its leaf name: a linear is solved only
# after the linears that feed it (MLA: q_a/kv_a -> q_b/kv_b -> o_proj; MLP: gate/up -> down).
_STAGE_OF = {"q_b_proj": 1, "kv_b_proj": 1, "o_proj": 2, "down_proj": 1}


def sequential_stages(linears: dict[str, nn.Linear]) -> list[dict[str, nn.Linear]]:
    """Split named linears into true-sequential stages (module order kept inside a stage)."""
    stages: dict[int, dict[str, nn.Linear]] = {}
    for name, lin in linears.items():
        stages.setdefault(_STAGE_OF.get(name.rsplit(".", 1)[-1], 0), {})[name] = lin
    return [stages[k] for k in sorted(stages)]


def child_name(parent: nn.Module, child: nn.Module) -> str:
    """The attribute name under which ``parent`` holds ``child`` (``mlp.experts``, ``block_sparse_moe.gate``...)."""
    return next(n for n, m in parent.named_children() if m is child)


def set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted module path ``dotted`` under ``root``."""
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


class UnsupportedModelError(InputError):
    """The model is of a family (or structure) vsraq-plugin has no adapter for."""


@dataclass
class MoELayer:
    """Handles to one decoder layer's parts (``router`` is None for a dense layer)."""

    index: int
    layer: nn.Module
    attention: nn.Module
    mlp: nn.Module
    router: nn.Module | None
    experts: nn.Module | None
    shared_experts: nn.Module | None = None
    shared_expert_gate: nn.Module | None = None

    @property
    def is_moe(self) -> bool:
        return self.router is not None


class MoEAdapter:
    """Generic transformers-5 decoder-only adapter; each family overrides what differs."""

    family: str = "dense"
    model_types: tuple[str, ...] = ()
    # Checkpoint name of the MoE block and of the three expert projections, per family (DESIGN 5).
    moe_block_key: str = "mlp"
    expert_key_names: ClassVar[dict[str, str]] = {p: p for p in ("gate_proj", "up_proj", "down_proj")}

    def __init__(self, config) -> None:
        self.config = config

    # ------------------------------------------------------------------ structure
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        base = getattr(model, "model", model)
        layers = getattr(base, "layers", None)
        if layers is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no `model.layers`; vsraq-plugin supports decoder-only causal LMs laid "
                "out as transformers 5's Llama/Mixtral/Qwen families are: add an adapter in vsraq_plugin/models/."
            )
        return layers

    def layers(self, model: nn.Module) -> list[MoELayer]:
        out = []
        for i, layer in enumerate(self.decoder_layers(model)):
            mlp = layer.mlp
            router = getattr(mlp, "gate", None) if hasattr(mlp, "experts") else None
            out.append(
                MoELayer(
                    index=i,
                    layer=layer,
                    attention=layer.self_attn,
                    mlp=mlp,
                    router=router,
                    experts=getattr(mlp, "experts", None) if router is not None else None,
                    shared_experts=self.shared_experts(mlp) if router is not None else None,
                    shared_expert_gate=getattr(mlp, "shared_expert_gate", None) if router is not None else None,
                )
            )
        return out

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        return [layer for layer in self.layers(model) if layer.is_moe]

    def shared_experts(self, mlp: nn.Module) -> nn.Module | None:
        return None

    def attention_linears(self, layer: MoELayer) -> dict[str, nn.Linear]:
        """Attention's linears by their name inside the layer, in true-sequential order."""
        return {f"self_attn.{n}": m for n, m in layer.attention.named_modules() if isinstance(m, nn.Linear)}

    def dense_mlp_linears(self, layer: MoELayer) -> dict[str, nn.Linear]:
        """Linears of a dense MLP, or of the shared experts of a MoE layer, by name inside the layer."""
        module = layer.shared_experts if layer.is_moe else layer.mlp
        if module is None:
            return {}
        prefix = "mlp." + next(n for n, m in layer.mlp.named_children() if m is module) if layer.is_moe else "mlp"
        return {f"{prefix}.{n}": m for n, m in module.named_modules() if isinstance(m, nn.Linear)}

    # ------------------------------------------------------------------ routing
    def router_rule(self) -> RouterRule:
        c = self.config
        return RouterRule("softmax", c.num_experts_per_tok, self.num_experts(), renormalize=bool(c.norm_topk_prob))

    def num_experts(self) -> int:
        return int(self.config.num_local_experts)

    def router_bias(self, router: nn.Module) -> torch.Tensor | None:
        return None

    def route(self, logits: torch.Tensor, router: nn.Module) -> Routing:
        """The family's exact routing decision from this router's logits."""
        return route(logits, self.router_rule(), self.router_bias(router))

    # ------------------------------------------------------------------ experts
    def expert_weights(self, experts: nn.Module) -> dict[str, torch.Tensor]:
        """Per-projection views ``(E, out, in)`` of the fused expert weights (no copies)."""
        inter = experts.down_proj.shape[-1]
        return {
            "gate_proj": experts.gate_up_proj[:, :inter],
            "up_proj": experts.gate_up_proj[:, inter:],
            "down_proj": experts.down_proj,
        }

    def expert_key(self, layer_index: int, expert: int, projection: str) -> str:
        """Checkpoint prefix of one expert projection under the family's original names."""
        name = self.expert_key_names[projection]
        return f"model.layers.{layer_index}.{self.moe_block_key}.experts.{expert}.{name}"

    def checkpoint_name(self, name: str) -> str:
        """A transformers-5 module or parameter name as the family's original checkpoint names it (Mixtral's MoE
        block is ``block_sparse_moe``, transformers 5 calls it ``mlp``)."""
        if self.moe_block_key != "mlp" and ".mlp." in name:
            parts = name.split(".")
            if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
                return name.replace(".mlp.", f".{self.moe_block_key}.", 1)
        return name

    def module_names(self, name: str) -> tuple[str, ...]:
        """The names a GPTQ ``dynamic`` pattern may use for a module: its transformers-5 name, then the checkpoint's
        (when it differs)."""
        native = self.checkpoint_name(name)
        return (name,) if native == name else (name, native)

    def router_key(self, layer_index: int) -> str:
        return f"model.layers.{layer_index}.{self.moe_block_key}.gate"
