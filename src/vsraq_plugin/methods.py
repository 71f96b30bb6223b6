"""One policy object per method: what the layer loop asks a method, instead of ``method ==`` checks.

The loop (``pipeline.py``) runs the same stages for every method; a method answers, per layer, through a
``LayerPlan``: token weights of the attention stages, the output metric of a linear, whether a linear is
solved against FP targets, how the experts' Hessians are built, and what happens to the router. The defaults
are stock GPTQ's; ``agq`` weights the experts' tokens by gate affinity; ``vsraq`` adds the routing terms of
DESIGN 3.3-3.5d, computed here from the full-precision router logits with the pure functions of ``vsraq.py``.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import QuantConfig
from .gptq import _METRIC_MAX_RANK
from .models import MoEAdapter, MoELayer
from .quantizer import QuantizedWeight
from .solve import QuantizationResult, gptq_solve
from .vsraq import TokenSplit

# Residual writers: their output goes straight into the residual stream the routers read (DESIGN 3.5b/3.5c).
RESIDUAL_WRITERS = ("o_proj", "down_proj")
# A residual writer's metric over several routers is truncated to this many directions: the fast metric solve's
# limit, so depth never sends it to the exact solve.
METRIC_RANK = _METRIC_MAX_RANK


@dataclass
class RouterView:
    """What the routing terms read of a router that may not be in memory (a later layer of a streamed model):
    its weight ``(E, d)``, DeepSeek's selection bias, and the RMSNorm scale in front of it."""

    weight: torch.Tensor
    e_score_correction_bias: torch.Tensor | None = None
    norm_weight: torch.Tensor | None = None

    def to(self, device) -> RouterView:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return RouterView(move(self.weight), move(self.e_score_correction_bias), move(self.norm_weight))

    @classmethod
    def of(cls, layer: MoELayer) -> RouterView:
        norm = getattr(layer.layer, "post_attention_layernorm", None)
        gamma = None if norm is None or getattr(norm, "weight", None) is None else norm.weight.detach().float()
        bias = getattr(layer.router, "e_score_correction_bias", None)
        return cls(layer.router.weight.detach().float(), None if bias is None else bias.detach(), gamma)


@dataclass
class LayerContext:
    """What a method may read to plan one layer."""

    adapter: MoEAdapter
    layer: MoELayer  # on the solve device
    batch_tokens: list[int]  # tokens per calibration batch, every batch of the run
    fp_logits: dict[int, torch.Tensor]  # FP router logits of the MoE layers, every token (empty unless asked)
    router: Callable[[int], RouterView]  # a MoE layer's router by index (later layers: original weights)
    batches: range | None = None  # this process's batches (distributed runs); None: all of them
    exact: bool = False  # exact sums (QuantConfig.exact_sums): per-batch terms, reduced over the processes
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # in-place sum over the processes
    moe_indices: list[int] = field(default_factory=list)  # every MoE layer of the model


@dataclass
class LayerPlan:
    """A method's choices for one layer. The defaults are stock GPTQ's: unweighted Hessians, the tokens the
    partially quantized model routes to each expert, no output metric, no FP targets, router untouched."""

    weighted_experts: bool = False  # agq: expert tokens weighted by their gate score
    attention_weights: list[torch.Tensor] | None = None  # per-batch token weights for the attention stages
    fp_logits: torch.Tensor | None = None  # this layer's FP router logits (T, E), calibration order
    expert_pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # FP (token, expert, weight)
    fp_targets: bool = False  # residual writers solved against blended FP targets (DESIGN 3.5c)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # output metric by leaf kind (3.5b, 3.5d)
    # Leaf kinds whose metric is block diagonal in this many equal blocks, solved as that many separate matrices
    # (v_proj: one block per kv head, so no block exceeds the fast metric solve's rank limit).
    metric_blocks: dict[str, int] = field(default_factory=dict)
    boundary_next: torch.Tensor | None = None  # the next router's normalised boundary factor (gate/up metric)
    split: TokenSplit | None = None  # exact sums: this process's tokens and batches (fp_logits: every token)

    def metric_for(self, name: str) -> torch.Tensor | None:
        """The output metric of a linear by its name in the layer (``self_attn.o_proj``, ``mlp...down_proj``)."""
        leaf = name.rsplit(".", 1)[-1]
        return self.metrics.get(leaf)

    def fp_target(self, name: str) -> bool:
        return self.fp_targets and name.endswith(RESIDUAL_WRITERS)

    def gate_up_metric(
        self, adapter: MoEAdapter, experts: nn.Module, pairs, cfg: QuantConfig, chunk: slice | None = None
    ) -> torch.Tensor | None:
        return None

    def align_router(self, adapter, layer, routed, cfg, result) -> None:
        """Called once the experts' inputs are recorded, before their Hessians are built."""

    def probe_metrics(self, runner, adapter, layer, x_q, linears, cfg: QuantConfig) -> None:
        """Called before a stage is captured: output metrics of its linears that need the layer run (probes)."""


class Method:
    """Stock GPTQ (``gptq``): the base every method refines."""

    name = "gptq"

    def __init__(self, cfg: QuantConfig) -> None:
        self.cfg = cfg

    @property
    def needs_fp_logits(self) -> bool:
        """Whether the FP pre-pass must record every MoE layer's router logits (layer l needs l+1's margins)."""
        c = self.cfg
        return c.refine_steps > 0 and (c.refine_lambda_value > 0 or c.refine_lambda_structure > 0)

    @property
    def fp_targets(self) -> bool:
        """Whether the layers' original weights and FP inputs are needed during the stage captures."""
        return False

    @property
    def drift_targets(self) -> bool:
        """Whether o_proj also cancels the residual stream's drift (DESIGN 3.5e (ii)): it needs the FP stream."""
        return False

    @property
    def fp_stream(self) -> bool:
        """Whether the full-precision stream is carried layer by layer (FP targets, refinement targets)."""
        return self.fp_targets or self.cfg.refine_steps > 0

    def plan(self, ctx: LayerContext) -> LayerPlan:
        return LayerPlan()


class AffinityGuided(Method):
    """MoEQuant's affinity-guided GPTQ (``agq``): expert Hessians weighted by the token's gate score."""

    name = "agq"

    def plan(self, ctx: LayerContext) -> LayerPlan:
        return LayerPlan(weighted_experts=True)


class Vsraq(Method):
    """GPTQ with the routing-alignment terms (DESIGN 3.3-3.6); every ``lambda_*`` = 0 is ``gptq`` exactly."""

    name = "vsraq"

    @property
    def needs_fp_logits(self) -> bool:
        return True

    @property
    def fp_targets(self) -> bool:
        return self.cfg.fp_target_alpha > 0

    @property
    def drift_targets(self) -> bool:
        return self.cfg.drift_beta > 0

    def plan(self, ctx: LayerContext) -> VsraqPlan:
        return vsraq_plan(ctx, self.cfg)


class RoundToNearest(Method):
    name = "rtn"


METHODS: dict[str, type[Method]] = {m.name: m for m in (Method, AffinityGuided, Vsraq, RoundToNearest)}


def method_for(cfg: QuantConfig) -> Method:
    return METHODS[cfg.method](cfg)


# ---------------------------------------------------------------------------------------------- VSRAQ
@dataclass
class VsraqPlan(LayerPlan):
    """The VSRAQ terms for one layer, from the FP router logits (DESIGN 3.3-3.6)."""

    # By residual writer (o_proj, down_proj): the probe directions of its boundary matrix and the lambda of the metric
    # they carry back to the linears feeding it (DESIGN 3.5d, probe_matrices)
    probes: dict[str, tuple[torch.Tensor, float]] = field(default_factory=dict)
    first_batch: int = 0  # the run's index of this process's first calibration batch
    probe_batches: int = 1  # the run's first calibration batches that hold QuantConfig.probe_tokens tokens
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # in-place sum over the processes

    def gate_up_metric(
        self, adapter: MoEAdapter, experts: nn.Module, pairs, cfg: QuantConfig, chunk: slice | None = None
    ) -> torch.Tensor | None:
        if self.boundary_next is None or pairs is None:
            return None
        if self.split is not None and self.split.local != slice(0, pairs[0].shape[0]):
            raise NotImplementedError("lambda_metric_up is not distributed yet; set it to 0 under torchrun.")
        return gate_up_metric(adapter, experts, pairs, self.boundary_next, cfg.lambda_metric_up, chunk)

    def align_router(self, adapter, layer, routed, cfg, result) -> None:
        align_router(adapter, layer, routed, cfg, self, result)

    def probe_metrics(self, runner, adapter, layer, x_q, linears, cfg: QuantConfig) -> None:
        """The metric carried back by probes (DESIGN 3.5d): to attention's input projections without one of their own
        (q/k) through o_proj, to a dense or shared MLP's gate/up through its down_proj (``probe_matrices``)."""
        from .vsraq import metric

        groups = [adapter.attention_linears(layer), adapter.dense_mlp_linears(layer)]
        for attention, group in zip((True, False), groups, strict=True):
            writer = next((n for n in group if n.endswith(RESIDUAL_WRITERS)), None)
            leaf = None if writer is None else writer.rsplit(".", 1)[-1]
            if leaf not in self.probes:
                continue
            todo = {n: m for n, m in linears.items() if n in group and n != writer and self.metric_for(n) is None}
            if not todo:
                continue
            U, lam = self.probes[leaf]
            nb = {n: probe_blocks(adapter.config, n, m.out_features) for n, m in todo.items()}
            # The MLP alone on the MoE block's input (the layer's MLP input for a dense one): no routed experts
            alone = None if attention else (layer.mlp, layer.shared_experts if layer.is_moe else layer.mlp)
            B = probe_matrices(runner, layer.layer, x_q, todo, group[writer], U, self.probe_batches, self.first_batch,
                               self.reduce, nb, alone)  # fmt: skip
            for n, Bn in B.items():
                self.metrics[n.rsplit(".", 1)[-1]] = metric(Bn, lam)
                if nb[n] > 1:
                    self.metric_blocks[n.rsplit(".", 1)[-1]] = nb[n]


def vsraq_plan(ctx: LayerContext, cfg: QuantConfig) -> VsraqPlan:
    """What the VSRAQ terms need for one layer (DESIGN 3.3-3.6): token weights from this layer's FP margins,
    the experts' FP (token, expert, weight) triples, and the output metrics of the residual writers."""
    from .routing import boundary_margin
    from .vsraq import boundary_factor, expert_pairs_fp, margin_scale, metric, token_weights, value_path_matrix

    adapter, layer, logits = ctx.adapter, ctx.layer, ctx.fp_logits
    k = adapter.router_rule().top_k if logits else 0
    device = next(layer.layer.parameters()).device

    views = {layer.index: RouterView.of(layer)} if layer.is_moe else {}  # this router, before its re-fit

    def view(index: int) -> RouterView:
        if index not in views:
            views[index] = ctx.router(index)
        return views[index]

    routes: dict = {}

    def route(index: int):  # each router's FP decisions once per layer (a top-k over every calibration token)
        if index not in routes:
            routes[index] = adapter.route(logits[index].to(device), view(index))
        return routes[index]

    def boundary_of(index: int | None) -> torch.Tensor | None:
        """The router's normalised boundary matrix A (DESIGN 3.5b) as its factor ``F`` (``A = F F^T``, rank < E),
        when some output metric needs it."""
        lams = (
            cfg.lambda_metric,
            cfg.lambda_metric_v,
            cfg.lambda_metric_up,
            cfg.lambda_metric_qk,
            cfg.lambda_metric_mlp,
        )
        if index is None or max(lams) <= 0:
            return None
        v = view(index)
        return boundary_factor(v.weight, v.norm_weight, route(index).selection, k)

    def residual_metric(F: torch.Tensor | None) -> torch.Tensor | None:
        return None if F is None or cfg.lambda_metric <= 0 else metric(F @ F.T, cfg.lambda_metric)

    later = sorted(i for i in logits if i > layer.index)
    F_next = boundary_of(later[0] if later else None)  # each router's A (its factor) is built once per layer
    onward = [i for i in ctx.moe_indices if i > (later[0] if later else layer.index)]

    def reach(F: torch.Tensor | None) -> torch.Tensor | None:
        """What a write into the residual stream before the next router sees (DESIGN 3.5e (i)): the next router's
        boundary matrix ``A``, then the ``metric_horizon - 1`` routers after it (FP decisions not known yet), as
        factors (``A = F F^T``)."""
        far = onward[: cfg.metric_horizon - 1]
        if F is None or not far or cfg.lambda_metric <= 0:  # (F_next may exist for the v_proj / gate/up metrics)
            return F
        from .vsraq import horizon_factor

        return horizon_factor(F, [view(i) for i in far], cfg.metric_decay, METRIC_RANK)

    plan = VsraqPlan(
        fp_targets=cfg.fp_target_alpha > 0,
        first_batch=0 if ctx.batches is None else ctx.batches.start,
        reduce=ctx.reduce,
        probe_batches=_batches_for(ctx.batch_tokens, cfg.probe_tokens),
    )
    F_down = reach(F_next)
    if (m := residual_metric(F_down)) is not None:
        plan.metrics["down_proj"] = m
    if F_down is not None and cfg.lambda_metric_mlp > 0 and adapter.dense_mlp_linears(layer):
        # the dense / shared MLP's gate/up, through its down_proj (the directions once per layer, not per stage)
        plan.probes["down_proj"] = (probe_directions(F_down, cfg.probe_directions), cfg.lambda_metric_mlp)
    if layer.index not in logits:  # a dense layer, or no FP pass
        return plan
    fp = route(layer.index)  # this layer's FP decisions, computed once
    m = boundary_margin(fp.selection, k)
    tau = margin_scale(m)
    if cfg.lambda_attention > 0:
        plan.attention_weights = list(token_weights(m, cfg.lambda_attention, tau).split(ctx.batch_tokens))
    if cfg.lambda_expert > 0:
        nm, tau_next = (None, None)
        if later:
            nm = boundary_margin(route(later[0]).selection, k)
            tau_next = margin_scale(nm)
        plan.expert_pairs = expert_pairs_fp(
            fp, k, nm, cfg.lambda_expert, cfg.near_miss_weight, cfg.margin_band, tau_next, tau
        )
    F_here = boundary_of(layer.index)
    if (m_here := residual_metric(F_here)) is not None:  # (the later routers added to o_proj's metric: no gain)
        plan.metrics["o_proj"] = m_here
    lins = adapter.attention_linears(layer)
    if cfg.lambda_metric_v > 0 and "self_attn.v_proj" in lins and "self_attn.o_proj" in lins:
        c = adapter.config
        heads, kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        B = value_path_matrix(F_here, lins["self_attn.o_proj"].weight.detach(), heads, kv)
        plan.metrics["v_proj"] = metric(B, cfg.lambda_metric_v)
        if B.shape[-1] > METRIC_RANK:  # the whole metric could exceed the fast solve's rank: solve per kv head
            plan.metric_blocks["v_proj"] = kv
    if cfg.lambda_metric_qk > 0 and F_here is not None:  # (MLA probes two stages: q_a/kv_a, then q_b/kv_b)
        plan.probes["o_proj"] = (probe_directions(F_here, cfg.probe_directions), cfg.lambda_metric_qk)
    plan.fp_logits = logits[layer.index].to(device)
    plan.boundary_next = F_next if cfg.lambda_metric_up > 0 else None
    if ctx.exact:
        _localise(plan, ctx)
    return plan


def _batches_for(batch_tokens: list[int], tokens: int) -> int:
    """How many of the run's first calibration batches hold at least ``tokens`` tokens (all of them if fewer)."""
    total = 0
    for i, n in enumerate(batch_tokens):
        total += n
        if total >= tokens:
            return i + 1
    return max(len(batch_tokens), 1)


def _localise(plan: VsraqPlan, ctx: LayerContext) -> None:
    """Keep this process's share of a plan computed on every calibration token (exact sums): its batches'
    attention weights, its tokens' expert pairs (token indices made local), and the token split."""
    sizes = ctx.batch_tokens
    batches = ctx.batches if ctx.batches is not None else range(len(sizes))
    t0 = sum(sizes[: batches.start])
    local = sizes[batches.start : batches.stop]
    t1 = t0 + sum(local)
    offsets = [0, *torch.tensor(local).cumsum(0).tolist()]
    plan.split = TokenSplit(slice(t0, t1), list(itertools.pairwise(offsets)), ctx.reduce or (lambda t: t))
    if plan.attention_weights is not None:
        plan.attention_weights = plan.attention_weights[batches.start : batches.stop]
    if plan.expert_pairs is not None:
        tokens, eids, w = plan.expert_pairs
        keep = (tokens >= t0) & (tokens < t1)
        plan.expert_pairs = (tokens[keep] - t0, eids[keep], w[keep])


def align_router(
    adapter: MoEAdapter, layer: MoELayer, routed: list, cfg: QuantConfig, plan: LayerPlan, result: QuantizationResult
) -> None:
    """Re-fit the router on the quantized stream toward the FP logits (DESIGN 3.3, 3.4); with
    ``router_mode="quantize"`` then GPTQ it on the same weighted row Hessians (the asymmetric-target form)."""
    from .vsraq import align_router as fit_router
    from .vsraq import router_row_hessians

    if cfg.router_mode == "keep" or plan.fp_logits is None:
        return
    quantize = cfg.router_mode == "quantize"
    if cfg.lambda_value <= 0 and not quantize:
        return
    X = torch.cat([x for x, _, _ in routed])
    router = layer.router
    R = router.weight.detach().float()
    k = adapter.router_rule().top_k
    if cfg.lambda_value > 0:
        fit = fit_router(
            X,
            plan.fp_logits,
            R,
            lambda z: adapter.route(z, router),
            k,
            cfg.lambda_value,
            cfg.lambda_structure,
            cfg.margin_band,
            cfg.reweight_rounds,
            cfg.router_ridge,
            plan.split,
            cfg.router_solve,
        )
        R = fit.weight
        result.summary.setdefault("router_agreement", {})[layer.index] = fit.agreement
        if fit.solve == "cg":
            info = {"iterations": fit.cg_iterations, "dense_rows": fit.dense_rows}
            result.summary.setdefault("router_cg", {})[layer.index] = info
    if quantize:
        selection = adapter.route(plan.fp_logits, router).selection
        H = router_row_hessians(X, selection, k, cfg.lambda_value, cfg.lambda_structure, cfg.margin_band, plan.split)
        cfg.check_in_features(R.shape[1], f"model.layers.{layer.index}.router")
        qw: QuantizedWeight = gptq_solve(R[None].float(), H[None], cfg)
        R = qw.weight[0]
        result.weights[router_name(layer)] = qw
    router.weight.copy_(R.to(router.weight.dtype))


def stream_readers(adapter: MoEAdapter, layer: MoELayer) -> list[torch.Tensor]:
    """The weights ``(out, d)`` of a layer's linears that read the residual stream, each norm's weight folded in where
    the layer has it: attention's input projections (through ``input_layernorm``), the router and the shared experts'
    or dense MLP's gate/up (through ``post_attention_layernorm``). Not the routed experts: reading every expert's
    gate/up costs E times a dense MLP, and the router rows stand for what they read."""
    d = int(adapter.config.hidden_size)
    mlp = adapter.dense_mlp_linears(layer)
    if layer.is_moe:
        mlp = {"router": layer.router, **mlp}
    readers = []
    for norm_name, linears in (
        ("input_layernorm", adapter.attention_linears(layer)),
        ("post_attention_layernorm", mlp),
    ):
        norm = getattr(getattr(layer.layer, norm_name, None), "weight", None)
        for name, module in linears.items():
            W = module.weight.detach()
            if W.ndim != 2 or W.shape[1] != d or name.endswith(RESIDUAL_WRITERS):
                continue
            readers.append(W.float() if norm is None or norm.shape != (d,) else W.float() * norm.float().to(W.device))
    return readers


def router_name(layer: MoELayer) -> str:
    """The router's module name, e.g. ``model.layers.3.mlp.gate``."""
    child = next(n for n, m in layer.mlp.named_children() if m is layer.router)
    return f"model.layers.{layer.index}.mlp.{child}"


def gate_up_metric(
    adapter: MoEAdapter, experts: nn.Module, pairs, F: torch.Tensor, lam: float, chunk: slice | None = None
) -> torch.Tensor:
    """Per-expert output metric of the fused gate/up rows (DESIGN 3.5d), from the FP expert weights and the
    tokens the FP router sends to each expert (``F``: the next router's boundary factor, ``A = F F^T``); ``chunk``:
    only those experts' (the metric is ``(E, 2I, 2I)``)."""
    from .capture import expert_groups, in_chunk
    from .vsraq import metric, up_path_matrices

    X, tokens, eids, _ = pairs
    views = adapter.expert_weights(experts)
    chunk = slice(0, views["gate_proj"].shape[0]) if chunk is None else chunk
    tokens, eids, _ = in_chunk(tokens, eids, None, chunk)
    E, inter = chunk.stop - chunk.start, views["gate_proj"].shape[1]
    gate_scale = torch.zeros(E, inter, device=X.device)
    up_scale = torch.zeros(E, inter, device=X.device)
    act = experts.act_fn
    for e, sel in expert_groups(eids, E):
        x = X[tokens[sel]].float()
        g = x @ views["gate_proj"][chunk.start + e].float().T
        u = x @ views["up_proj"][chunk.start + e].float().T
        with torch.enable_grad():  # act'(g) by autograd: any activation the family uses
            gg = g.clone().requires_grad_(True)
            (d_act,) = torch.autograd.grad(act(gg).sum(), gg)
        up_scale[e] = act(g).pow(2).mean(0).sqrt()
        gate_scale[e] = (d_act * u).pow(2).mean(0).sqrt()
    return metric(up_path_matrices(F, views["down_proj"][chunk].detach(), gate_scale, up_scale), lam)


def probe_blocks(config, name: str, n: int) -> int:
    """Into how many equal diagonal blocks the probe metric of a linear with ``n`` outputs is cut (1: whole). Whole
    while ``n`` is within the fast solve's rank limit (every linear of the fixtures); beyond, one block per head of
    a projection with heads (q_proj and MLA's q_b/kv_b: the query heads, k_proj: the kv heads), as v_proj's metric
    is cut (its heads mix different tokens), else (a latent such as MLA's q_a, an MLP's gate/up: 18432 wide in
    DeepSeek-V3's dense layers) contiguous blocks of at most that limit. The blocks keep the probes' memory at
    ``n x limit`` instead of ``n^2`` (q_b_proj 24576, kv_b_proj 32768 wide in DeepSeek-V3: 5-9 GB a batch in float64
    whole) and give each block up to ``limit`` directions in the solve instead of ``limit`` for the whole matrix."""
    if n <= METRIC_RANK:
        return 1
    heads = getattr(config, "num_attention_heads", None) or 1
    kv = getattr(config, "num_key_value_heads", None) or heads
    nb = {"q_proj": heads, "q_b_proj": heads, "kv_b_proj": heads, "k_proj": kv}.get(name.rsplit(".", 1)[-1])
    if nb is not None and n % nb == 0 and n // nb <= METRIC_RANK:
        return nb
    return next(nb for nb in range(-(-n // METRIC_RANK), n + 1) if n % nb == 0)


def probe_directions(F: torch.Tensor, k: int) -> torch.Tensor:
    """The probes of ``probe_matrices`` for ``A = F F^T`` (``F`` ``(d, r)``): ``A``'s top ``k`` eigenvectors (those
    above 1e-6 of the largest), each scaled by the root of its eigenvalue, as rows ``(k, d)``: ``U^T U`` is ``A``
    itself when its rank is at most ``k``. Made once per layer and writer, from the ``(r, r)`` Gram of ``F``."""
    from .vsraq import top_eigen

    lam, U = top_eigen(F.double(), k)
    if not lam.numel():
        return U.T.float()  # (0, d): A = 0, nothing to probe
    keep = lam > lam[-1].clamp(min=1e-30) * 1e-6
    return U[:, keep].T.float()


def probe_matrices(
    runner,
    layer: nn.Module,
    x_q: list[torch.Tensor],
    linears: dict[str, nn.Linear],
    writer: nn.Linear,
    U: torch.Tensor,
    batches: int = 4,
    first_batch: int = 0,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    blocks: dict[str, int] | None = None,
    alone: tuple[nn.Module, nn.Module] | None = None,
) -> dict[str, torch.Tensor]:
    """A boundary matrix ``A`` at a residual writer's output carried back to the outputs of the ``linears`` that feed
    it inside the layer (DESIGN 3.5d; q/k through attention's softmax, gate/up through the MLP's activation):
    ``B = sum_s sum_t J_st^T A J_st``, ``J_st`` = d(writer's output at token s) / d(linear's output at token t),
    normalised and cut to the fast solve's rank.

    No closed form through softmax, so by probes: for each row ``u`` of ``U`` (``probe_directions(A, k)``), one
    backward pass of ``sum_s eps_s u . y_s`` with random signs ``eps_s`` per token. The writer is linear, so that is
    the pass of ``sum_s eps_s (W^T u) . x_s`` from its input ``x``: the backward starts below the writer (at
    Qwen3-30B-A3B's o_proj, 4096 x 2048, most of each pass's work). Where a linear's output at t
    reaches only token t (q, an MLP's gate/up) the sum is exact for ``A`` of rank up to ``k``; where it reaches later
    tokens (k) the cross terms cancel in expectation. On the first ``batches`` calibration batches of the run;
    ``first_batch``: the run's index of ``x_q[0]`` (a distributed rank's share), the signs seeded by it, per-batch
    terms summed over the processes by ``reduce`` and then in batch order, so every world size gets the same
    matrices. ``blocks``: per linear, the number of equal diagonal blocks kept (``probe_blocks``); such a linear's
    matrix comes back as ``(blocks, n / blocks, n / blocks)``, normalised together (the largest top eigenvalue of the
    blocks is 1). ``alone = (entry, module)``: the layer is run without autograd only as far as ``entry``'s input, and
    ``module`` alone on it (a shared MLP takes the MoE block's input: the routed experts, which run before it, are
    skipped)."""
    from .capture import StopForward
    from .vsraq import top_directions

    outs: dict[str, torch.Tensor] = {}
    final: list[torch.Tensor] = []

    def keep_out(name):
        def hook(_m, _a, out):
            outs[name] = out = out.detach().requires_grad_(True)  # the leaf the probes differentiate against
            return out

        return hook

    def stop(_m, args, kwargs):  # the writer's input: its output is never computed
        final.append(args[0] if args else kwargs["input"])
        raise StopForward

    device = U.device
    nb = {n: (blocks or {}).get(n, 1) for n in linears}
    terms = {n: torch.zeros(batches, nb[n], lin.out_features // nb[n], lin.out_features // nb[n], dtype=torch.float64,
                            device=device) for n, lin in linears.items()}  # fmt: skip
    entry: list[torch.Tensor] = []

    def grab(_m, args, kwargs):
        if not entry:  # (armed: the module itself may be the entry)
            entry.append(args[0] if args else kwargs["hidden_states"])
            raise StopForward

    U_in = U.to(writer.weight.device).float() @ writer.weight.detach().float()  # rows W^T u: probes of the input
    handles = [lin.register_forward_hook(keep_out(n)) for n, lin in linears.items()]
    handles.append(writer.register_forward_pre_hook(stop, with_kwargs=True))
    if alone is not None:
        handles.append(alone[0].register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with torch.enable_grad():
            for i, (h, kw) in enumerate(zip(x_q, runner.kwargs, strict=True)):
                b = first_batch + i
                if b >= batches:
                    break
                if alone is None:
                    with contextlib.suppress(StopForward):
                        layer(runner.batch(h), **kw)
                else:
                    with torch.no_grad(), contextlib.suppress(StopForward):
                        layer(runner.batch(h), **kw)  # stopped at the entry (grab)
                    with contextlib.suppress(StopForward):
                        alone[1](entry[0])
                    entry.clear()
                y = final.pop()
                names = list(outs)
                U_ = U_in.to(y.device, y.dtype)
                gen = torch.Generator().manual_seed(b)
                per_probe: dict[str, list[torch.Tensor]] = {n: [] for n in names}
                for u in U_:
                    eps = (torch.randint(0, 2, (*y.shape[:-1], 1), generator=gen) * 2 - 1).to(y.device, y.dtype)
                    grads = torch.autograd.grad(y, [outs[n] for n in names], eps * u, retain_graph=True)
                    for n, g in zip(names, grads, strict=True):
                        per_probe[n].append(g.reshape(-1, g.shape[-1]).float())
                for n, gs in per_probe.items():  # the batch's term: one product over all its probes' rows
                    g = torch.cat(gs).reshape(-1, nb[n], gs[0].shape[-1] // nb[n]).transpose(0, 1)  # (blocks, rows, m)
                    terms[n][b] += (g.transpose(1, 2) @ g).double()
                outs.clear()
                del y
    finally:
        for hd in handles:
            hd.remove()
    out = {}
    for n, t in terms.items():
        if reduce is not None:
            reduce(t)
        B = t.sum(0)
        if nb[n] == 1:
            out[n] = top_directions(B[0], METRIC_RANK)
        else:
            out[n] = B / torch.linalg.eigvalsh(B)[:, -1].amax().clamp(min=1e-30)  # blocks within the rank limit
    return out
