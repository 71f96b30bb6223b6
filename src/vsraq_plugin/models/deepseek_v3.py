"""DeepSeek-V3: sigmoid scores + correction bias, group-limited top-k, shared experts, first layers dense.

The bias only steers the *selection*; the combine weights are the unbiased sigmoid scores (renormalised when
``norm_topk_prob``) times ``routed_scaling_factor``. Margins are measured on the selection scores.
"""

import torch
from torch import nn

from ..routing import RouterRule
from .base import MoEAdapter


class DeepseekV3Adapter(MoEAdapter):
    family = "deepseek_v3"
    model_types = ("deepseek_v3",)

    def num_experts(self) -> int:
        return int(self.config.n_routed_experts)

    def router_rule(self) -> RouterRule:
        c = self.config
        return RouterRule(
            "sigmoid_group",
            c.num_experts_per_tok,
            self.num_experts(),
            renormalize=bool(c.norm_topk_prob),
            n_group=int(c.n_group),
            topk_group=int(c.topk_group),
            scaling=float(c.routed_scaling_factor),
        )

    def router_bias(self, router: nn.Module) -> torch.Tensor | None:
        return router.e_score_correction_bias

    def shared_experts(self, mlp: nn.Module) -> nn.Module | None:
        return getattr(mlp, "shared_experts", None)
