"""Evaluation (DESIGN 4): routing agreement per MoE layer, perplexity, next-token KL to the reference.

The same token windows go through the reference and every candidate model, in lockstep, one batch at a
time (so no model's full output distribution is ever held). Each model routes on its *own* hidden states:
its routers' logits are recorded by forward hooks and turned into decisions with the family's exact rule.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .models import get_adapter, record_router_logits
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
    route_tokens: int = 0

    def __post_init__(self) -> None:
        self.topk_set = [0.0] * self.num_layers
        self.overlap = [0.0] * self.num_layers
        self.top1 = [0.0] * self.num_layers


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, ids[:, 1:, None]).sum()
    return float(nll), ids[:, 1:].numel()


@torch.no_grad()
def evaluate(
    reference: nn.Module,
    models: dict[str, nn.Module],
    windows: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Metrics of every model against the reference on ``windows`` (the ``models`` part of report.json)."""
    adapter = get_adapter(reference)
    num_layers = len(adapter.moe_layers(reference))
    E = adapter.num_experts() if num_layers else 0
    acc = {name: _Accumulator(num_layers) for name in models}
    ref_acc = _Accumulator(num_layers)
    for m in (reference, *models.values()):
        m.eval()

    device = next(reference.parameters()).device
    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
        ids = windows[start : start + batch_size].to(device)
        with record_router_logits(adapter.moe_layers(reference)) as ref_store:
            ref_logits = reference(input_ids=ids).logits.float()
        ref_routes = [
            adapter.route(store[0], layer.router)
            for store, layer in zip(ref_store, adapter.moe_layers(reference), strict=True)
        ]
        ref_lp = F.log_softmax(ref_logits, dim=-1)
        nll, count = _nll(ref_logits, ids)
        ref_acc.nll += nll
        ref_acc.nll_tokens += count
        for name, model in models.items():
            a = acc[name]
            with record_router_logits(adapter.moe_layers(model)) as store:
                logits = model(input_ids=ids).logits.float()
            nll, count = _nll(logits, ids)
            a.nll += nll
            a.nll_tokens += count
            lp = F.log_softmax(logits, dim=-1)
            a.kl += float((ref_lp.exp() * (ref_lp - lp)).sum())
            a.kl_tokens += ids.numel()
            for i, (s, layer) in enumerate(zip(store, adapter.moe_layers(model), strict=True)):
                q = adapter.route(s[0], layer.router)
                r = ref_routes[i]
                a.topk_set[i] += float(topk_set_agreement(r.indices, q.indices, E).sum())
                a.overlap[i] += float(topk_overlap(r.indices, q.indices, E).sum())
                a.top1[i] += float(top1_agreement(r.selection, q.selection).sum())
            a.route_tokens += ids.numel()

    out: dict = {"__reference__": {"perplexity": math.exp(ref_acc.nll / ref_acc.nll_tokens)}}
    for name, a in acc.items():
        per_layer = {
            "topk_set_agreement": [x / a.route_tokens for x in a.topk_set],
            "topk_overlap": [x / a.route_tokens for x in a.overlap],
            "top1_agreement": [x / a.route_tokens for x in a.top1],
        }

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


def build_report(metrics: dict, reference_path: str, text_path: str, tokens: int) -> dict:
    """The report.json document (DESIGN 4 schema; tools and CI read these keys)."""
    metrics = dict(metrics)
    ref = metrics.pop("__reference__")
    return {
        "reference": {"path": reference_path, "perplexity": ref["perplexity"]},
        "text": {"path": text_path, "tokens": tokens},
        "models": metrics,
    }


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
    return "\n".join(lines) + "\n"


def plot_agreement(report: dict, path: Path) -> bool:
    """PNG of per-layer top-k set agreement, one line per model. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, m in report["models"].items():
        ys = [100 * y for y in m["per_layer"]["topk_set_agreement"]]
        ax.plot(range(len(ys)), ys, marker="o", label=name)
    ax.set_xlabel("MoE layer")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("top-k set agreement with FP (%)")
    ax.set_title("Routing agreement per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
