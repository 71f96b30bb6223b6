"""Expert-wise mixed precision (DESIGN 6): which experts get more bits, under an exact average budget.

Scores, per expert of one MoE layer:
- router-norm change ``| ||r_e(final)|| - ||r_e(init)|| |``: experts whose router row changed *least* during
  training capture rare but critical features and are the most sensitive, so they rank first for bits.
  Without the router at initialisation the final row norm stands in (smaller = more sensitive) and the
  caller is told so.
- maximum intra-neuron variance: the variance of a neuron's weights (one row of gate/up/down), maximised
  over the expert's neurons. Experts above ``promote_factor`` x the layer's median are promoted ahead of the
  rest: low precision would inject large noise there.

Allocation: the counts per level meet the average budget exactly (an error says when they cannot), as close
to equal counts as the budget allows; the most sensitive experts get the widest level.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ConfigError


@dataclass
class ExpertScores:
    router_change: torch.Tensor  # (E,) smaller = more sensitive
    max_variance: torch.Tensor  # (E,)
    used_router_init: bool


def router_norm_change(router_final: torch.Tensor, router_init: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """``| ||r_e|| - ||r_e^0|| |`` per expert, or the final row norm when no initial router exists."""
    final = router_final.float().norm(dim=-1)
    if router_init is None:
        return final, False
    if router_init.shape != router_final.shape:
        raise ValueError(
            f"router_init has shape {tuple(router_init.shape)}, the router {tuple(router_final.shape)}; "
            "router_init.safetensors belongs to another model."
        )
    return (final - router_init.float().norm(dim=-1)).abs(), True


def max_intra_neuron_variance(expert_weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """Max over every neuron (row of each ``(E, out, in)`` projection) of the variance of its weights."""
    per_proj = [w.float().var(dim=-1, unbiased=False).amax(dim=-1) for w in expert_weights.values()]
    return torch.stack(per_proj).amax(dim=0)


def sensitivity_order(scores: ExpertScores, promote_factor: float = 2.0) -> torch.Tensor:
    """Experts from most to least sensitive: ascending router change, high-variance experts moved first.

    An expert whose max intra-neuron variance exceeds ``promote_factor`` x the median is promoted ahead of
    every non-promoted expert; inside each class the router-change order is kept.
    """
    order = torch.argsort(scores.router_change, stable=True)
    promoted = scores.max_variance > promote_factor * scores.max_variance.median()
    return torch.cat([order[promoted[order]], order[~promoted[order]]])


def level_counts(num_experts: int, levels: list[int], budget: float) -> list[int]:
    """Experts per level (ascending levels) with ``sum(n_l * b_l) == budget * E`` exactly.

    Two levels: the only solution. Three levels: the solution closest to equal counts. Raises ``ConfigError``
    naming the nearest reachable budgets when none exists.
    """
    levels = sorted(levels)
    if len(levels) not in (2, 3) or len(set(levels)) != len(levels):
        raise ConfigError(f"bit_levels={levels} must hold 2 or 3 distinct widths, e.g. 2,3,4.")
    E = num_experts
    solutions: dict[int, list[list[int]]] = {}
    for n_hi in range(E + 1):
        for n_lo in range(E - n_hi + 1) if len(levels) == 3 else [E - n_hi]:
            counts = [n_lo, E - n_hi - n_lo, n_hi] if len(levels) == 3 else [n_lo, n_hi]
            solutions.setdefault(sum(n * b for n, b in zip(counts, levels, strict=True)), []).append(counts)
    target = budget * E
    if abs(target - round(target)) > 1e-9 or round(target) not in solutions:
        below = [t / E for t in solutions if t < target]
        above = [t / E for t in solutions if t > target]
        nearby = [f"{x:g}" for x in (max(below, default=None), min(above, default=None)) if x is not None]
        raise ConfigError(
            f"bits_budget={budget} cannot be met exactly with {E} experts over {levels}; the nearest reachable "
            f"budgets are {' and '.join(nearby)}."
        )
    return min(solutions[round(target)], key=lambda c: (max(c) - min(c), c))


def allocate_bits(order: torch.Tensor, levels: list[int], budget: float) -> torch.Tensor:
    """Bits per expert: the widest level to the first experts of ``order`` (most sensitive first)."""
    E = order.numel()
    counts = level_counts(E, levels, budget)
    bits = torch.empty(E, dtype=torch.long)
    widths = [b for b, n in zip(sorted(levels, reverse=True), reversed(counts), strict=True) for _ in range(n)]
    bits[order] = torch.tensor(widths, dtype=torch.long)
    return bits
