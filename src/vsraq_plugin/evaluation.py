"""Evaluation (DESIGN 4): routing agreement per MoE layer, perplexity, next-token KL to the reference.

The same token windows go through the reference and every candidate model, in lockstep, one batch at a
time (so no model's full output distribution is ever held). Each model routes on its *own* hidden states:
its routers' logits are recorded by forward hooks and turned into decisions with the family's exact rule.

Attribution (``attribution=True``, DESIGN 3.5e). At MoE layer l, with D_l the fraction of tokens whose
top-k set differs from the reference's (``1 - topk_set_agreement``):

- ``local_disagreement`` L_l: the fraction of tokens whose top-k set differs when the candidate's decoder
  layer l (its attention, norms and router: everything up to the router) is fed the reference's input of
  layer l, i.e. everything before layer l is full precision;
- ``inherited_disagreement`` I_l = D_l - L_l exactly: what the drift left by the layers before l adds. It
  is a difference of two rates and may be negative (drift can undo a local flip). Its two parts are also
  reported: ``drift_flips`` (tokens that disagree in the candidate's own run but not locally) minus
  ``drift_unflips`` (tokens that disagree locally but not in the candidate's own run) equals I_l.

Write sources (``write_sources=True``): where the router-logit error of MoE layer l comes from. The router reads
the residual stream ``h`` through its norm, ``z = R x``, ``x = gamma * h * r(h)``, ``r = (mean(h^2) + eps)^-1/2``;
the candidate's ``h`` differs from the reference's by the sum of every residual write before the router: the
embeddings, each earlier layer's attention and MLP outputs and layer l's own attention output (candidate minus
reference, each in its own model's run). Linearised at the reference's ``h`` (norm Jacobian
``J = gamma * r (I - h h^T r^2 / d)``), the logit error is ``e = (R_q - R) x_q + R J dh`` (the first term: the
candidate's router itself, e.g. VSRAQ's re-fit), and each source s, ``e_s = R J dh_s``, gets the share
``<e_s, e> / ||e||^2`` (summed over tokens and batches): the shares add up to 1 and a negative one cancels error.
``write_sources_fit`` is ``1 - ||e_actual - e||^2 / ||e_actual||^2``, how much of the recorded logit error the
linearisation explains, and ``router_logit_error_rms`` the recorded error's root mean square (a source's share
times its square compares models in absolute terms).

Components (``component_attribution``): which parts of a quantized model the routing flips come from. Each group
of modules (every layer's attention, routers, routed experts, shared experts, dense MLPs; or each of those per
layer) is put back to the reference's, alone, and the model evaluated again; the fall in top-k disagreement is
that group's share. The shares need not add up to one: flips rise with the error of the router logits, and the
errors of several groups add to it together. It points ``dynamic`` overrides (more bits where it pays) at a model.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .methods import router_name
from .models import MoEAdapter, MoELayer, child_name, get_adapter, record_router_logits, set_module
from .routing import top1_agreement, topk_overlap, topk_set_agreement
from .text import cut_windows, split_documents, token_stream
from .validation import InputError, positive_int


def token_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``(n, seq_len)`` of the tokenised text (documents joined by EOS)."""
    positive_int(seq_len, "seq_len", "a window needs a next token to predict", minimum=2)
    if max_windows is not None:
        positive_int(max_windows, "max_windows", "windows of the text to evaluate")
    ids = token_stream(tokenizer, split_documents(text))
    if ids.numel() == 0:
        raise InputError("the evaluation text holds no tokens (it is empty or only whitespace); pass a real text.")
    windows = cut_windows(ids, seq_len, max_windows)
    if windows.shape[0] == 0:
        raise InputError(
            f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}; pass a longer text or a "
            "smaller --seq-len."
        )
    return windows


@dataclass
class _Accumulator:
    num_layers: int
    nll: float = 0.0
    nll_tokens: int = 0
    kl: float = 0.0
    kl_tokens: int = 0
    topk_set: list[float] = field(default_factory=list)
    overlap: list[float] = field(default_factory=list)
    top1: list[float] = field(default_factory=list)
    local: list[float] = field(default_factory=list)
    drift_flips: list[float] = field(default_factory=list)
    drift_unflips: list[float] = field(default_factory=list)
    route_tokens: int = 0
    sources: list[dict[str, float]] = field(default_factory=list)  # write sources: <e_s, e> per MoE layer
    source_terms: list[list[float]] = field(default_factory=list)  # ||e||^2, ||e_actual - e||^2, ||e_actual||^2

    def __post_init__(self) -> None:
        for name in ("topk_set", "overlap", "top1", "local", "drift_flips", "drift_unflips"):
            setattr(self, name, [0.0] * self.num_layers)
        self.sources = [{} for _ in range(self.num_layers)]
        self.source_terms = [[0.0, 0.0, 0.0] for _ in range(self.num_layers)]


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, ids[:, 1:, None]).sum()
    return float(nll), ids[:, 1:].numel()


class _Stop(Exception):
    """Ends a forward early once the router of interest has fired."""


class _LayerInputs:
    """Forward pre-hooks on decoder layers: each layer's input hidden states and its keyword arguments
    (position embeddings, masks) of the last forward, without the cache."""

    def __init__(self, layers: list[MoELayer]) -> None:
        self.hidden: dict[int, torch.Tensor] = {}
        self.kwargs: dict[int, dict] = {}
        self.handles = [m.layer.register_forward_pre_hook(self._hook(m.index), with_kwargs=True) for m in layers]

    def _hook(self, index: int):
        def hook(_module, args, kwargs):
            self.hidden[index] = (args[0] if args else kwargs["hidden_states"]).detach()
            drop = ("hidden_states", "past_key_values", "cache", "use_cache")
            self.kwargs[index] = {k: v for k, v in kwargs.items() if k not in drop}

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _local_logits(layer: MoELayer, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Router logits of a decoder layer run on ``hidden`` (stopped as soon as its router has fired)."""
    out: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        logits = output[0] if isinstance(output, tuple) else output
        out.append(logits.detach().float().reshape(-1, logits.shape[-1]))
        raise _Stop

    handle = layer.router.register_forward_hook(hook)
    try:
        layer.layer(hidden, **kwargs, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not out:
        raise RuntimeError(f"layer {layer.index}: its router did not run; cannot attribute its routing flips.")
    return out[0]


class _Writes:
    """Forward hooks for write-source attribution (module docstring) on one model: the embeddings (the first layer's
    input), every layer's attention and MLP outputs (its two residual writes) and, per MoE layer, the input of the
    norm in front of the router (``h``) and the router's own input (``x``), as ``(tokens, d)`` float32."""

    def __init__(self, layers: list[MoELayer]) -> None:
        self.t: dict = {}
        self.handles = [layers[0].layer.register_forward_pre_hook(self._hook("embeddings", pre=True), with_kwargs=True)]
        for layer in layers:
            self.handles.append(layer.attention.register_forward_hook(self._hook(f"layer {layer.index} attention")))
            self.handles.append(layer.mlp.register_forward_hook(self._hook(f"layer {layer.index} mlp")))
            if layer.is_moe:
                norm = _router_norm(layer)
                self.handles.append(norm.register_forward_pre_hook(self._hook(("h", layer.index), pre=True),
                                                                   with_kwargs=True))  # fmt: skip
                self.handles.append(layer.router.register_forward_pre_hook(self._hook(("x", layer.index), pre=True),
                                                                           with_kwargs=True))  # fmt: skip

    def _hook(self, key, pre: bool = False):
        def keep(x: torch.Tensor) -> None:
            self.t[key] = x.detach().float().reshape(-1, x.shape[-1])

        if pre:
            return lambda _m, args, kwargs: keep(args[0] if args else kwargs["hidden_states"])
        return lambda _m, _args, out: keep(out[0] if isinstance(out, tuple) else out)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _router_norm(layer: MoELayer) -> nn.Module:
    norm = getattr(layer.layer, "post_attention_layernorm", None)
    if norm is None:
        raise NotImplementedError(
            f"layer {layer.index} ({type(layer.layer).__name__}) has no post_attention_layernorm in front of its "
            "router; write-source attribution knows only that layout (run without write_sources)."
        )
    return norm


def logit_error_sources(
    h: torch.Tensor,
    deltas: dict[str, torch.Tensor],
    x_q: torch.Tensor,
    weight: torch.Tensor,
    weight_q: torch.Tensor,
    gamma: torch.Tensor | None,
    eps: float,
    total: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One MoE router's linearised logit error ``e`` ``(T, E)`` and every source's ``<e_s, e>`` (module docstring).

    ``h`` ``(T, d)``: the reference's input of the router's RMSNorm; ``deltas``: source -> ``(T, d)`` candidate minus
    reference residual write (they sum to the candidate's ``h`` minus the reference's); ``x_q``: the candidate's router
    input; ``weight`` / ``weight_q``: the reference's and the candidate's router weights ``(E, d)``; ``gamma``, ``eps``:
    the norm's scale (None: 1) and epsilon; ``total``: the deltas' sum when the caller has it already. The
    candidate's router change enters as the source ``"router"``."""
    d = h.shape[-1]
    g = torch.ones(d, dtype=h.dtype, device=h.device) if gamma is None else gamma.to(h.dtype)
    r = (h.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    R = weight.to(h.dtype)

    def jac(v: torch.Tensor) -> torch.Tensor:  # J v = gamma * r (v - h (h.v) r^2 / d): symmetric but for gamma
        return r * (v - h * ((h * v).sum(-1, keepdim=True) * r.pow(2) / d))

    e_router = x_q.to(h.dtype) @ (weight_q.to(h.dtype) - R).T
    e = e_router + (g * jac(sum(deltas.values()) if total is None else total)) @ R.T
    back = jac(g * (e @ R))  # J^T R^T e: <e_s, e> = <dh_s, back> for every source without forming e_s
    terms = {"router": float((e_router * e).sum())}
    terms.update({name: float((dh * back).sum()) for name, dh in deltas.items()})
    return e, terms


@torch.no_grad()
def evaluate(
    reference: nn.Module,
    models: dict[str, nn.Module],
    windows: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
    attribution: bool = False,
    write_sources: bool = False,
) -> dict:
    """Metrics of every model against the reference on ``windows`` (the ``models`` part of report.json).

    ``attribution``: also split each MoE layer's disagreement into local and inherited (module docstring).
    ``write_sources``: also split each MoE router's logit error over the residual writes before it (module
    docstring); holds every layer's two writes of the batch, twice, while it runs (use a small ``batch_size`` on a
    large model)."""
    adapter = get_adapter(reference)
    ref_layers = adapter.moe_layers(reference)
    ref_all = adapter.layers(reference) if write_sources else None
    num_layers = len(ref_layers)
    E = adapter.num_experts() if num_layers else 0
    acc = {name: _Accumulator(num_layers) for name in models}
    ref_acc = _Accumulator(num_layers)
    model_layers = {name: adapter.moe_layers(model) for name, model in models.items()}
    for m in (reference, *models.values()):
        m.eval()

    device = next(reference.parameters()).device
    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
        ids = windows[start : start + batch_size].to(device)
        ref_inputs = _LayerInputs(ref_layers) if attribution else None
        ref_writes = _Writes(ref_all) if write_sources else None
        try:
            with record_router_logits(ref_layers) as ref_store:
                ref_logits = reference(input_ids=ids, use_cache=False).logits.float()
        finally:
            for hooks in (ref_inputs, ref_writes):
                if hooks is not None:
                    hooks.close()
        ref_routes = [adapter.route(store[0], layer.router) for store, layer in zip(ref_store, ref_layers, strict=True)]
        ref_lp = F.log_softmax(ref_logits, dim=-1)
        nll, count = _nll(ref_logits, ids)
        ref_acc.nll += nll
        ref_acc.nll_tokens += count
        for name, model in models.items():
            a, layers = acc[name], model_layers[name]
            own_inputs = _LayerInputs(layers) if attribution else None  # the candidate's own layer kwargs
            own_writes = _Writes(adapter.layers(model)) if write_sources else None
            try:
                with record_router_logits(layers) as store:
                    logits = model(input_ids=ids, use_cache=False).logits.float()
            finally:
                for hooks in (own_inputs, own_writes):
                    if hooks is not None:
                        hooks.close()
            if write_sources:  # the candidate's writes minus the reference's, once per batch
                sources = _Sources(ref_writes.t, own_writes.t)
            nll, count = _nll(logits, ids)
            a.nll += nll
            a.nll_tokens += count
            lp = F.log_softmax(logits, dim=-1)
            a.kl += float((ref_lp.exp() * (ref_lp - lp)).sum())
            a.kl_tokens += ids.numel()
            for i, (s, layer) in enumerate(zip(store, layers, strict=True)):
                q = adapter.route(s[0], layer.router)
                r = ref_routes[i]
                same = topk_set_agreement(r.indices, q.indices, E)
                a.topk_set[i] += float(same.sum())
                a.overlap[i] += float(topk_overlap(r.indices, q.indices, E).sum())
                a.top1[i] += float(top1_agreement(r.selection, q.selection).sum())
                if attribution:
                    h = ref_inputs.hidden[layer.index].to(own_inputs.hidden[layer.index].dtype)
                    local = adapter.route(_local_logits(layer, h, own_inputs.kwargs[layer.index]), layer.router)
                    local_same = topk_set_agreement(r.indices, local.indices, E)
                    a.local[i] += float((1 - local_same).sum())
                    a.drift_flips[i] += float(((1 - same) * local_same).sum())
                    a.drift_unflips[i] += float(((1 - local_same) * same).sum())
                if write_sources:
                    sources.add(a, i, ref_layers[i], layer, s[0] - ref_store[i][0])
            if own_writes is not None:
                own_writes.t.clear()
            a.route_tokens += ids.numel()

    out: dict = {"__reference__": {"perplexity": math.exp(ref_acc.nll / ref_acc.nll_tokens)}}
    for name, a in acc.items():
        per_layer = {
            "topk_set_agreement": [x / a.route_tokens for x in a.topk_set],
            "topk_overlap": [x / a.route_tokens for x in a.overlap],
            "top1_agreement": [x / a.route_tokens for x in a.top1],
        }
        if attribution:
            per_layer["local_disagreement"] = [x / a.route_tokens for x in a.local]
            per_layer["inherited_disagreement"] = [  # from the token counts: exactly 0 where all flips are local
                (a.route_tokens - agree - loc) / a.route_tokens for agree, loc in zip(a.topk_set, a.local, strict=True)
            ]
            per_layer["drift_flips"] = [x / a.route_tokens for x in a.drift_flips]
            per_layer["drift_unflips"] = [x / a.route_tokens for x in a.drift_unflips]
        if write_sources:  # shares of the linearised logit error (sum 1), and how much of the real one it explains
            per_layer["write_sources"] = [
                {n: v / den for n, v in src.items()} if den > 0 else {}
                for src, (den, _, _) in zip(a.sources, a.source_terms, strict=True)
            ]
            per_layer["write_sources_fit"] = [1 - res / act if act > 0 else None for _, res, act in a.source_terms]
            # the recorded error's size: a share times its square compares models in absolute terms
            rms = [math.sqrt(act / (a.route_tokens * E)) for _, _, act in a.source_terms]
            per_layer["router_logit_error_rms"] = rms

        def mean(xs: list[float]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        out[name] = {
            "perplexity": math.exp(a.nll / a.nll_tokens),
            "kl": a.kl / a.kl_tokens,
            "topk_set_agreement": mean(per_layer["topk_set_agreement"]),
            "topk_overlap": mean(per_layer["topk_overlap"]),
            "top1_agreement": mean(per_layer["top1_agreement"]),
            "per_layer": per_layer,
        }
    return out


class _Sources:
    """One candidate's batch for write-source attribution: every write's difference to the reference's, formed once
    (the candidate's own copies are dropped as they are taken), and the running sum of the differences in stream
    order, so MoE layer l adds only the writes since the previous MoE layer: O(layers) work per batch on top of
    the per-source products, not O(layers^2)."""

    def __init__(self, ref_t: dict, own_t: dict) -> None:
        self.ref_t, self.own_t = ref_t, own_t
        self.deltas = {k: own_t.pop(k) - ref_t[k] for k in [k for k in own_t if isinstance(k, str)]}
        self.order = list(self.deltas)  # hook order = stream order: embeddings, layer 0 attention, layer 0 mlp, ...
        self.done, self.total = 0, None

    def add(self, a: _Accumulator, slot: int, ref: MoELayer, own: MoELayer, actual: torch.Tensor) -> None:
        """MoE layer ``ref.index``'s terms into ``a`` (``actual``: the candidate's recorded router logits minus the
        reference's); MoE layers come in increasing order."""
        L = ref.index
        upto = self.order.index(f"layer {L} attention") + 1  # every write before this layer's router
        for name in self.order[self.done : upto]:
            self.total = self.deltas[name] if self.total is None else self.total + self.deltas[name]
        self.done = upto
        norm = _router_norm(ref)
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        gamma = getattr(norm, "weight", None)
        deltas = {n: self.deltas[n] for n in self.order[:upto]}
        e, terms = logit_error_sources(self.ref_t[("h", L)], deltas, self.own_t[("x", L)], ref.router.weight,
                                       own.router.weight, None if gamma is None else gamma.detach(), eps,
                                       total=self.total)  # fmt: skip
        for n, v in terms.items():
            a.sources[slot][n] = a.sources[slot].get(n, 0.0) + v
        t = a.source_terms[slot]
        t[0] += float(e.pow(2).sum())
        t[1] += float((actual - e).pow(2).sum())
        t[2] += float(actual.pow(2).sum())


COMPONENT_KINDS = ("attention", "routers", "routed experts", "shared experts", "dense MLPs")


def component_groups(adapter: MoEAdapter, model: nn.Module, per_layer: bool = False) -> dict[str, list[str]]:
    """Module paths of each component group (``COMPONENT_KINDS``, across all layers or per layer)."""
    groups: dict[str, list[str]] = {}
    for layer in adapter.layers(model):
        p = f"model.layers.{layer.index}"
        mlp = {f"{p}.{n}" for n in adapter.dense_mlp_linears(layer)}
        kinds = {"attention": [f"{p}.{n}" for n in adapter.attention_linears(layer)]}
        if layer.is_moe:
            kinds["routers"] = [router_name(layer)]
            kinds["routed experts"] = [f"{p}.mlp.{child_name(layer.mlp, layer.experts)}"]
            kinds["shared experts"] = sorted(mlp)
        else:
            kinds["dense MLPs"] = sorted(mlp)
        for kind in COMPONENT_KINDS:
            if kinds.get(kind):
                groups.setdefault(f"layer {layer.index} {kind}" if per_layer else kind, []).extend(kinds[kind])
    return groups


@contextmanager
def _reference_modules(model: nn.Module, reference: nn.Module, paths: list[str]) -> Iterator[None]:
    """``model`` with the modules at ``paths`` replaced by copies of the reference's (in the model's dtype and
    on its device), put back on exit."""
    emb = model.get_input_embeddings().weight
    saved = {}
    try:
        for path in paths:
            saved[path] = model.get_submodule(path)
            set_module(model, path, copy.deepcopy(reference.get_submodule(path)).to(emb.device, emb.dtype))
        yield
    finally:
        for path, module in saved.items():
            set_module(model, path, module)


def component_attribution(
    reference: nn.Module,
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    per_layer: bool = False,
    progress: bool = True,
) -> dict:
    """For each component group of ``model`` (module docstring): the metrics with that group put back to the
    reference's, and ``disagreement_share``, the fall in top-k disagreement against the quantized model's own
    (1: every flip gone, negative: the group had been compensating for others, as VSRAQ's re-fitted routers do).
    One extra evaluation pass per group."""
    groups = component_groups(get_adapter(reference), reference, per_layer)
    base = evaluate(reference, {"quantized": model}, windows, batch_size, progress=False)["quantized"]
    d0 = 1.0 - base["topk_set_agreement"]
    out = {}
    for label, paths in tqdm(groups.items(), desc="components", unit="group", disable=not progress):
        with _reference_modules(model, reference, paths):
            m = evaluate(reference, {label: model}, windows, batch_size, progress=False)[label]
        d = 1.0 - m["topk_set_agreement"]
        out[label] = {
            "modules": len(paths),
            "topk_set_agreement": m["topk_set_agreement"],
            "kl": m["kl"],
            "perplexity": m["perplexity"],
            "disagreement_share": (d0 - d) / d0 if d0 > 0 else 0.0,
        }
    return out


def source_table(report: dict) -> str:
    """The write sources of the report's models that have them (``write_sources=True``) as markdown: per MoE layer
    the recorded logit error's rms, the linearisation's fit and the largest sources."""
    lines = [
        "Router-logit error per MoE layer by its source (rms: the recorded error's root mean square; share of the "
        "linearised error, largest first; fit: the share of the recorded error the linearisation explains):",
        "",
        "| model | MoE layer | rms | fit | largest sources |",
        "|---|---:|---:|---:|---|",
    ]
    for name, m in report["models"].items():
        pl = m["per_layer"]
        if "write_sources" not in pl:
            continue
        rows = zip(pl["write_sources"], pl["write_sources_fit"], pl["router_logit_error_rms"], strict=True)
        for i, (src, fit, rms) in enumerate(rows):
            top = sorted(src.items(), key=lambda kv: -abs(kv[1]))[:SOURCES_SHOWN]
            cells = ", ".join(f"{n} {100 * v:.0f} %" for n, v in top) or "no error"
            lines.append(f"| {name} | {i} | {rms:.4f} | {'-' if fit is None else f'{fit:.3f}'} | {cells} |")
    return "\n".join(lines) + "\n"


def component_table(components: dict[str, dict[str, dict]]) -> str:
    """``report.json``'s ``components`` (per model: per group) as markdown."""
    lines = [
        "Each group of modules put back to the reference's, alone (share: the fall in top-k disagreement):",
        "",
        "| model | group put back | top-k set agreement | disagreement share | KL to FP | perplexity |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, groups in components.items():
        for label, g in groups.items():
            lines.append(
                f"| {name} | {label} | {100 * g['topk_set_agreement']:.2f} % | {100 * g['disagreement_share']:.1f} % | "
                f"{g['kl']:.5f} | {g['perplexity']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def build_report(metrics: dict, reference_path: str, text_path: str, tokens: int) -> dict:
    """The report.json document (DESIGN 4 schema; tools and CI read these keys)."""
    metrics = dict(metrics)
    ref = metrics.pop("__reference__")
    return {
        "reference": {"path": reference_path, "perplexity": ref["perplexity"]},
        "text": {"path": text_path, "tokens": tokens},
        "models": metrics,
    }


SOURCES_SHOWN = 4  # write sources per MoE layer in report.md (report.json has all)


def markdown_table(report: dict) -> str:
    """One row per model, plus the reference's perplexity."""

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f} %"

    lines = [
        "| model | perplexity | KL to FP | top-k set agreement | top-k overlap | top-1 agreement |",
        "|---|---:|---:|---:|---:|---:|",
        f"| FP reference | {report['reference']['perplexity']:.3f} | 0 | 100 % | 100 % | 100 % |",
    ]
    for name, m in report["models"].items():
        lines.append(
            f"| {name} | {m['perplexity']:.3f} | {m['kl']:.5f} | {pct(m['topk_set_agreement'])} | "
            f"{pct(m['topk_overlap'])} | {pct(m['top1_agreement'])} |"
        )
    attributed = {n: m["per_layer"] for n, m in report["models"].items() if "local_disagreement" in m["per_layer"]}
    if attributed:
        n_layers = max(len(pl["local_disagreement"]) for pl in attributed.values())
        lines += [
            "",
            "Top-k disagreement per MoE layer, local / inherited (local: the layer fed the FP stream; "
            "inherited = total - local):",
            "",
            "| model | " + " | ".join(f"layer {i}" for i in range(n_layers)) + " |",
            "|---|" + "---:|" * n_layers,
        ]
        for name, pl in attributed.items():
            cells = [
                f"{100 * loc:.2f} / {100 * inh:.2f} %"
                for loc, inh in zip(pl["local_disagreement"], pl["inherited_disagreement"], strict=True)
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if any("write_sources" in m["per_layer"] for m in report["models"].values()):
        lines += ["", source_table(report).rstrip("\n")]
    if report.get("components"):
        lines += ["", component_table(report["components"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def plot_agreement(report: dict, path: Path) -> bool:
    """PNG of per-layer top-k set agreement, one line per model; with attribution, a second panel of the
    local (solid) and inherited (dashed) disagreement per layer. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    attributed = any("local_disagreement" in m["per_layer"] for m in report["models"].values())
    fig, axes = plt.subplots(1, 2 if attributed else 1, figsize=(12.0 if attributed else 6.4, 4.0), dpi=120)
    axes = list(axes) if attributed else [axes]
    ax = axes[0]
    colors = {}
    for name, m in report["models"].items():
        ys = [100 * y for y in m["per_layer"]["topk_set_agreement"]]
        (line,) = ax.plot(range(len(ys)), ys, marker="o", label=name)
        colors[name] = line.get_color()
    ax.set_ylabel("top-k set agreement with FP (%)")
    ax.set_title("Routing agreement per layer")
    if attributed:
        ax2 = axes[1]
        for name, m in report["models"].items():
            pl = m["per_layer"]
            if "local_disagreement" not in pl:
                continue
            xs = range(len(pl["local_disagreement"]))
            ax2.plot(xs, [100 * y for y in pl["local_disagreement"]], marker="o", color=colors[name], label=name)
            ax2.plot(xs, [100 * y for y in pl["inherited_disagreement"]], marker="s", ls="--", color=colors[name])
        ax2.axhline(0.0, color="0.6", lw=0.8)
        ax2.set_ylabel("top-k disagreement (%)")
        ax2.set_title("Local (solid) and inherited (dashed) flips")
    for a in axes:
        a.set_xlabel("MoE layer")
        a.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """Write report.json, report.md and agreement.png (when matplotlib is installed) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("report.json", json.dumps(report, indent=2) + "\n"), ("report.md", markdown_table(report))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out_dir / name)
        written.append(out_dir / name)
    if plot_agreement(report, out_dir / "agreement.png"):
        written.append(out_dir / "agreement.png")
    return written


def named(models: Iterable[tuple[str, nn.Module]]) -> dict[str, nn.Module]:
    """Unique names for models (``a``, ``a#2``, ...), order kept."""
    out: dict[str, nn.Module] = {}
    for name, model in models:
        key, n = name, 2
        while key in out:
            key, n = f"{name}#{n}", n + 1
        out[key] = model
    return out
