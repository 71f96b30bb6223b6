"""Router rules per family, boundary margins, and the routing-agreement metrics (DESIGN 3.2, 4).

Pure functions on tensors. A ``RouterRule`` turns router logits into the family's exact decision:

- ``softmax``: probabilities = softmax(logits); top-k of them; optionally renormalised over the top-k
  (Mixtral always, Qwen/OLMoE when ``norm_topk_prob``). The ranking equals the logits' ranking, so the
  selection scores (what the top-k is taken over, what margins are measured on) are the logits.
- ``sigmoid_group``: DeepSeek-V3. scores = sigmoid(logits); selection = scores + correction bias, restricted
  to the ``topk_group`` expert groups with the highest sum of their two best selections; combine weights are
  the *unbiased* scores of the chosen experts, optionally renormalised, times ``routed_scaling_factor``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RouterRule:
    kind: str  # "softmax" | "sigmoid_group"
    top_k: int
    num_experts: int
    renormalize: bool = False
    n_group: int = 1
    topk_group: int = 1
    scaling: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("softmax", "sigmoid_group"):
            raise ValueError(f"unknown router rule {self.kind!r}; use 'softmax' or 'sigmoid_group'.")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must lie in [1, num_experts={self.num_experts}].")


@dataclass
class Routing:
    """One routing decision per token: the chosen experts, their combine weights, the selection scores."""

    indices: torch.Tensor  # (T, k) long, ordered by selection score, best first
    weights: torch.Tensor  # (T, k) float32 combine weights
    selection: torch.Tensor  # (T, E) float32 scores the top-k is taken over (-inf where masked)


def selection_scores(logits: torch.Tensor, rule: RouterRule, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The per-expert scores whose top-k is the routing decision (see module docstring)."""
    logits = logits.float().reshape(-1, rule.num_experts)
    if rule.kind == "softmax":
        return logits
    scores = logits.sigmoid()
    sel = scores if bias is None else scores + bias.float()
    if rule.n_group > 1 and rule.topk_group < rule.n_group:
        T = sel.shape[0]
        grouped = sel.view(T, rule.n_group, rule.num_experts // rule.n_group)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(rule.topk_group, dim=-1).indices, True)
        sel = sel.masked_fill(~keep.repeat_interleave(rule.num_experts // rule.n_group, dim=1), float("-inf"))
    return sel


def route(logits: torch.Tensor, rule: RouterRule, bias: torch.Tensor | None = None) -> Routing:
    """The family's exact top-k decision and combine weights from router logits ``(..., E)``."""
    logits = logits.float().reshape(-1, rule.num_experts)
    sel = selection_scores(logits, rule, bias)
    indices = sel.topk(rule.top_k, dim=-1).indices
    if rule.kind == "softmax":
        weights = torch.softmax(logits, dim=-1).gather(1, indices)
        if rule.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
    else:
        weights = logits.sigmoid().gather(1, indices)
        if rule.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * rule.scaling
    return Routing(indices=indices, weights=weights, selection=sel)


def boundary_margin(selection: torch.Tensor, k: int) -> torch.Tensor:
    """``m_t = s_(k) - s_(k+1)``: how far the k-th choice sits above the best non-chosen expert (DESIGN 3.2).

    A small margin means a small perturbation flips the top-k set. With every expert chosen (k = E) there
    is no boundary and the margin is +inf.
    """
    if k >= selection.shape[-1]:
        return torch.full(selection.shape[:-1], float("inf"), device=selection.device)
    top = selection.topk(k + 1, dim=-1).values
    margin = top[..., k - 1] - top[..., k]
    return torch.where(torch.isfinite(margin), margin, torch.full_like(margin, float("inf")))


# ---------------------------------------------------------------------------------------------- metrics
def _as_sets(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    mask = torch.zeros(*indices.shape[:-1], num_experts, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, indices.long(), True)


def topk_set_agreement(ref: torch.Tensor, other: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per token: 1.0 where both top-k index sets ``(T, k)`` are identical (order ignored), else 0.0."""
    return (_as_sets(ref, num_experts) == _as_sets(other, num_experts)).all(-1).float()


def topk_overlap(ref: torch.Tensor, other: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per token: ``|S_ref ∩ S_other| / k``."""
    inter = (_as_sets(ref, num_experts) & _as_sets(other, num_experts)).sum(-1)
    return inter.float() / ref.shape[-1]


def top1_agreement(ref_selection: torch.Tensor, other_selection: torch.Tensor) -> torch.Tensor:
    """Per token: 1.0 where the highest-scoring expert is the same."""
    return (ref_selection.argmax(-1) == other_selection.argmax(-1)).float()
