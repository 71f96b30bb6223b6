"""Block-wise refinement with the routing loss (DESIGN 3.7), after a block's GPTQ/VSRAQ solve.

AutoRound-style: every quantized weight of the block gets a learned rounding offset ``V`` (bounded to +-0.5 of
a step) on the values the solver rounded (``QuantizedWeight.prequant``, so ``V = 0`` gives back the solver's
codes) and a per-group clipping factor ``c`` in ``[clip_min, 1]`` on its scale; both are trained by signed
gradient descent on

    ||block_q(x~) - block_fp(x)||^2 / ||block_fp(x)||^2                    (reconstruction, FP stream target)
  + lambda_v * sum_t w_t ||z_t - z^fp_t||^2 / sum_t w_t                    (value: next router's logits)
  + lambda_s * hinge(margin of the FP k-th over the FP (k+1)-th, order inside the top-k)   (structure)

where ``z`` is the next MoE layer's router on its *real* input: this block's output through the next block's
attention (full precision) and norm. The codes are re-derived at the end, so the output is plain GPTQ v1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .quantizer import QuantizedWeight, maxq_for


@dataclass
class _Slot:
    """One refined weight: the module attribute it lives in and its solve result(s) (gate/up: two)."""

    module: nn.Module
    attr: str
    names: list[str]  # result keys, in row order (gate then up for the fused experts)
    qws: list[QuantizedWeight]
    U: torch.Tensor  # (B, R, d) values rounded
    scale: torch.Tensor  # (B, R, groups)
    zero: torch.Tensor  # (B, R, groups)
    g_idx: torch.Tensor  # (B, d)
    maxq: torch.Tensor  # (B, 1, 1)
    squeeze: bool  # an nn.Linear weight (R, d) rather than a batch (B, R, d)
    V: torch.Tensor | None = None
    c: torch.Tensor | None = None

    def per_column(self, t: torch.Tensor) -> torch.Tensor:
        g = self.g_idx.long()[:, None, :].expand(-1, t.shape[1], -1)
        return torch.gather(t, 2, g)

    def fake_quant(self) -> torch.Tensor:
        s = self.per_column(self.scale * self.c)
        z = self.per_column(self.zero)
        x = self.U / s + self.V
        q = torch.clamp(x + (x.round() - x).detach() + z, torch.zeros_like(self.maxq), self.maxq)  # straight-through
        w = s * (q - z)
        return w[0] if self.squeeze else w

    @torch.no_grad()
    def final(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes, fp16-exact scales and the dequantized weight after training."""
        scale = (self.scale * self.c).half().float()
        s, z = self.per_column(scale), self.per_column(self.zero)
        codes = torch.minimum(torch.clamp((self.U / s + self.V).round() + z, min=0), self.maxq)
        return codes, scale, s * (codes - z)


def _slots(adapter, layer, weights: dict[str, QuantizedWeight]) -> list[_Slot]:
    from .models import EXPERT_PROJECTIONS

    prefix = f"model.layers.{layer.index}"
    slots = []

    def make(module, attr, names, squeeze):
        qws = [weights[n] for n in names]
        if any(q.prequant is None for q in qws):
            raise ValueError("refinement needs the solver's pre-rounding values (keep_prequant); internal error.")

        def get(field: str) -> torch.Tensor:  # gate and up are refined as the one fused weight they form
            return torch.cat([getattr(q, field) for q in qws], dim=1)

        bits = qws[0].bits_per_matrix
        B = qws[0].codes.shape[0]
        maxq = (
            torch.full((B, 1, 1), float(maxq_for(qws[0].bits)), device=qws[0].codes.device)
            if bits is None
            else (torch.tensor([float(maxq_for(int(b))) for b in bits], device=qws[0].codes.device)[:, None, None])
        )
        slots.append(
            _Slot(module, attr, names, qws, get("prequant"), get("scales"), get("zeros").float(), qws[0].g_idx, maxq,
                  squeeze)
        )  # fmt: skip

    for name, lin in {**adapter.attention_linears(layer), **adapter.dense_mlp_linears(layer)}.items():
        if f"{prefix}.{name}" in weights:  # (absent: left unquantized by a "-:" dynamic pattern)
            make(lin, "weight", [f"{prefix}.{name}"], True)
    if layer.is_moe:
        gate, up, down = (f"{prefix}.mlp.experts.{p}" for p in EXPERT_PROJECTIONS)
        make(layer.experts, "gate_up_proj", [gate, up], False)
        make(layer.experts, "down_proj", [down], False)
    return slots


def _next_router_logits(adapter, next_layer, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The next MoE layer's router logits on its real input: ``hidden`` through its attention and norm."""
    block = next_layer.layer
    h = hidden + block.self_attn(hidden_states=block.input_layernorm(hidden), **_attn_kwargs(kwargs))[0]
    x = block.post_attention_layernorm(h)
    return x.reshape(-1, x.shape[-1]) @ next_layer.router.weight.T.to(x.dtype)


def _attn_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k in ("attention_mask", "position_embeddings", "position_ids")}


def refine_block(
    runner,
    adapter,
    layer,
    next_layer,
    x_q: list[torch.Tensor],
    targets: list[torch.Tensor],
    weights: dict[str, QuantizedWeight],
    fp_next_logits: torch.Tensor | None,
    cfg,
    progress: bool = False,
) -> dict:
    """Refine one block in place (model weights and ``weights``) toward ``targets``, the FP stream's outputs of
    this block per calibration batch; returns the loss history. The block keeps the offsets and clipping of the
    step with the lowest loss (``min(history)``), not the last step's."""
    from tqdm.auto import tqdm

    from .routing import boundary_margin, selection_scores
    from .vsraq import fragility, margin_scale

    slots = _slots(adapter, layer, weights)
    params = []
    for s in slots:
        s.V = torch.zeros_like(s.U, requires_grad=True)
        s.c = torch.ones_like(s.scale, requires_grad=True)
        params += [s.V, s.c]
    by_id = {id(p): n for n, p in layer.layer.named_parameters()}
    names = [by_id[id(getattr(s.module, s.attr))] for s in slots]  # parameter names inside the block
    sizes = [h.shape[0] * h.shape[1] for h in x_q]
    offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    rule = adapter.router_rule()
    routing_terms = (
        next_layer is not None
        and fp_next_logits is not None
        and rule.top_k < rule.num_experts
        and (cfg.refine_lambda_value > 0 or cfg.refine_lambda_structure > 0)
    )
    if routing_terms:
        fp_next_logits = fp_next_logits.to(next_layer.router.weight.device)
        bias = adapter.router_bias(next_layer.router)
        sel_fp = selection_scores(fp_next_logits, rule, bias)
        m_fp = boundary_margin(sel_fp, rule.top_k)
        w_fp = 1.0 + fragility(m_fp, margin_scale(m_fp))
        order_fp = sel_fp.topk(rule.top_k + 1, dim=-1).indices  # FP order: the top-k, then the best non-chosen
    gen = torch.Generator().manual_seed(cfg.refine_seed + layer.index)
    history = []
    best, best_loss = None, float("inf")
    bar = tqdm(range(cfg.refine_steps), desc=f"refine layer {layer.index}", disable=not progress, leave=False)
    k = rule.top_k
    for _ in bar:
        bi = int(torch.randint(len(x_q), (1,), generator=gen))
        kw = runner.kwargs[bi]
        with torch.enable_grad():
            fake = {n: s.fake_quant() for n, s in zip(names, slots, strict=True)}
            out = torch.func.functional_call(layer.layer, fake, (runner.batch(x_q[bi]),), kw, strict=False)
            out = out[0] if isinstance(out, tuple) else out
            tgt = runner.batch(targets[bi])
            loss = (out - tgt).pow(2).mean() / tgt.pow(2).mean().clamp(min=1e-12)
            if routing_terms:
                z = _next_router_logits(adapter, next_layer, out, kw).float()
                tok = slice(offsets[bi], offsets[bi + 1])
                zf, wt = fp_next_logits[tok], w_fp[tok]
                if cfg.refine_lambda_value > 0:
                    value = (wt[:, None] * (z - zf).pow(2)).sum() / (wt.sum() * z.shape[1])
                    loss = loss + cfg.refine_lambda_value * value / zf.pow(2).mean().clamp(min=1e-12)
                if cfg.refine_lambda_structure > 0:
                    picked = selection_scores(z, rule, bias).gather(1, order_fp[tok])
                    m = m_fp[tok]
                    ok = torch.isfinite(m) & torch.isfinite(picked).all(1)  # group-limited routers mask experts
                    want = torch.where(ok, 0.5 * m, torch.zeros_like(m))  # keep half the FP boundary margin
                    gap = torch.where(ok, picked[:, k - 1] - picked[:, k], torch.zeros_like(m))
                    hinge = torch.relu(want - gap)
                    if rule.renormalize and k > 1:  # the combine weights see the order inside the top-k
                        inside = torch.relu(picked[:, 1:k] - picked[:, : k - 1]).sum(1)
                        hinge = hinge + torch.where(ok, inside, torch.zeros_like(inside))
                    structure = (wt * hinge).mean() / want.mean().clamp(min=1e-12)
                    loss = loss + cfg.refine_lambda_structure * structure
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        value = float(loss)
        with torch.no_grad():
            if value < best_loss:  # the state this loss was measured at, before the step (as AutoRound keeps)
                best_loss = value
                best = [(s.V.detach().clone(), s.c.detach().clone()) for s in slots]
            for prm, g in zip(params, grads, strict=True):
                if g is not None:
                    prm.sub_(cfg.refine_lr * g.sign())
            for s in slots:
                s.V.clamp_(-0.5, 0.5)
                s.c.clamp_(cfg.refine_clip_min, 1.0)
        history.append(value)
    with torch.no_grad():
        if best is not None:  # back to the best state seen: sign steps at a fixed rate can end above their start
            for s, (V, c) in zip(slots, best, strict=True):
                s.V.copy_(V)
                s.c.copy_(c)
        for s in slots:
            codes, scale, weight = s.final()
            getattr(s.module, s.attr).copy_(weight[0] if s.squeeze else weight)
            start = 0
            for name, qw in zip(s.names, s.qws, strict=True):
                part = slice(start, start + qw.codes.shape[1])
                weights[name] = QuantizedWeight(
                    codes[:, part].to(torch.uint8),
                    scale[:, part].contiguous(),
                    qw.zeros,
                    qw.g_idx,
                    weight[:, part].contiguous(),
                    qw.bits,
                    qw.group_size,
                    qw.bits_per_matrix,
                )
                start = part.stop
    return {"loss": history}
