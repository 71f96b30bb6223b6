"""Layer-by-layer calibration with two streams (DESIGN 3.2), stock baselines, starved experts, resume.

For each decoder layer, in true-sequential order: attention's first linears (q/k/v), then o_proj, then
the experts' gate/up together with the shared experts' gate/up, then every down projection. Each stage
re-runs the layer over the calibration batches with the stages before it already quantized, so every
linear sees the inputs the quantized model really gives it. The experts' Hessians are accumulated by
scatter into one ``(E, d, d)`` tensor and solved as one batch.

Two streams: the quantized stream (inputs produced by the layers already quantized) feeds the solves; the
full-precision stream (the original model, layer by layer) is run once before anything is quantized and
records the FP router logits that the routing-aware method uses as targets (only ``vsraq`` needs it).

Methods: ``rtn``; ``gptq`` = stock GPTQ (unweighted Hessians, each expert sees the tokens the partially
quantized model routes to it, router untouched); ``agq`` = MoEQuant's affinity-guided GPTQ (expert Hessians
weighted by the gate score of the token).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .gptq import HessianAccumulator, HessianError, gptq_quantize
from .models import EXPERT_PROJECTIONS, MoEAdapter, MoELayer, get_adapter, record_router_logits, sequential_stages
from .quantizer import QuantizedWeight, rtn
from .text import cut_windows, split_documents, token_stream

# Weight of each all-token sample in a starved expert's Hessian, relative to a routed token (DESIGN 3.5).
COVERAGE_WEIGHT = 0.05


class CalibrationError(ValueError):
    """The calibration data cannot drive a quantization run; the message says how to fix it."""


# ---------------------------------------------------------------------------------------------- calibration
def calibration_windows(tokenizer, calib, seq_len: int = 256, n_samples: int = 128) -> torch.Tensor:
    """Token windows ``(n, seq_len)`` from a text file path, a list of texts, a ``datasets.Dataset`` with a
    ``text`` column, or token tensors (``(n, seq_len)`` or a list of 1-D tensors)."""
    if isinstance(calib, torch.Tensor) or (
        isinstance(calib, (list, tuple)) and calib and all(isinstance(t, torch.Tensor) for t in calib)
    ):
        ids = torch.cat([t.reshape(-1) for t in (calib if not isinstance(calib, torch.Tensor) else [calib])])
        ids = ids.long()
    else:
        texts = _calibration_texts(calib)
        if tokenizer is None:
            raise CalibrationError("texts need a tokenizer; pass tokenizer=... or token tensors.")
        ids = token_stream(tokenizer, texts)
    windows = cut_windows(ids, seq_len, n_samples)
    if windows.shape[0] == 0:
        raise CalibrationError(
            f"the calibration data hold {ids.numel()} tokens, fewer than one window of {seq_len}; pass more or "
            "longer texts, or a smaller seq_len."
        )
    return windows


def _calibration_texts(calib) -> list[str]:
    if isinstance(calib, (str, os.PathLike)):
        path = Path(calib)
        if not path.is_file():
            raise CalibrationError(f"calibration file {path} does not exist.")
        calib = split_documents(path.read_text(encoding="utf-8"))
    elif hasattr(calib, "column_names"):  # datasets.Dataset
        if "text" not in calib.column_names:
            raise CalibrationError(f"the dataset has columns {calib.column_names}; it needs a 'text' column.")
        calib = list(calib["text"])
    if not isinstance(calib, (list, tuple)) or not all(isinstance(t, str) for t in calib):
        raise CalibrationError(
            "calibration data must be a text file, a list of strings, a datasets.Dataset "
            "with a 'text' column, or token tensors."
        )
    texts = [t for t in calib if t.strip()]
    if not texts:
        raise CalibrationError("the calibration set is empty (no non-blank text); pass real texts.")
    return texts


# ---------------------------------------------------------------------------------------------- layer runner
class _Stop(Exception):
    pass


class LayerRunner:
    """Runs single decoder layers on stored hidden states with the kwargs the model gives its layers."""

    def __init__(self, model: nn.Module, adapter: MoEAdapter, windows: torch.Tensor, batch_size: int) -> None:
        layers = adapter.decoder_layers(model)
        captured: list[torch.Tensor] = []
        kwargs: list[dict] = []  # per batch: masks and position embeddings follow the batch's shape

        def catch(_module, args, kw):
            captured.append((args[0] if args else kw["hidden_states"]).detach())
            kw = {k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values")}
            kwargs.append({**kw, "use_cache": False})
            raise _Stop

        handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for start in range(0, windows.shape[0], batch_size):
                with contextlib.suppress(_Stop):
                    model(input_ids=windows[start : start + batch_size], use_cache=False)
        finally:
            handle.remove()
        self.kwargs = kwargs
        self.inputs = captured  # layer-0 inputs, one tensor per batch

    def run(self, layer: nn.Module, hidden: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outs = []
        for h, kw in zip(hidden, self.kwargs, strict=True):
            out = layer(h, **kw)
            outs.append(out[0] if isinstance(out, tuple) else out)
        return outs

    def capture(self, layer: nn.Module, hidden: Sequence[torch.Tensor]) -> None:
        """Run the layer only as far as the capture hooks need (they raise ``_Stop`` when done)."""
        for h, kw in zip(hidden, self.kwargs, strict=True):
            with contextlib.suppress(_Stop):
                layer(h, **kw)


# ---------------------------------------------------------------------------------------------- hooks
class _StageCapture:
    """Forward-pre hooks for one true-sequential stage: each named linear's inputs stream into its own
    Hessian accumulator; with ``experts``, the routed expert inputs are scattered into per-expert Hessians
    and kept (the down projections' inputs are derived from them later). Once every hooked module has
    fired in a forward, the forward is cut short: the rest of the layer is not needed for this stage."""

    def __init__(
        self,
        linears: dict[str, nn.Linear],
        experts: nn.Module | None = None,
        weighted: bool = False,
        token_weights: list[torch.Tensor] | None = None,
        fp_inputs: dict[str, list[torch.Tensor]] | None = None,
    ):
        self.acc = {name: HessianAccumulator(lin.in_features) for name, lin in linears.items()}
        # FP targets: sum_t w_t x~_t x_t^T against the FP stream's inputs of the same tokens (DESIGN 3.5c).
        self.fp_inputs = {n: v for n, v in (fp_inputs or {}).items() if n in linears}
        self.cross = {n: torch.zeros(linears[n].in_features, linears[n].in_features) for n in self.fp_inputs}
        self.cross_w = dict.fromkeys(self.fp_inputs, 0.0)
        self.batch = dict.fromkeys(linears, 0)
        self.token_weights = token_weights  # per calibration batch, or None (unweighted)
        self.calls = dict.fromkeys(linears, 0)
        self.handles = [lin.register_forward_pre_hook(self._linear_hook(name)) for name, lin in linears.items()]
        self.pending = set(linears) | ({"experts"} if experts is not None else set())
        self.seen: set[str] = set()
        self.experts, self.weighted = experts, weighted
        self.routed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if experts is not None:
            E, _, d = experts.gate_up_proj.shape
            self.expert_acc = HessianAccumulator(d, E)
            self.all_tokens = HessianAccumulator(d)
            self.handles.append(experts.register_forward_pre_hook(self._experts_hook, with_kwargs=True))

    def _done(self, name: str) -> None:
        self.seen.add(name)
        if self.seen >= self.pending:
            self.seen = set()
            raise _Stop

    def _linear_hook(self, name: str):
        def hook(_module, args):
            w = None
            if self.token_weights is not None:
                w = self.token_weights[self.calls[name]]
                self.calls[name] += 1
            self.acc[name].add(args[0].detach(), w)
            if name in self.fp_inputs:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                wt = torch.ones(x.shape[0]) if w is None else w.reshape(-1).float()
                self.cross[name] += (x * wt[:, None]).T @ self.fp_inputs[name][self.batch[name]]
                self.cross_w[name] += float(wt.sum())
            self.batch[name] += 1
            self._done(name)

        return hook

    def _experts_hook(self, _module, args, kwargs):
        x, idx, w = _routing_args(args, kwargs)
        x = x.reshape(-1, x.shape[-1]).float()
        tokens, eids = expert_pairs(x, idx)
        self.expert_acc.add(x[tokens], w.reshape(-1) if self.weighted else None, index=eids)
        self.all_tokens.add(x)
        self.routed.append((x, idx, w))
        self._done("experts")

    def cross_matrix(self, name: str) -> torch.Tensor:
        return (self.cross[name] / max(self.cross_w[name], 1e-12))[None]

    @property
    def active(self) -> bool:
        return bool(self.pending)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _routing_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args) + [kwargs[n] for n in names[len(args) :]]
    return vals[0].detach(), vals[1].detach(), vals[2].detach().float()


def expert_pairs(x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, slot) pairs of a routing decision as token indices and expert ids, flattened."""
    T, k = idx.shape
    return torch.arange(T, device=x.device).repeat_interleave(k), idx.reshape(-1).long()


def expert_hidden(
    experts: nn.Module, gate_up: torch.Tensor, x: torch.Tensor, tokens: torch.Tensor, expert_ids: torch.Tensor
) -> torch.Tensor:
    """The down projection's input ``gate(x W_gu^T)`` for each (token, expert) pair, in pair order.

    Pairs are grouped by expert (one matmul per non-empty group, no padding), gated with the family's own
    ``_apply_gate`` (default: ``act(gate) * up``), and returned in the caller's order.
    """
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=gate_up.shape[0]).tolist()
    xs = x[tokens[order]]
    out = xs.new_empty(xs.shape[0], gate_up.shape[1])
    start = 0
    for e, c in enumerate(counts):
        if c:
            torch.mm(xs[start : start + c], gate_up[e].T.to(xs.dtype), out=out[start : start + c])
            start += c
    gate_fn = getattr(experts, "_apply_gate", None)
    h = gate_fn(out) if gate_fn is not None else (lambda g, u: experts.act_fn(g) * u)(*out.chunk(2, dim=-1))
    result = torch.empty_like(h)
    result[order] = h
    return result


def down_hessians(
    experts: nn.Module,
    routed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    weighted: bool,
    coverage: list[int],
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[HessianAccumulator, HessianAccumulator | None]:
    """Per-expert Hessians of the down projections' inputs, computed with the current (quantized) gate/up
    weights from the routed inputs recorded in the gate/up stage (the router's input does not change when
    gate/up do, so no re-run is needed). ``coverage`` experts also get all-token Hessians."""
    E, two_i, _ = experts.gate_up_proj.shape
    acc = HessianAccumulator(two_i // 2, E)
    cov = HessianAccumulator(two_i // 2, len(coverage)) if coverage else None
    gate_up = experts.gate_up_proj.detach().float()
    for x, idx, w in routed:
        if pairs is not None:  # explicit (token, expert, weight) triples (VSRAQ's FP decisions)
            tokens, eids, pw = pairs
        else:
            tokens, eids = expert_pairs(x, idx)
            pw = w.reshape(-1) if weighted else None
        acc.add(expert_hidden(experts, gate_up, x, tokens, eids), pw, index=eids)
        if cov is not None:
            T = x.shape[0]
            slot = torch.arange(len(coverage), device=x.device).repeat_interleave(T)
            all_eid = torch.as_tensor(coverage, device=x.device).repeat_interleave(T)
            h = expert_hidden(experts, gate_up, x, torch.arange(T, device=x.device).repeat(len(coverage)), all_eid)
            cov.add(h, index=slot)
    return acc, cov


# ---------------------------------------------------------------------------------------------- solves
@dataclass
class QuantizationResult:
    """Quantized weights by target (``(B, out, in)`` batches; experts ``B = E``) plus a run summary."""

    weights: dict[str, QuantizedWeight]
    config: QuantConfig
    summary: dict = field(default_factory=dict)
    fp_router_logits: dict[int, torch.Tensor] = field(default_factory=dict)


def _gptq(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, metric: torch.Tensor | None = None) -> QuantizedWeight:
    qw, _, _ = gptq_quantize(
        W,
        H,
        cfg.bits,
        cfg.group_size,
        cfg.sym,
        cfg.desc_act,
        cfg.static_groups,
        cfg.damp_percent,
        cfg.damp_auto_increment,
        cfg.block_size,
        cfg.act_group_aware,
        None if metric is None else metric.expand(W.shape[0], W.shape[1], W.shape[1]),
        cfg.refine_steps > 0,  # refinement starts from the values the solver rounded
    )
    return qw


def _take(qws: list[tuple[torch.Tensor, QuantizedWeight]], B: int) -> QuantizedWeight:
    """Assemble per-subset results (batch indices, result) into one batch of B."""
    first = qws[0][1]

    def gather(attr: str) -> torch.Tensor:
        ref = getattr(first, attr)
        out = ref.new_empty((B, *ref.shape[1:]))
        for ids, qw in qws:
            out[ids] = getattr(qw, attr)
        return out

    if any(qw.prequant is not None for _, qw in qws):  # an RTN fallback rounded its own weight
        for _, qw in qws:
            if qw.prequant is None:
                qw.prequant = qw.weight
    widths = {qw.bits for _, qw in qws}
    per_matrix = None
    if len(widths) > 1:
        per_matrix = torch.empty(B, dtype=torch.long)
        for ids, qw in qws:
            per_matrix[ids] = qw.bits
    return QuantizedWeight(
        codes=gather("codes"),
        scales=gather("scales"),
        zeros=gather("zeros"),
        g_idx=gather("g_idx"),
        weight=gather("weight"),
        bits=max(widths),
        group_size=first.group_size,
        bits_per_matrix=per_matrix,
        prequant=gather("prequant") if first.prequant is not None else None,
    )


def solve_experts(
    W: torch.Tensor,
    H: torch.Tensor,
    cfg: QuantConfig,
    name: str,
    fallbacks: list[dict],
    expert_bits: torch.Tensor | None,
    metric: torch.Tensor | None = None,
) -> QuantizedWeight:
    """``solve_batch`` per width when the experts of a layer have different widths (mixed precision)."""
    if expert_bits is None or len(set(expert_bits.tolist())) == 1:
        width = cfg.bits if expert_bits is None else int(expert_bits[0])
        return solve_batch(W, H, cfg.replace(bits=width), name, fallbacks, metric)
    parts = []
    for width in sorted(set(expert_bits.tolist())):
        ids = (expert_bits == width).nonzero().flatten()
        sub: list[dict] = []
        parts.append((ids, solve_batch(W[ids], H[ids], cfg.replace(bits=width), name, sub, _rows_of(metric, ids))))
        fallbacks.extend({**f, "index": int(ids[f["index"]])} for f in sub)
    return _take(parts, W.shape[0])


def _rows_of(metric: torch.Tensor | None, ids) -> torch.Tensor | None:
    """A batch's slice of an output metric: a shared ``(rows, rows)`` one as is, a per-matrix one indexed."""
    return metric if metric is None or metric.dim() == 2 else metric[ids]


def solve_batch(
    W: torch.Tensor,
    H: torch.Tensor,
    cfg: QuantConfig,
    name: str,
    fallbacks: list[dict],
    metric: torch.Tensor | None = None,
) -> QuantizedWeight:
    """GPTQ on a batch; matrices whose Hessian is unusable fall back to RTN (reported), never NaN or a crash.
    ``metric``: an output metric ``(rows, rows)`` shared by the batch or ``(B, rows, rows)`` (DESIGN 3.5b)."""
    B = W.shape[0]
    dead = torch.diagonal(H, dim1=-2, dim2=-1).eq(0).all(-1) | ~torch.isfinite(H).all(-1).all(-1)
    solved = (~dead).nonzero().flatten()
    parts = []
    if solved.numel():
        try:
            parts.append((solved, _gptq(W[solved], H[solved], cfg, _rows_of(metric, solved))))
        except HessianError:
            for i in solved.tolist():  # isolate the failing matrices
                try:
                    parts.append((torch.tensor([i]), _gptq(W[i : i + 1], H[i : i + 1], cfg, _rows_of(metric, [i]))))
                except HessianError as exc:
                    dead[i] = True
                    fallbacks.append({"target": name, "index": i, "action": "rtn", "reason": str(exc)[:200]})
    for i in dead.nonzero().flatten().tolist():
        if not any(f["target"] == name and f["index"] == i for f in fallbacks):
            fallbacks.append({"target": name, "index": i, "action": "rtn", "reason": "no calibration token"})
        parts.append((torch.tensor([i]), rtn(W[i : i + 1].float(), cfg.bits, cfg.group_size, cfg.sym)))
    return _take(parts, B)


def _with_coverage(
    acc: HessianAccumulator, cov_H: torch.Tensor, cov_tokens: int, starved: list[int], name: str, fallbacks: list[dict]
) -> torch.Tensor:
    """Starved experts' Hessians blended with all-token coverage at a small per-token weight (DESIGN 3.5)."""
    H = acc.H.clone()
    for j, e in enumerate(starved):
        n_e, extra = float(acc.weight_sum[e]), COVERAGE_WEIGHT * cov_tokens
        cov = cov_H[j if cov_H.shape[0] > 1 else 0]
        H[e] = (n_e * acc.H[e] + extra * cov) / max(n_e + extra, 1e-12)
        fallbacks.append(
            {
                "target": name,
                "index": e,
                "action": "all-token coverage",
                "reason": f"{int(acc.tokens[e])} routed tokens < min_expert_tokens",
            }
        )
    return H


def split_rows(qw: QuantizedWeight, sizes: Sequence[int]) -> list[QuantizedWeight]:
    """Split a result along its output rows (GPTQ is separable over rows: the parts are exact)."""
    out, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        out.append(
            QuantizedWeight(
                qw.codes[:, rows],
                qw.scales[:, rows],
                qw.zeros[:, rows],
                qw.g_idx,
                qw.weight[:, rows],
                qw.bits,
                qw.group_size,
                qw.bits_per_matrix,
                None if qw.prequant is None else qw.prequant[:, rows],
            )
        )
        start += n
    return out


# ---------------------------------------------------------------------------------------------- targets (rtn)
@dataclass
class Target:
    """One batch of same-shape weights to quantize: ``weight`` is ``(B, out, in)`` (a view into the model)."""

    name: str
    weight: torch.Tensor
    kind: str  # "attention" | "expert" | "shared" | "mlp"


def layer_targets(adapter: MoEAdapter, layer: MoELayer) -> Iterator[Target]:
    """The quantization targets of one decoder layer, in true-sequential order."""
    prefix = f"model.layers.{layer.index}"
    for name, lin in adapter.attention_linears(layer).items():
        yield Target(f"{prefix}.{name}", lin.weight[None], "attention")
    if layer.is_moe:
        views = adapter.expert_weights(layer.experts)
        for proj in EXPERT_PROJECTIONS:
            yield Target(f"{prefix}.mlp.experts.{proj}", views[proj], "expert")
    for name, lin in adapter.dense_mlp_linears(layer).items():
        yield Target(f"{prefix}.{name}", lin.weight[None], "shared" if layer.is_moe else "mlp")


def _check_group_sizes(adapter: MoEAdapter, model: nn.Module, cfg: QuantConfig) -> None:
    for layer in adapter.layers(model):
        for t in layer_targets(adapter, layer):
            cfg.check_in_features(t.weight.shape[-1], t.name)


# ---------------------------------------------------------------------------------------------- the pipeline
@torch.no_grad()
def quantize_model(
    model: nn.Module,
    windows: torch.Tensor | None,
    config: QuantConfig,
    *,
    batch_size: int = 8,
    work_dir: str | Path | None = None,
    progress: bool = True,
    on_layer_done: Callable[[int], None] | None = None,
    router_init: dict[int, torch.Tensor] | None = None,
    expert_bits: dict[int, torch.Tensor] | None = None,
) -> QuantizationResult:
    """Quantize ``model`` in place with ``config.method`` on calibration ``windows`` ``(n, seq_len)``.

    The model ends up computing with the dequantized weights (float32); the returned result holds the
    integer codes and grids for the checkpoint. With ``work_dir``, every finished layer is saved there and a
    re-run with the same model, data and config resumes after the last finished layer, bit for bit.
    With ``config.bits_budget``, each MoE layer's experts get widths from ``mixed_precision`` (scored with
    ``router_init``, every router's weight at initialisation by layer index, when given); ``expert_bits``
    imposes an allocation instead (baselines: random or frequency-based allocations).
    """
    adapter = get_adapter(model)
    if config.router_mode == "quantize" and config.method != "vsraq":
        raise NotImplementedError("router_mode='quantize' is part of method='vsraq'; use it with that method.")
    if config.dynamic:
        raise NotImplementedError(
            "per-module `dynamic` overrides are not applied by the pipeline yet (they arrive with expert-wise mixed "
            "precision); quantize with dynamic={} for now."
        )
    if not config.true_sequential:
        raise NotImplementedError("only true_sequential=True is implemented (each stage sees the ones before it).")
    _check_group_sizes(adapter, model, config)
    if config.method != "rtn" and (windows is None or windows.dim() != 2 or windows.numel() == 0):
        raise CalibrationError(
            f"method={config.method!r} needs calibration windows: a non-empty (n, seq_len) "
            "token tensor (see calibration_windows)."
        )
    if next(model.parameters()).dtype != torch.float32:
        model.float()  # the in-memory model must hold the grid values exactly (bf16 cannot)
    model.eval()
    t_start = time.perf_counter()
    layers = adapter.layers(model)
    result = QuantizationResult(
        weights={}, config=config, summary={"method": config.method, "fallbacks": [], "layer_seconds": []}
    )
    if config.method == "rtn" and config.refine_steps > 0:
        raise NotImplementedError("refinement starts from a GPTQ solve: use method gptq, agq or vsraq with it.")
    if config.method == "rtn" and config.bits_budget is not None:
        raise NotImplementedError("expert-wise mixed precision is implemented for gptq, agq and vsraq, not rtn.")
    if config.method == "rtn":
        for layer in tqdm(layers, desc=f"rtn W{config.bits}", unit="layer", disable=not progress):
            t0 = time.perf_counter()
            for t in layer_targets(adapter, layer):
                qw = rtn(t.weight.float(), config.bits, config.group_size, config.sym)
                t.weight.copy_(qw.weight)
                result.weights[t.name] = qw
            result.summary["layer_seconds"].append(time.perf_counter() - t0)
        result.summary["seconds"] = time.perf_counter() - t_start
        return result

    runner = LayerRunner(model, adapter, windows, batch_size)
    x_q = runner.inputs
    moe_layers = {m.index: m for m in layers if m.is_moe}
    # Widths from the original weights (before a resume writes quantized ones back into the model).
    if expert_bits is not None:
        result.summary["expert_bits"] = {i: w.tolist() for i, w in expert_bits.items()}
        result.summary["expert_bits_scores"] = "given by the caller"
    elif config.bits_budget:
        expert_bits = _expert_widths(adapter, moe_layers, config, router_init, result)
    else:
        expert_bits = {}
    refine_routing = config.refine_steps > 0 and (config.refine_lambda_value > 0 or config.refine_lambda_structure > 0)
    if config.method == "vsraq" or refine_routing:  # every layer's FP router logits: layer l needs l+1's margins
        result.fp_router_logits.update(_fp_prepass(runner, layers, x_q))
    # The full-precision stream layer by layer, for the FP targets of the residual writers (DESIGN 3.5c).
    fp_targets = config.method == "vsraq" and config.fp_target_alpha > 0
    fp_stream = fp_targets or config.refine_steps > 0
    x_fp = list(x_q) if fp_stream else None
    state = _ResumeState(work_dir, model, windows, config) if work_dir is not None else None
    first = 0
    if state is not None:
        first, restored_q, restored_fp = state.restore(adapter, layers, result)
        if first:
            x_q = restored_q
            x_fp = restored_fp
    bar = tqdm(
        total=len(layers),
        initial=first,
        desc=f"{config.method} W{config.bits}g{config.group_size}",
        unit="layer",
        disable=not progress,
    )
    for layer in layers[first:]:
        t0 = time.perf_counter()
        # The FP stream past this layer, from its weights before they are quantized: the next layer's FP input
        # and the refinement's target. The FP targets also need the original layer during the stage captures.
        x_fp_next = runner.run(layer.layer, x_fp) if fp_stream else None
        fp = (copy.deepcopy(layer.layer), x_fp) if fp_targets else None
        _quantize_layer(runner, adapter, layer, x_q, config, result, moe_layers, expert_bits.get(layer.index), fp)
        del fp
        if config.refine_steps > 0:
            _refine(runner, adapter, layer, layers, x_q, x_fp_next, result, config, progress)
        x_q = runner.run(layer.layer, x_q)
        x_fp = x_fp_next
        result.summary["layer_seconds"].append(time.perf_counter() - t0)
        if state is not None:
            state.save_layer(layer, result, x_q, x_fp)
        bar.update(1)
        if on_layer_done is not None:
            on_layer_done(layer.index)
    bar.close()
    result.summary["seconds"] = time.perf_counter() - t_start
    return result


def _refine(runner, adapter, layer, layers, x_q, fp_out, result: QuantizationResult, cfg, progress) -> None:
    """Block-wise refinement of one solved layer (DESIGN 3.7): the next layer's attention and router on the path."""
    from .refine import refine_block

    nxt = layers[layer.index + 1] if layer.index + 1 < len(layers) else None
    nxt = nxt if nxt is not None and nxt.is_moe else None
    logits = result.fp_router_logits.get(nxt.index) if nxt is not None else None
    report = refine_block(runner, adapter, layer, nxt, x_q, fp_out, result.weights, logits, cfg, progress)
    loss = report["loss"]
    result.summary.setdefault("refine", {})[layer.index] = {"first_loss": loss[0], "last_loss": loss[-1]}
    for qw in result.weights.values():  # the pre-rounding values are only needed while a layer is refined
        qw.prequant = None


def _expert_widths(
    adapter: MoEAdapter,
    moe_layers: dict[int, MoELayer],
    cfg: QuantConfig,
    router_init: dict[int, torch.Tensor] | None,
    result: QuantizationResult,
) -> dict[int, torch.Tensor]:
    """Per MoE layer, the width of every expert (DESIGN 6), from the original weights."""
    from .mixed_precision import (
        ExpertScores,
        allocate_bits,
        max_intra_neuron_variance,
        router_norm_change,
        sensitivity_order,
    )

    widths, used = {}, []
    for index, layer in moe_layers.items():
        init = (router_init or {}).get(index)
        change, used_init = router_norm_change(layer.router.weight.detach(), init)
        used.append(used_init)
        variance = max_intra_neuron_variance(adapter.expert_weights(layer.experts))
        order = sensitivity_order(ExpertScores(change, variance, used_init), cfg.promote_factor)
        widths[index] = allocate_bits(order, cfg.bit_levels, cfg.bits_budget)
    result.summary["expert_bits"] = {i: w.tolist() for i, w in widths.items()}
    result.summary["expert_bits_scores"] = (
        "router-norm change since initialisation"
        if all(used)
        else "final router-row norm (no router at initialisation was given: the fallback of DESIGN 6)"
    )
    return widths


def _fp_prepass(runner: LayerRunner, layers: list[MoELayer], x_fp: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """The full-precision stream, layer by layer from the layer-0 inputs, recording the FP router logits of
    every MoE layer on the calibration tokens (DESIGN 3.2): the targets the routing terms preserve."""
    moe = [layer for layer in layers if layer.is_moe]
    hidden = x_fp
    with record_router_logits(moe) as store:
        for layer in layers:
            hidden = runner.run(layer.layer, hidden)
    return {layer.index: torch.cat(logits) for layer, logits in zip(moe, store, strict=True)}


def _quantize_layer(
    runner: LayerRunner,
    adapter: MoEAdapter,
    layer: MoELayer,
    x_q: list[torch.Tensor],
    cfg: QuantConfig,
    result: QuantizationResult,
    moe_layers: dict[int, MoELayer],
    expert_bits: torch.Tensor | None = None,
    fp: tuple[nn.Module, list[torch.Tensor]] | None = None,
) -> None:
    """Quantize one layer, stage by stage, each stage seeing the stages before it already quantized.
    ``fp``: this layer with its original weights and the FP stream's inputs (FP targets, DESIGN 3.5c)."""
    prefix = f"model.layers.{layer.index}"
    fallbacks = result.summary["fallbacks"]
    dense = adapter.dense_mlp_linears(layer)
    dense_stages = sequential_stages(dense) if dense else []
    stages: list[tuple[dict[str, nn.Linear], str | None]] = [
        (s, None) for s in sequential_stages(adapter.attention_linears(layer))
    ]
    if layer.is_moe:
        stages.append((dense_stages[0] if dense_stages else {}, "gate_up"))
        stages.append((dense_stages[1] if len(dense_stages) > 1 else {}, "down"))
    else:
        stages += [(s, None) for s in dense_stages]

    plan = _vsraq_plan(adapter, layer, x_q, cfg, result, moe_layers) if cfg.method == "vsraq" else None
    weighted = cfg.method == "agq"
    routed: list = []
    starved: list[int] = []
    pairs = None
    fp_experts_x = None
    for linears, expert_stage in stages:
        attn_w = plan.attention_weights if plan is not None and expert_stage is None else None
        fp_inputs = None
        if fp is not None:  # the FP stream's inputs of this stage's residual writers (and of the experts)
            names = [n for n in linears if n.endswith(("o_proj", "down_proj"))]
            extra = {"experts": _child(fp[0], layer, layer.experts)} if expert_stage == "gate_up" else {}
            fp_inputs = _record_inputs(
                runner, fp[0], x_fp=fp[1], modules={n: fp[0].get_submodule(n) for n in names}, **extra
            )
            fp_experts_x = fp_inputs.pop("experts", fp_experts_x)
        cap = _StageCapture(linears, layer.experts if expert_stage == "gate_up" else None, weighted, attn_w, fp_inputs)
        try:
            if cap.active:
                runner.capture(layer.layer, x_q)
        finally:
            cap.close()
        for name, lin in linears.items():
            metric = plan.metric_for(name) if plan is not None else None
            W = lin.weight[None].float()
            if name in cap.cross:
                W = _fp_target(W, cap.acc[name].H, cap.cross_matrix(name), cfg)
            qw = solve_batch(W, cap.acc[name].H, cfg, f"{prefix}.{name}", fallbacks, metric)
            lin.weight.copy_(qw.weight[0])
            result.weights[f"{prefix}.{name}"] = qw
        if expert_stage is None:
            continue
        experts = layer.experts
        if expert_stage == "gate_up":
            routed = cap.routed
            acc = cap.expert_acc
            if plan is not None:
                _align_router(adapter, layer, routed, cfg, plan, result)
                if plan.expert_pairs is not None:  # experts see the FP decisions, weighted (DESIGN 3.5)
                    X = torch.cat([x for x, _, _ in routed])
                    tokens, eids, w = plan.expert_pairs
                    pairs = (X, tokens, eids, w)
                    acc = HessianAccumulator(X.shape[1], acc.num_matrices)
                    acc.add(X[tokens], w, index=eids)
            starved = [e for e in range(acc.num_matrices) if int(acc.tokens[e]) < cfg.min_expert_tokens]
            name = f"{prefix}.mlp.experts.gate_up_proj"
            H = _with_coverage(acc, cap.all_tokens.H, int(cap.all_tokens.tokens[0]), starved, name, fallbacks)
            W = experts.gate_up_proj
        else:
            if pairs is not None:
                X, tokens, eids, w = pairs
                acc, cov = down_hessians(experts, [(X, None, None)], False, starved, pairs=(tokens, eids, w))
            else:
                acc, cov = down_hessians(experts, routed, weighted, starved)
            name = f"{prefix}.mlp.experts.down_proj"
            cov_tokens = int(cov.tokens.max()) if cov is not None else 0
            H = _with_coverage(acc, cov.H if cov is not None else acc.H[:1], cov_tokens, starved, name, fallbacks)
            W = experts.down_proj
            if fp is not None and pairs is not None and fp_experts_x is not None:
                fp_ex = _child(fp[0], layer, layer.experts)
                C = _expert_cross(experts, fp_ex, pairs, torch.cat(fp_experts_x))
                target = _fp_target(W.float(), acc.H, C, cfg)
                keep = torch.zeros(W.shape[0], dtype=torch.bool)
                keep[starved] = True  # their Hessians mix in all-token coverage: no matching cross term
                W = torch.where(keep[:, None, None], W.float(), target)
        metric = None
        if plan is not None and expert_stage == "down":
            metric = plan.metric_next
        elif plan is not None and plan.boundary_next is not None and pairs is not None:
            metric = _gate_up_metric(adapter, experts, pairs, plan.boundary_next, cfg.lambda_metric_up)
        qw = solve_experts(W.float(), H, cfg, name, fallbacks, expert_bits, metric)
        (experts.gate_up_proj if expert_stage == "gate_up" else experts.down_proj).copy_(qw.weight)
        if expert_stage == "gate_up":
            inter = experts.gate_up_proj.shape[1] // 2
            gate, up = split_rows(qw, [inter, inter])
            result.weights[f"{prefix}.mlp.experts.gate_proj"] = gate
            result.weights[f"{prefix}.mlp.experts.up_proj"] = up
        else:
            result.weights[f"{prefix}.mlp.experts.down_proj"] = qw


def _child(fp_layer: nn.Module, layer: MoELayer, module: nn.Module) -> nn.Module:
    """The module of the FP copy of a layer that sits where ``module`` sits in the layer."""
    name = next(n for n, m in layer.layer.named_modules() if m is module)
    return fp_layer.get_submodule(name)


def _record_inputs(runner: LayerRunner, fp_layer: nn.Module, x_fp, modules: dict, **more) -> dict:
    """Per calibration batch, the first input of each module of the FP layer copy on the FP stream."""
    modules = {**modules, **more}
    if not modules:
        return {}
    store: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    pending: set[str] = set()

    def hook(name):
        def fn(_module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            store[name].append(x.detach().reshape(-1, x.shape[-1]).float())
            pending.add(name)
            if pending >= set(modules):
                pending.clear()
                raise _Stop

        return fn

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in modules.items()]
    try:
        runner.capture(fp_layer, x_fp)
    finally:
        for h in handles:
            h.remove()
    return store


def _fp_target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    from .vsraq import fp_target_weight

    return fp_target_weight(W, H, C, cfg.fp_target_alpha, cfg.damp_percent)


def _expert_cross(experts: nn.Module, fp_experts: nn.Module, pairs, x_fp: torch.Tensor) -> torch.Tensor:
    """Per expert, ``C = sum w h~ h^T / sum w`` of the down projections' inputs: quantized stream (current,
    quantized gate/up) against FP stream (original gate/up on the FP hidden states), same (token, expert) pairs."""
    X, tokens, eids, w = pairs
    h_q = expert_hidden(experts, experts.gate_up_proj.detach().float(), X, tokens, eids)
    h_fp = expert_hidden(fp_experts, fp_experts.gate_up_proj.detach().float(), x_fp, tokens, eids)
    E, inter = experts.gate_up_proj.shape[0], h_q.shape[1]
    C = torch.zeros(E, inter, inter)
    for e in range(E):
        sel = (eids == e).nonzero().flatten()
        if sel.numel():
            we = w[sel].float()
            C[e] = (h_q[sel] * we[:, None]).T @ h_fp[sel] / we.sum().clamp(min=1e-12)
    return C


def _gate_up_metric(adapter: MoEAdapter, experts: nn.Module, pairs, A: torch.Tensor, lam: float) -> torch.Tensor:
    """Per-expert output metric of the fused gate/up rows (DESIGN 3.5d), from the FP expert weights and the
    tokens the FP router sends to each expert."""
    from .vsraq import metric, up_path_matrices

    X, tokens, eids, _ = pairs
    views = adapter.expert_weights(experts)
    E, inter = views["gate_proj"].shape[0], views["gate_proj"].shape[1]
    gate_scale, up_scale = torch.zeros(E, inter), torch.zeros(E, inter)
    act = experts.act_fn
    for e in range(E):
        x = X[tokens[eids == e]].float()
        if x.shape[0] == 0:
            continue
        g = x @ views["gate_proj"][e].float().T
        u = x @ views["up_proj"][e].float().T
        with torch.enable_grad():  # act'(g) by autograd: any activation the family uses
            gg = g.clone().requires_grad_(True)
            (d_act,) = torch.autograd.grad(act(gg).sum(), gg)
        up_scale[e] = act(g).pow(2).mean(0).sqrt()
        gate_scale[e] = (d_act * u).pow(2).mean(0).sqrt()
    return metric(up_path_matrices(A, views["down_proj"].detach(), gate_scale, up_scale), lam)


@dataclass
class _VsraqPlan:
    """What the VSRAQ terms need for one layer, from the FP router logits (DESIGN 3.3-3.6)."""

    fp_logits: torch.Tensor | None  # this layer's FP router logits (T, E), calibration order
    attention_weights: list[torch.Tensor] | None  # per-batch token weights for attention / shared experts
    expert_pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (token, expert, weight)
    metric_here: torch.Tensor | None = None  # output metric from this layer's router (o_proj), DESIGN 3.5b
    metric_next: torch.Tensor | None = None  # ... from the next MoE layer's router (down projections)
    metric_v: torch.Tensor | None = None  # this layer's metric carried back to v_proj (DESIGN 3.5d)
    boundary_next: torch.Tensor | None = None  # the next router's normalised boundary matrix A (gate/up metric)

    def metric_for(self, name: str) -> torch.Tensor | None:
        """The output metric of a residual writer by its name in the layer; None for the other linears."""
        if name.endswith("v_proj"):
            return self.metric_v
        if name.endswith("o_proj"):
            return self.metric_here
        if name.endswith("down_proj"):
            return self.metric_next
        return None


def _vsraq_plan(
    adapter: MoEAdapter,
    layer: MoELayer,
    x_q: list[torch.Tensor],
    cfg: QuantConfig,
    result: QuantizationResult,
    moe_layers: dict[int, MoELayer],
) -> _VsraqPlan:
    from .routing import boundary_margin
    from .vsraq import boundary_matrix, expert_pairs_fp, margin_scale, metric, token_weights, value_path_matrix

    logits = result.fp_router_logits
    k = adapter.router_rule().top_k if logits else 0
    sizes = [h.shape[0] * h.shape[1] for h in x_q]

    def margins_of(index: int) -> tuple[torch.Tensor, float]:
        sel = adapter.route(logits[index], moe_layers[index].router).selection
        m = boundary_margin(sel, k)
        return m, margin_scale(m)

    def boundary_of(index: int | None) -> torch.Tensor | None:
        """The router's normalised boundary matrix A (DESIGN 3.5b), when some output metric needs it."""
        if index is None or (cfg.lambda_metric <= 0 and cfg.lambda_metric_v <= 0 and cfg.lambda_metric_up <= 0):
            return None
        moe = moe_layers[index]
        norm = getattr(moe.layer, "post_attention_layernorm", None)
        sel = adapter.route(logits[index], moe.router).selection
        gamma = None if norm is None or getattr(norm, "weight", None) is None else norm.weight.detach().float()
        return boundary_matrix(moe.router.weight.detach().float(), gamma, sel, k)

    def residual_metric(A: torch.Tensor | None) -> torch.Tensor | None:
        return None if A is None or cfg.lambda_metric <= 0 else metric(A, cfg.lambda_metric)

    later = sorted(i for i in logits if i > layer.index)
    A_next = boundary_of(later[0] if later else None)  # each router's A is built once per layer
    if layer.index not in logits:  # a dense layer, or no FP pass
        return _VsraqPlan(None, None, None, None, residual_metric(A_next))
    fp = adapter.route(logits[layer.index], layer.router)  # this layer's FP decisions, computed once
    m = boundary_margin(fp.selection, k)
    tau = margin_scale(m)
    attention = None
    if cfg.lambda_attention > 0:
        attention = list(token_weights(m, cfg.lambda_attention, tau).split(sizes))
    pairs = None
    if cfg.lambda_expert > 0:
        nm, tau_next = margins_of(later[0]) if later else (None, None)
        pairs = expert_pairs_fp(fp, k, nm, cfg.lambda_expert, cfg.near_miss_weight, cfg.margin_band, tau_next, tau)
    A_here = boundary_of(layer.index)
    metric_v = None
    lins = adapter.attention_linears(layer)
    if cfg.lambda_metric_v > 0 and "self_attn.v_proj" in lins and "self_attn.o_proj" in lins:
        c = adapter.config
        heads, kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        B = value_path_matrix(A_here, lins["self_attn.o_proj"].weight.detach(), heads, kv)
        metric_v = metric(B, cfg.lambda_metric_v)
    return _VsraqPlan(
        logits.get(layer.index),
        attention,
        pairs,
        residual_metric(A_here),
        residual_metric(A_next),
        metric_v,
        A_next if cfg.lambda_metric_up > 0 else None,
    )


def _align_router(
    adapter: MoEAdapter, layer: MoELayer, routed: list, cfg: QuantConfig, plan: _VsraqPlan, result: QuantizationResult
) -> None:
    """Re-fit the router on the quantized stream toward the FP logits (DESIGN 3.3, 3.4); with
    ``router_mode="quantize"`` then GPTQ it on the same weighted row Hessians (the asymmetric-target form)."""
    from .vsraq import align_router, router_row_hessians

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
        fit = align_router(
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
        )
        R = fit.weight
        result.summary.setdefault("router_agreement", {})[layer.index] = fit.agreement
    if quantize:
        selection = adapter.route(plan.fp_logits, router).selection
        H = router_row_hessians(X, selection, k, cfg.lambda_value, cfg.lambda_structure, cfg.margin_band)
        cfg.check_in_features(R.shape[1], f"model.layers.{layer.index}.router")
        qw = _gptq(R[None].float(), H[None], cfg)
        R = qw.weight[0]
        result.weights[router_name(layer)] = qw
    router.weight.copy_(R.to(router.weight.dtype))


def router_name(layer: MoELayer) -> str:
    """The router's module name, e.g. ``model.layers.3.mlp.gate``."""
    child = next(n for n, m in layer.mlp.named_children() if m is layer.router)
    return f"model.layers.{layer.index}.mlp.{child}"


# ---------------------------------------------------------------------------------------------- resume
_FIELDS = ("codes", "scales", "zeros", "g_idx")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():  # safetensors refuses tensors that share memory (gate/up share g_idx)
        v = v.contiguous()
        out[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    save_file(out, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _ResumeState:
    """Per-layer state on disk: ``layer_NNNN.safetensors`` (that layer's codes and grids), the quantized
    stream after the last finished layer, and ``progress.json`` (written last, so a kill at any point leaves a
    consistent state). A fingerprint of the model, data and config guards against resuming another run."""

    def __init__(self, work_dir: str | Path, model: nn.Module, windows: torch.Tensor, config: QuantConfig):
        self.dir = Path(work_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        h.update(json.dumps(config.to_dict(), sort_keys=True).encode())
        h.update(windows.numpy().tobytes())
        h.update(model.config.to_json_string().encode())
        for p in model.parameters():
            h.update(p.detach().float().flatten()[:: max(1, p.numel() // 64)].numpy().tobytes())
        self.fingerprint = h.hexdigest()

    def restore(self, adapter: MoEAdapter, layers: list[MoELayer], result: QuantizationResult):
        prog = self.dir / "progress.json"
        if not prog.exists():
            return 0, None, None
        data = json.loads(prog.read_text())
        if data.get("fingerprint") != self.fingerprint:
            raise CalibrationError(
                f"the work dir {self.dir} belongs to another run (model, calibration data or config differ); "
                "delete it or pass a fresh one."
            )
        done = int(data["completed_layers"])
        keep = ("fallbacks", "layer_seconds", "router_agreement")
        result.summary.update({k: v for k, v in data["summary"].items() if k in keep})
        for layer in layers[:done]:
            tensors = load_file(str(self.dir / f"layer_{layer.index:04d}.safetensors"))
            names = sorted({k.rsplit(".", 1)[0] for k in tensors if not k.startswith("__") and not k.endswith(".bits")})
            for name in names:
                qw = _from_tensors(tensors, name, result.config)
                result.weights[name] = qw
            _apply_layer(adapter, layer, result.weights)
            if "__router__" in tensors:
                with torch.no_grad():
                    layer.router.weight.copy_(tensors["__router__"])
        streams = load_file(str(self.dir / f"streams_{done - 1:04d}.safetensors"))
        n = len([k for k in streams if k.startswith("q.")])
        x_q = [streams[f"q.{i}"] for i in range(n)]
        x_fp = [streams[f"f.{i}"] for i in range(n)] if "f.0" in streams else None
        return done, x_q, x_fp

    def save_layer(
        self, layer: MoELayer, result: QuantizationResult, x_q: list[torch.Tensor], x_fp: list[torch.Tensor] | None
    ) -> None:
        index = layer.index
        prefix = f"model.layers.{index}."
        tensors = {}
        if layer.is_moe:  # VSRAQ re-fits the 16-bit router: it is part of the layer's result
            tensors["__router__"] = layer.router.weight.detach()
        for name, qw in result.weights.items():
            if name.startswith(prefix):
                for f in _FIELDS:
                    tensors[f"{name}.{f}"] = getattr(qw, f)
                if qw.bits_per_matrix is not None:
                    tensors[f"{name}.bits"] = qw.bits_per_matrix
        _atomic_save(tensors, self.dir / f"layer_{index:04d}.safetensors")
        streams = {f"q.{i}": t for i, t in enumerate(x_q)}
        streams.update({f"f.{i}": t for i, t in enumerate(x_fp or [])})
        _atomic_save(streams, self.dir / f"streams_{index:04d}.safetensors")
        _atomic_write_text(
            self.dir / "progress.json",
            json.dumps(
                {"fingerprint": self.fingerprint, "completed_layers": index + 1, "summary": result.summary}, indent=1
            ),
        )
        old = self.dir / f"streams_{index - 1:04d}.safetensors"
        if old.exists():
            old.unlink()


def _from_tensors(tensors: dict[str, torch.Tensor], name: str, cfg: QuantConfig) -> QuantizedWeight:
    codes, scales = tensors[f"{name}.codes"], tensors[f"{name}.scales"]
    zeros, g_idx = tensors[f"{name}.zeros"], tensors[f"{name}.g_idx"]
    per_matrix = tensors.get(f"{name}.bits")
    bits = int(per_matrix.max()) if per_matrix is not None else cfg.bits
    return QuantizedWeight(
        codes, scales, zeros, g_idx, dequantize_grid(codes, scales, zeros, g_idx), bits, cfg.group_size, per_matrix
    )


def dequantize_grid(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor):
    """``scale[g] * (code - zero[g])`` per column, batched ``(B, out, in)``: the solver's own arithmetic."""
    g = g_idx.long()[:, None, :].expand(-1, codes.shape[1], -1)
    s = torch.gather(scales, 2, g)
    z = torch.gather(zeros.float(), 2, g)
    return s * (codes.float() - z)


def _apply_layer(adapter: MoEAdapter, layer: MoELayer, weights: dict[str, QuantizedWeight]) -> None:
    """Write a restored layer's dequantized weights into the model."""
    prefix = f"model.layers.{layer.index}"
    for name, lin in {**adapter.attention_linears(layer), **adapter.dense_mlp_linears(layer)}.items():
        lin.weight.copy_(weights[f"{prefix}.{name}"].weight[0])
    if layer.is_moe:
        ex = layer.experts
        gate, up = weights[f"{prefix}.mlp.experts.gate_proj"], weights[f"{prefix}.mlp.experts.up_proj"]
        ex.gate_up_proj.copy_(torch.cat([gate.weight, up.weight], dim=1))
        ex.down_proj.copy_(weights[f"{prefix}.mlp.experts.down_proj"].weight)
        if router_name(layer) in weights:
            layer.router.weight.copy_(weights[router_name(layer)].weight[0])
