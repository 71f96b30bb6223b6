"""OLMoE: softmax over all experts, top-k, renormalised only when ``norm_topk_prob`` (off by default)."""

from .base import MoEAdapter


class OlmoeAdapter(MoEAdapter):
    family = "olmoe"
    model_types = ("olmoe",)

    def num_experts(self) -> int:
        return int(self.config.num_experts)
