"""Batched solves: GPTQ on a batch of same-shape weights with per-matrix fallbacks, mixed widths, starved experts.

The pipeline hands a batch (the experts of a layer, or one linear as a batch of one) and its Hessians; a matrix
whose Hessian is unusable falls back to RTN (reported), never NaN or a crash.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .config import QuantConfig
from .gptq import HessianAccumulator, HessianError, gptq_quantize
from .quantizer import QuantizedWeight, rtn

# Weight of each all-token sample in a starved expert's Hessian, relative to a routed token (DESIGN 3.5).
COVERAGE_WEIGHT = 0.05


@dataclass
class QuantizationResult:
    """Quantized weights by target (``(B, out, in)`` batches; experts ``B = E``) plus a run summary.

    A streamed run writes each layer's weights to the checkpoint as it finishes and keeps none here."""

    weights: dict[str, QuantizedWeight]
    config: QuantConfig
    summary: dict = field(default_factory=dict)
    fp_router_logits: dict[int, torch.Tensor] = field(default_factory=dict)
    source_dtype: torch.dtype | None = None  # dtype of the unquantized tensors in the checkpoint


def gptq_solve(
    W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, metric: torch.Tensor | None = None
) -> QuantizedWeight:
    """``gptq_quantize`` with the run's settings (and an output metric ``(rows, rows)`` or ``(B, rows, rows)``)."""
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
        cfg.metric_solve,
        with_error=False,
        mse=cfg.mse_norm,
    )
    return qw


def take(qws: list[tuple[torch.Tensor, QuantizedWeight]], B: int) -> QuantizedWeight:
    """Assemble per-subset results (batch indices, result) into one batch of B."""
    first = qws[0][1]

    def gather(attr: str) -> torch.Tensor:
        ref = getattr(first, attr)
        out = ref.new_empty((B, *ref.shape[1:]))
        for ids, qw in qws:
            out[ids.to(out.device)] = getattr(qw, attr)
        return out

    if len(qws) == 1 and qws[0][1].codes.shape[0] == B:  # one part covering the batch in order: no copies
        ids = qws[0][0].cpu()
        if torch.equal(ids, torch.arange(B)):
            return first
    if any(qw.prequant is not None for _, qw in qws):  # an RTN fallback rounded its own weight
        for _, qw in qws:
            if qw.prequant is None:
                own = qw.weight if qw.weight is not None else dequantize_grid(qw.codes, qw.scales, qw.zeros, qw.g_idx)
                qw.prequant = own
    widths = {qw.bits for _, qw in qws}
    per_matrix = None
    if len(widths) > 1:
        per_matrix = torch.empty(B, dtype=torch.long)
        for ids, qw in qws:
            per_matrix[ids.cpu()] = qw.bits
    return QuantizedWeight(
        codes=gather("codes"),
        scales=gather("scales"),
        zeros=gather("zeros"),
        g_idx=gather("g_idx"),
        weight=gather("weight") if first.weight is not None else None,  # (codes-only parts: rebuilt by the caller)
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
        dev_ids = ids.to(W.device)
        part = solve_batch(W[dev_ids], H[dev_ids], cfg.replace(bits=width), name, sub, rows_of(metric, dev_ids))
        parts.append((ids, part))
        fallbacks.extend({**f, "index": int(ids[f["index"]])} for f in sub)
    return take(parts, W.shape[0])


def rows_of(metric: torch.Tensor | None, ids) -> torch.Tensor | None:
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
    # A matrix's float64 sum is finite exactly when all its entries are (all_finite), without a bool copy of H.
    dead = torch.diagonal(H, dim1=-2, dim2=-1).eq(0).all(-1) | ~torch.isfinite(H.sum((-2, -1), dtype=torch.float64))
    solved = (~dead).nonzero().flatten()
    parts = []
    if solved.numel():
        every = solved.numel() == B  # the common case: no gathered copies of the batch
        try:
            Ws, Hs = (W, H) if every else (W[solved], H[solved])
            parts.append((solved, gptq_solve(Ws, Hs, cfg, metric if every else rows_of(metric, solved))))
        except HessianError:
            for i in solved.tolist():  # isolate the failing matrices
                one = torch.tensor([i], device=W.device)
                try:
                    parts.append((one, gptq_solve(W[i : i + 1], H[i : i + 1], cfg, rows_of(metric, one))))
                except HessianError as exc:
                    dead[i] = True
                    fallbacks.append({"target": name, "index": i, "action": "rtn", "reason": str(exc)[:200]})
    for i in dead.nonzero().flatten().tolist():
        if not any(f["target"] == name and f["index"] == i for f in fallbacks):
            fallbacks.append({"target": name, "index": i, "action": "rtn", "reason": "no calibration token"})
        fallback = rtn(W[i : i + 1].float(), cfg.bits, cfg.group_size, cfg.sym, cfg.mse_norm)
        parts.append((torch.tensor([i], device=W.device), fallback))
    return take(parts, B)


def with_coverage(
    acc: HessianAccumulator,
    cov_H: torch.Tensor,
    cov_tokens: int,
    starved: list[int],
    name: str,
    fallbacks: list[dict],
    in_place: bool = False,
) -> torch.Tensor:
    """Starved experts' Hessians blended with all-token coverage at a small per-token weight (DESIGN 3.5):
    ``H_e = (n_e H_e + c N H_all) / (n_e + c N)``, ``c`` = ``COVERAGE_WEIGHT``, ``N`` = all calibration tokens.
    ``in_place``: into ``acc.H`` itself (no copy of every expert's Hessian when the accumulator is done with)."""
    if not starved:
        return acc.H
    H = acc.H if in_place else acc.H.clone()
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


def dequantize_grid(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor):
    """``scale[g] * (code - zero[g])`` per column, batched ``(B, out, in)``: the solver's own arithmetic."""
    g = g_idx.long()[:, None, :].expand(-1, codes.shape[1], -1)
    s = torch.gather(scales, 2, g)
    z = torch.gather(zeros.float(), 2, g)
    return s * (codes.float() - z)


def weight_to(qw: QuantizedWeight, device: torch.device | str) -> QuantizedWeight:
    """The same result with every tensor on ``device`` (results are kept on the host between layers)."""
    move = lambda t: t if t is None else t.to(device)  # noqa: E731
    return QuantizedWeight(
        move(qw.codes), move(qw.scales), move(qw.zeros), move(qw.g_idx), move(qw.weight), qw.bits, qw.group_size,
        qw.bits_per_matrix, move(qw.prequant),
    )  # fmt: skip


def solve_shared(
    dist,
    W: torch.Tensor,
    H: torch.Tensor,
    cfg: QuantConfig,
    name: str,
    fallbacks: list[dict],
    expert_bits: torch.Tensor | None = None,
    metric: torch.Tensor | None = None,
    owner_of=None,
) -> QuantizedWeight:
    """``solve_experts`` over the ranks of a distributed run (``distributed.Dist``): each matrix of the batch is
    solved by one owner rank (longest first onto the least loaded; ``owner_of`` overrides it), which broadcasts
    its codes and grids; every rank rebuilds the dequantized weights from them with the solver's own arithmetic,
    so all ranks hold the same result bit for bit. One process (or no group): ``solve_experts`` itself."""
    if dist is None or not dist.active or dist.world == 1:
        return solve_experts(W, H, cfg, name, fallbacks, expert_bits, metric)
    if cfg.refine_steps > 0:
        raise NotImplementedError("block-wise refinement is not distributed yet; run it in one process.")
    B, R, C = W.shape
    owner = owner_of if owner_of is not None else dist.owners([float(R * C * C + C**3)] * B)
    mine = [i for i in range(B) if owner[i] == dist.rank]
    local: QuantizedWeight | None = None
    sub: list[dict] = []
    if mine:
        ids = torch.tensor(mine, device=W.device)
        bits = None if expert_bits is None else expert_bits[torch.tensor(mine)]
        local = solve_experts(W[ids], H[ids], cfg, name, sub, bits, rows_of(metric, ids))
    groups = 1 if cfg.group_size == -1 else C // cfg.group_size
    codes = torch.empty(B, R, C, dtype=torch.uint8, device=W.device)
    scales = torch.empty(B, R, groups, device=W.device)
    zeros = torch.empty(B, R, groups, dtype=torch.int32, device=W.device)
    g_idx = torch.empty(B, C, dtype=torch.int32, device=W.device)
    for r in range(dist.world):
        ids = [i for i in range(B) if owner[i] == r]
        if not ids:
            continue
        parts = [codes[ids], scales[ids], zeros[ids], g_idx[ids]]
        if r == dist.rank:
            parts = [local.codes.contiguous(), local.scales.contiguous(), local.zeros.contiguous(),
                     local.g_idx.contiguous()]  # fmt: skip
        for t in parts:
            dist.broadcast_(t, src=r)
        sel = torch.tensor(ids, device=W.device)
        codes[sel], scales[sel], zeros[sel], g_idx[sel] = parts
    for r, entries in enumerate(dist.all_gather_object([{**f, "index": mine[f["index"]]} for f in sub])):
        del r
        fallbacks.extend(entries)
    fallbacks.sort(key=lambda f: (f["target"], f["index"], f["action"]))
    widths = None
    if expert_bits is not None and len(set(expert_bits.tolist())) > 1:
        widths = expert_bits.clone()
    bits = cfg.bits if expert_bits is None else int(expert_bits.max())
    weight = dequantize_grid(codes, scales, zeros, g_idx)
    return QuantizedWeight(codes, scales, zeros, g_idx, weight, bits, cfg.group_size, widths)
