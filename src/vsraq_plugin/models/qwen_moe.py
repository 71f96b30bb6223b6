"""Qwen2-MoE (shared expert behind a sigmoid shared-expert gate) and Qwen3-MoE (no shared expert):
softmax over all experts, top-k, renormalised when ``norm_topk_prob``."""

from torch import nn

from .base import MoEAdapter


class Qwen2MoeAdapter(MoEAdapter):
    family = "qwen2_moe"
    model_types = ("qwen2_moe",)

    def num_experts(self) -> int:
        return int(self.config.num_experts)

    def shared_experts(self, mlp: nn.Module) -> nn.Module | None:
        return getattr(mlp, "shared_expert", None)


class Qwen3MoeAdapter(MoEAdapter):
    family = "qwen3_moe"
    model_types = ("qwen3_moe",)

    def num_experts(self) -> int:
        return int(self.config.num_experts)
