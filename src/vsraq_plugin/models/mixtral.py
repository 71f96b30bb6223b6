"""Mixtral: softmax over all experts, top-k, always renormalised; checkpoints name experts w1/w3/w2."""

from typing import ClassVar

from ..routing import RouterRule
from .base import MoEAdapter


class MixtralAdapter(MoEAdapter):
    family = "mixtral"
    model_types = ("mixtral",)
    moe_block_key = "block_sparse_moe"
    expert_key_names: ClassVar[dict[str, str]] = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}

    def router_rule(self) -> RouterRule:
        return RouterRule("softmax", self.config.num_experts_per_tok, self.num_experts(), renormalize=True)
