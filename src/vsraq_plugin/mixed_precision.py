"""Expert-wise mixed precision (DESIGN 6): which experts get more bits, under an exact average budget.

Allocations (``QuantConfig.allocation``):
- ``measured`` (the default): for every expert and candidate width, the damage of quantizing it at that width
  (the solve's own loss ``tr(E H E^T)``, ``E = W - Q`` on the expert's Hessian, gate/up plus down) times the
  routing mass it receives; then the exact minimum of the summed damage under the budget (``knapsack``: a
  multiple-choice knapsack solved by dynamic programming, not greedily). The pipeline measures the damages
  with one batched solve per width and keeps the chosen width's codes (only a down whose width differs from its
  gate/up's is solved again). ``width_per_projection`` (the default of ``measured``): each expert's gate/up and
  its down are separate items of the knapsack (``allocate_parts``), each with its own damage and parameter count,
  so an expert's down can get another width than its gate/up. Both damages are measured in the residual stream:
  down's solve loss, and gate/up's error carried through the gate and the original down (``gate_up_output_loss``;
  its own solve loss is in another space). Down's loss at a width is measured on gate/up at that width (an
  approximation when the chosen widths differ); such a down is then solved once more on the chosen gate/up.
  The norm of both is the stream's *read metric* (``read_metric``, ``damage_metric="readers"``): what the
  linears reading the stream see of an error. In the plain norm a down's spread-out quantization noise and
  gate/up's error (written through the original down, in the directions the model uses) look alike per unit,
  and the knapsack traded gate/up bits for down bits for a gain the model did not show.
- ``router-norm``: the seed paper's rule below.
- ``random`` / ``frequency``: baselines (a seeded permutation; the experts that receive the most calibration
  tokens get the widest level), with the rule's exact level counts.

The paper's rule. Scores, per expert of one MoE layer:
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

import math
from dataclasses import dataclass

import torch

from .config import ConfigError
from .quantizer import QuantizedWeight


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


# ---------------------------------------------------------------------------------------------- measured damage
# The read metric's directions kept exactly; the rest of its spectrum is replaced by its mean (trace kept).
READ_RANK = 512


@dataclass
class ReadMetric:
    """The residual stream's read metric ``M ~= mu I + U diag(coef) U^T`` (``U`` ``(d, r)`` orthonormal): how much an
    error in each direction of the stream is read by the linears that read it (DESIGN 6, ``read_metric``)."""

    U: torch.Tensor
    coef: torch.Tensor
    mu: float

    def sq_norms(self, v: torch.Tensor) -> torch.Tensor:
        """``v_t^T M v_t`` per row of ``v`` ``(N, d)``."""
        U, coef = self.U.to(v.device, v.dtype), self.coef.to(v.device, v.dtype)
        return self.mu * v.pow(2).sum(-1) + (v @ U).pow(2) @ coef

    def damage(self, E: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        """``tr(M E H E^T)`` per matrix of ``E`` ``(B, d, in)`` (``H`` ``(B, in, in)``), in ``E``'s precision."""
        U, coef = self.U.to(E.device, E.dtype), self.coef.to(E.device, E.dtype)
        P = U.T @ E  # (B, r, in): the error's components along the kept directions
        low = ((P @ H) * P).sum(-1) @ coef
        return low if self.mu == 0 else low + self.mu * ((E @ H) * E).sum(dim=(-2, -1))


def stream_sq_norms(v: torch.Tensor, read: ReadMetric | None = None) -> torch.Tensor:
    """``v_t^T M v_t`` per row of ``v`` ``(N, d)``: in the read metric, or the plain ``||v_t||^2`` without one."""
    return v.pow(2).sum(-1) if read is None else read.sq_norms(v)


def read_metric(readers: list[torch.Tensor], rank: int = READ_RANK) -> ReadMetric:
    """``M = sum_j W_j^T W_j / ||W_j||_F^2``, scaled to mean eigenvalue 1, over the linears ``W_j`` ``(out_j, d)`` that
    read the residual stream (the layer's attention inputs and router, its shared or dense MLP's gate/up; the norm
    in front folded in): every reader counts alike, whatever its width.

    Why: an error the stream carries hurts as much as the readers see of it. Quantization noise of a down projection
    spreads over all ``d`` directions, most of which the readers barely read; gate/up's error leaves the expert
    through the original down, in the directions the model writes and reads. In the plain residual norm (``M = I``)
    the two look alike per unit and the allocation moves bits from gate/up to down for a gain that is not there
    (tiny-deepseek-v3, gptq, 3.0 bits: a predicted 25-46 % less damage than uniform W3, measured KL 2 % worse).
    Above ``rank`` directions the rest of the spectrum is replaced by its mean (one eigendecomposition per layer)."""
    d = readers[0].shape[-1]
    M = torch.zeros(d, d, dtype=torch.float64, device=readers[0].device)
    for W in readers:
        W = W.detach().float()
        norm = float(W.pow(2).sum())
        if norm > 0:
            M += (W.T @ W).double() / norm
    trace = float(torch.trace(M))
    if trace <= 0:  # nothing reads the stream (never for a real layer): the plain residual norm
        return ReadMetric(M.new_zeros(d, 0).float(), M.new_zeros(0).float(), 1.0)
    M *= d / trace
    lam, V = torch.linalg.eigh(M if d <= 2048 else M.float())  # ascending
    lam = lam.double().clamp(min=0)
    if d <= rank:
        return ReadMetric(V.float(), lam.float(), 0.0)
    top = lam[-rank:]
    mu = max(float((d - top.sum()) / (d - rank)), 0.0)
    return ReadMetric(V[:, -rank:].float(), (top - mu).float(), mu)


def expert_damage(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, read: ReadMetric | None = None) -> torch.Tensor:
    """``tr((W - Q) H (W - Q)^T)`` per matrix of a batch ``(B, out, in)`` (``H``: ``(B, in, in)``), in float64: the
    loss GPTQ minimises, on the (normalised) Hessian it was solved with; with ``read``, the output error measured in
    the read metric, ``tr(M (W - Q) H (W - Q)^T)`` (``out`` the residual stream's width)."""
    E = (W.double() - Q.double()).to(H.device)
    if read is not None:
        return read.damage(E, H.double()).cpu()
    return ((E @ H.double()) * E).sum(dim=(-2, -1)).cpu()


def gate_up_output_loss(
    experts,
    fp_gate_up: torch.Tensor,
    gate_ups: dict[int, torch.Tensor | QuantizedWeight],
    down: torch.Tensor,
    batches,
    dist=None,
    read: ReadMetric | None = None,
) -> dict[int, torch.Tensor]:
    """Per width ``b`` and expert ``e``, gate/up's error where down's solve loss is measured, the residual stream:
    ``sum_t w_t ||W_down,e (h_b,t - h_t)||^2 / sum_t w_t``, ``h`` the expert's down input ``gate(x W_gu^T)`` with
    the original gate/up, ``h_b`` with width b's (``gate_ups[b]``), ``W_down`` the original down. Gate/up's own
    solve loss is in its output space (before the gate and down), so it cannot be weighed against down's in one
    knapsack (``width_per_projection``); this can. ``batches``: ``(X, tokens, eids, w)`` with ``X[tokens]`` the
    (token, expert) pairs' inputs and ``w`` their weights, as down's Hessians weigh them. Float64 sums, reduced
    over the ranks of a distributed run. A width given as codes (``QuantizedWeight``) is dequantized one expert at
    a time (never all experts' float32 weights of every width at once). With ``read``, the norm is the read
    metric's (``ReadMetric``), as down's damage then is."""
    from .capture import expert_gate, expert_groups
    from .solve import dequantize_grid

    E = fp_gate_up.shape[0]
    dev = fp_gate_up.device
    num = {b: torch.zeros(E, dtype=torch.float64, device=dev) for b in gate_ups}
    den = torch.zeros(E, dtype=torch.float64, device=dev)
    fp, dn = fp_gate_up.detach().float(), down.detach().float()

    def weight(gu, e: int) -> torch.Tensor:  # (1, 2I, d): expert e's gate/up at one width
        if isinstance(gu, QuantizedWeight):
            one = slice(e, e + 1)
            return dequantize_grid(gu.codes[one], gu.scales[one], gu.zeros[one], gu.g_idx[one])
        return gu[e : e + 1].detach().float()

    groups = [dict(expert_groups(eids, E)) for _, _, eids, _ in batches]
    for e in range(E):
        seen = [(batch, got[e]) for batch, got in zip(batches, groups, strict=True) if e in got]
        if not seen:
            continue
        quantized = {b: weight(gu, e) for b, gu in gate_ups.items()}
        for (X, tokens, _, w), sel in seen:  # the batches in order: the same float64 sums as batch by batch
            xs, ws = X[tokens[sel]].float(), w[sel].double()
            h = expert_gate(experts, fp, e, xs)
            den[e] += ws.sum()
            for b, gu in quantized.items():
                diff = (expert_gate(experts, gu, 0, xs) - h) @ dn[e].T
                num[b][e] += (ws * stream_sq_norms(diff, read).double()).sum()
    if dist is not None and dist.active:
        for t in (*num.values(), den):
            dist.all_reduce_sum_(t)
    return {b: (n / den.clamp(min=1e-300)).cpu() for b, n in num.items()}


def knapsack(damage: torch.Tensor, cost: torch.Tensor, capacity: int) -> torch.Tensor:
    """The exact multiple-choice knapsack: one choice ``j`` per item ``i`` minimising ``sum damage[i, j]`` subject to
    ``sum cost[i, j] <= capacity`` (integer costs). Returns the choice per item ``(N,)``.

    Dynamic programming over the items with the capacity in integer units (each item's cheapest choice is paid
    up front, so the table spans only the extra cost): ``O(N * L * capacity)`` time, ``N * capacity`` bytes. Ties
    go to the lower choice index (the narrower width when choices are sorted by cost): deterministic.
    """
    damage = damage.double().cpu()
    cost = cost.long().cpu()
    if damage.shape != cost.shape or damage.dim() != 2:
        raise ValueError(f"damage {tuple(damage.shape)} and cost {tuple(cost.shape)} must both be (items, choices).")
    if not torch.isfinite(damage).all():
        raise ValueError("a measured damage is NaN or infinite; the allocation cannot rank it.")
    N, L = damage.shape
    base = cost.min(dim=1).values
    extra = cost - base[:, None]
    room = int(capacity) - int(base.sum())
    if room < 0:
        raise ConfigError(
            f"the budget ({capacity} units) is below the narrowest choice of every item ({int(base.sum())} units)."
        )
    room = min(room, int(extra.max(dim=1).values.sum()))  # more cannot be spent
    best = torch.zeros(room + 1, dtype=torch.float64)  # best[c]: least damage of the items so far, extra cost <= c
    choice = torch.zeros(N, room + 1, dtype=torch.uint8 if L < 256 else torch.int16)
    inf = torch.full((room + 1,), math.inf, dtype=torch.float64)
    for i in range(N):
        cand = inf.expand(L, room + 1).clone()
        for j in range(L):
            x = int(extra[i, j])
            if x <= room:
                cand[j, x:] = best[: room + 1 - x] + damage[i, j]
        pick = torch.argmin(cand, dim=0)  # first minimum on ties
        best = cand.gather(0, pick[None]).squeeze(0)
        choice[i] = pick.to(choice.dtype)
    out = torch.empty(N, dtype=torch.long)
    c = room
    for i in range(N - 1, -1, -1):
        j = int(choice[i, c])
        out[i] = j
        c -= int(extra[i, j])
    return out


def bit_units(params: list[int]) -> int:
    """The unit of a width-times-parameters budget: the gcd of the items' parameter counts."""
    g = 0
    for p in params:
        g = math.gcd(g, int(p))
    return max(g, 1)


def allocate_measured(
    damage: torch.Tensor, levels: list[int], max_bit_params: int, params: list[int] | None = None
) -> torch.Tensor:
    """Widths per item (experts) minimising the summed ``damage`` ``(N, len(levels))`` (columns: ascending
    ``levels``) subject to ``sum width_i * params_i <= max_bit_params`` (exact, ``knapsack``)."""
    levels = sorted(levels)
    N = damage.shape[0]
    params = [1] * N if params is None else [int(p) for p in params]
    g = bit_units(params)
    cost = torch.tensor([[b * p // g for b in levels] for p in params], dtype=torch.long)
    pick = knapsack(damage, cost, int(max_bit_params) // g)
    return torch.tensor(levels, dtype=torch.long)[pick]


def allocate_parts(
    damages: list[torch.Tensor], levels: list[int], max_bit_params: int, params: list[list[int]]
) -> list[torch.Tensor]:
    """Widths for several parts of every item (e.g. each expert's gate/up and its down): one exact knapsack over all
    parts' items, ``damages[p]`` ``(N_p, len(levels))`` and ``params[p]`` (``N_p``) per part, subject to
    ``sum width x params <= max_bit_params`` over every part. Returns the widths per part."""
    flat = allocate_measured(torch.cat(damages), levels, max_bit_params, [int(x) for ps in params for x in ps])
    return list(flat.split([d.shape[0] for d in damages]))


def budget_bit_params(budget: float, params: list[int]) -> int:
    """``floor(budget * sum(params))``, robust to the float's last bit (2.5 * 8 is 20, not 19)."""
    total = budget * sum(int(p) for p in params)
    return math.floor(total + 1e-9 * max(1.0, abs(total)))
