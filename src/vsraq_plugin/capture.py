"""Running a decoder layer on stored hidden states and recording what its linears see (forward hooks, early stop).

The calibration streams are lists of per-batch hidden states ``(batch, seq, d)``. They live on the *store*
device (the solve device, or host memory when offloaded, ``QuantConfig.offload``); each batch is moved to the
*compute* device only while a layer runs on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .gptq import HessianAccumulator
from .models import MoEAdapter


class StopForward(Exception):
    """Raised by a capture hook once it has what it needs: the rest of the forward is not computed."""


def to_store(t: torch.Tensor, store: torch.device) -> torch.Tensor:
    """``t`` on the store device; host copies of device tensors go to pinned memory (fast transfers back)."""
    if t.device == store:
        return t
    if store.type == "cpu" and t.device.type == "cuda":
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t)
        return out
    return t.to(store)


class LayerRunner:
    """Runs single decoder layers on stored hidden states with the kwargs the model gives its layers.

    ``model`` only needs its embeddings and rotary module materialised: the forward is stopped at the first
    decoder layer's input (a streamed model's layers may still be on the meta device).
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: MoEAdapter,
        windows: torch.Tensor,
        batch_size: int,
        device: torch.device | str = "cpu",
        store: torch.device | str | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.store = torch.device(store) if store is not None else self.device
        layers = adapter.decoder_layers(model)
        captured: list[torch.Tensor] = []
        kwargs: list[dict] = []  # per batch: masks and position embeddings follow the batch's shape

        def catch(_module, args, kw):
            captured.append(to_store((args[0] if args else kw["hidden_states"]).detach(), self.store))
            kw = {k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values")}
            kwargs.append({**kw, "use_cache": False})
            raise StopForward

        handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for start in range(0, windows.shape[0], batch_size):
                with contextlib.suppress(StopForward):
                    model(input_ids=windows[start : start + batch_size].to(self.device), use_cache=False)
        finally:
            handle.remove()
        self.kwargs = kwargs
        self.inputs = captured  # layer-0 inputs, one tensor per batch (on the store device)

    def batch(self, h: torch.Tensor) -> torch.Tensor:
        """A stored batch on the compute device."""
        return h.to(self.device, non_blocking=True)

    def run(self, layer: nn.Module, hidden: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The layer's output for every batch, stored like the inputs."""
        outs = []
        for h, kw in zip(hidden, self.kwargs, strict=True):
            out = layer(self.batch(h), **kw)
            outs.append(to_store(out[0] if isinstance(out, tuple) else out, self.store))
        return outs

    def capture(self, layer: nn.Module, hidden: Sequence[torch.Tensor]) -> None:
        """Run the layer only as far as the capture hooks need (they raise ``StopForward`` when done)."""
        for h, kw in zip(hidden, self.kwargs, strict=True):
            with contextlib.suppress(StopForward):
                layer(self.batch(h), **kw)


class StageCapture:
    """Forward-pre hooks for one true-sequential stage: each named linear's inputs stream into its own
    Hessian accumulator; with ``experts``, the routed expert inputs are kept (``routed``: the experts' Hessians
    are built from them afterwards, a chunk of experts at a time, ``expert_hessians``) and summed into one
    all-token Hessian (coverage for starved experts). Once every hooked module has
    fired in a forward, the forward is cut short: the rest of the layer is not needed for this stage."""

    def __init__(
        self,
        linears: dict[str, nn.Linear],
        experts: nn.Module | None = None,
        weighted: bool = False,
        token_weights: list[torch.Tensor] | None = None,
        fp_inputs: dict[str, list[torch.Tensor]] | None = None,
        exact: bool = False,
        drift: dict[str, list[torch.Tensor]] | None = None,
    ):
        devices = [lin.weight.device for lin in linears.values()]
        if experts is not None:
            devices.append(experts.gate_up_proj.device)
        device = devices[0] if devices else None
        self.exact = exact
        self.acc = {n: HessianAccumulator(lin.in_features, device=device, exact=exact) for n, lin in linears.items()}
        # FP targets: sum_t w_t x~_t x_t^T against the FP stream's inputs of the same tokens (DESIGN 3.5c); in
        # exact mode (distributed runs) a float64 sum of the per-batch float32 terms.
        self.fp_inputs = {n: v for n, v in (fp_inputs or {}).items() if n in linears}
        dt = torch.float64 if exact else torch.float32
        self.cross = {
            n: torch.zeros(linears[n].in_features, linears[n].in_features, device=device, dtype=dt)
            for n in self.fp_inputs
        }
        self.cross_w = {n: torch.zeros((), dtype=torch.float64, device=device) for n in self.fp_inputs}
        # Drift targets (DESIGN 3.5e (ii)): sum_t w_t d_t x~_t^T, d_t the residual stream's drift (FP - quantized) where
        # the linear writes, per calibration batch ``(tokens, out)``.
        self.drift = {n: v for n, v in (drift or {}).items() if n in linears}
        self.drift_cross = {
            n: torch.zeros(linears[n].out_features, linears[n].in_features, device=device, dtype=dt) for n in self.drift
        }
        self.drift_w = {n: torch.zeros((), dtype=torch.float64, device=device) for n in self.drift}
        self.batch = dict.fromkeys(linears, 0)
        self.token_weights = token_weights  # per calibration batch, or None (unweighted)
        self.calls = dict.fromkeys(linears, 0)
        self.handles = [lin.register_forward_pre_hook(self._linear_hook(name)) for name, lin in linears.items()]
        self.pending = set(linears) | ({"experts"} if experts is not None else set())
        self.seen: set[str] = set()
        self.experts, self.weighted = experts, weighted
        self.routed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if experts is not None:
            d = experts.gate_up_proj.shape[-1]
            self.all_tokens = HessianAccumulator(d, device=device, exact=exact)
            self.handles.append(experts.register_forward_pre_hook(self._experts_hook, with_kwargs=True))

    def _done(self, name: str) -> None:
        self.seen.add(name)
        if self.seen >= self.pending:
            self.seen = set()
            raise StopForward

    def _linear_hook(self, name: str):
        def hook(_module, args):
            w = None
            if self.token_weights is not None:
                w = self.token_weights[self.calls[name]]
                self.calls[name] += 1
            self.acc[name].add(args[0].detach(), w)
            if name in self.fp_inputs or name in self.drift:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                wt = torch.ones(x.shape[0], device=x.device) if w is None else w.reshape(-1).float()
            if name in self.fp_inputs:
                term = (x * wt[:, None]).T @ self.fp_inputs[name][self.batch[name]]
                self.cross[name] += term.double() if self.exact else term
                self.cross_w[name] += float(wt.sum())
            if name in self.drift:
                d = self.drift[name][self.batch[name]].to(x.device).reshape(x.shape[0], -1).float()
                term = (d * wt[:, None]).T @ x
                self.drift_cross[name] += term.double() if self.exact else term
                self.drift_w[name] += float(wt.sum())
            self.batch[name] += 1
            self._done(name)

        return hook

    def _experts_hook(self, _module, args, kwargs):
        x, idx, w = routing_args(args, kwargs)
        x = x.reshape(-1, x.shape[-1]).float()
        self.all_tokens.add(x)
        self.routed.append((x, idx, w))
        self._done("experts")

    def drift_matrix(self, name: str) -> torch.Tensor:
        return (self.drift_cross[name] / max(float(self.drift_w[name]), 1e-12)).float()[None]

    def cross_matrix(self, name: str) -> torch.Tensor:
        return (self.cross[name] / max(float(self.cross_w[name]), 1e-12)).float()[None]

    def reduce(self, dist) -> None:
        """Sum every statistic of this stage over the ranks of a distributed run (exact mode)."""
        if dist is None or not dist.active:
            return
        for acc in self.acc.values():
            acc.reduce(dist)
        if self.experts is not None:
            self.all_tokens.reduce(dist)
        for n in self.cross:
            dist.all_reduce_sum_(self.cross[n])
            dist.all_reduce_sum_(self.cross_w[n])
        for n in self.drift_cross:
            dist.all_reduce_sum_(self.drift_cross[n])
            dist.all_reduce_sum_(self.drift_w[n])

    @property
    def active(self) -> bool:
        return bool(self.pending)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def routing_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden_states, top_k_index, top_k_weights)`` of a call to a transformers-5 experts module."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args) + [kwargs[n] for n in names[len(args) :]]
    return vals[0].detach(), vals[1].detach(), vals[2].detach().float()


def expert_pairs(x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, slot) pairs of a routing decision as token indices and expert ids, flattened."""
    T, k = idx.shape
    return torch.arange(T, device=x.device).repeat_interleave(k), idx.reshape(-1).long()


def expert_gate(experts: nn.Module, gate_up: torch.Tensor, e: int, xs: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s down-projection input ``gate(xs W_gu[e]^T)`` for its tokens ``xs``, with the family's own
    ``_apply_gate`` (default: ``act(gate) * up``)."""
    out = torch.mm(xs, gate_up[e].T.to(xs.dtype))
    gate_fn = getattr(experts, "_apply_gate", None)
    return gate_fn(out) if gate_fn is not None else (lambda g, u: experts.act_fn(g) * u)(*out.chunk(2, dim=-1))


def expert_groups(eids: torch.Tensor, num_experts: int):
    """``(e, sel)`` for every expert ``e`` with samples: ``sel`` the indices of its samples in ``eids``, in their
    original order (one sort for all experts, no per-expert mask over the samples)."""
    order = torch.argsort(eids, stable=True)
    start = 0
    for e, c in enumerate(torch.bincount(eids, minlength=num_experts).tolist()):
        if c:
            yield e, order[start : start + c]
            start += c


def in_chunk(
    tokens: torch.Tensor, eids: torch.Tensor, w: torch.Tensor | None, chunk: slice | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The (token, expert, weight) samples of the experts in ``chunk`` (all of them for None), expert ids made
    local to the chunk; the samples keep their order, so every expert's sums are the same as unchunked."""
    if chunk is None:
        return tokens, eids, w
    keep = (eids >= chunk.start) & (eids < chunk.stop)
    return tokens[keep], eids[keep] - chunk.start, None if w is None else w[keep]


def expert_hessians(
    routed: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]],
    chunk: slice,
    weighted: bool = False,
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    exact: bool = False,
) -> HessianAccumulator:
    """Per-expert Hessians of the gate/up inputs of the experts in ``chunk``, from the inputs the gate/up stage
    recorded, one term per calibration batch: the (token, expert) pairs of the batch's routing (gate-weighted
    with ``weighted``) or, with ``pairs``, explicit (token, expert, weight) triples per batch (VSRAQ's FP
    decisions). Only the chunk's Hessians are ever held (all of DeepSeek-V3's: 256 x 7168^2 float64, 105 GB)."""
    x0 = routed[0][0]
    acc = HessianAccumulator(x0.shape[-1], chunk.stop - chunk.start, device=x0.device, exact=exact)
    for b, (x, idx, w) in enumerate(routed):
        if pairs is not None:
            tokens, eids, pw = pairs[b]
        else:
            tokens, eids = expert_pairs(x, idx)
            pw = w.reshape(-1) if weighted else None
        tokens, eids, pw = in_chunk(tokens, eids, pw, chunk)
        acc.add(x, pw, index=eids, rows=tokens)
    return acc


def down_hessians(
    experts: nn.Module,
    routed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    weighted: bool,
    coverage: list[int],
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    exact: bool = False,
    cross: ExpertCross | None = None,
    chunk: slice | None = None,
) -> tuple[HessianAccumulator, HessianAccumulator | None]:
    """Per-expert Hessians of the down projections' inputs, computed with the current (quantized) gate/up
    weights from the routed inputs recorded in the gate/up stage (the router's input does not change when
    gate/up do, so no re-run is needed). ``coverage`` experts also get all-token Hessians. Each expert's
    inputs are computed and folded into its Hessian in turn (never all (token, expert) pairs at once). With
    ``cross`` (FP targets), the same inputs also go into the cross-Gram against the FP stream's (DESIGN 3.5c).
    ``chunk``: only those experts (``coverage`` and ``cross`` then local to the chunk)."""
    E, two_i, _ = experts.gate_up_proj.shape
    lo, hi = (0, E) if chunk is None else (chunk.start, chunk.stop)
    device = experts.gate_up_proj.device
    acc = HessianAccumulator(two_i // 2, hi - lo, device=device, exact=exact)
    cov = HessianAccumulator(two_i // 2, len(coverage), device=device, exact=exact) if coverage else None
    gate_up = experts.gate_up_proj.detach()[lo:hi].float()
    chunks = pairs if isinstance(pairs, list) else [pairs] * len(routed)  # one triple per routed batch, or shared
    for b, ((x, idx, w), pair) in enumerate(zip(routed, chunks, strict=True)):
        if pair is not None:  # explicit (token, expert, weight) triples (VSRAQ's FP decisions)
            tokens, eids, pw = pair
        else:
            tokens, eids = expert_pairs(x, idx)
            pw = w.reshape(-1) if weighted else None
        tokens, eids, pw = in_chunk(tokens, eids, pw, chunk)
        if cross is not None and pair is not None:  # the quantized inputs once, for the Hessians and the cross-Gram
            cross.add(experts, gate_up, x, b, tokens, eids, pw, acc)
        else:
            acc.add(x, pw, index=eids, rows=tokens, transform=lambda e, xs: expert_gate(experts, gate_up, e, xs))
        if cov is not None:
            T = x.shape[0]
            slot = torch.arange(len(coverage), device=x.device).repeat_interleave(T)
            rows = torch.arange(T, device=x.device).repeat(len(coverage))
            cov.add(x, index=slot, rows=rows, transform=lambda j, xs: expert_gate(experts, gate_up, coverage[j], xs))
    return acc, cov


# Bytes of FP expert hidden states an ``ExpertStash`` keeps per layer (float32 ``(T, k, I)``): 32768 calibration tokens
# of Qwen3-30B-A3B (top-8, I = 768) take 0.8 GB, of DeepSeek-V3 2.1 GB, of Mixtral-8x7B 1.9 GB. Batches past it are
# not kept: their FP products are computed again in the cross-Gram, as without a stash.
STASH_BYTES = 4 << 30


@contextlib.contextmanager
def forward_replaced(module: nn.Module, forward):
    """``module.forward`` is ``forward`` inside the context (hooks still run around it); whatever it was before
    (the class's, or an instance attribute another library set) comes back after."""
    before = vars(module).get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if before is None:
            del module.forward
        else:
            module.forward = before


def stashable(experts: nn.Module) -> bool:
    """Whether ``ExpertStash`` can stand in for this experts module's forward: the transformers-5 fused layout
    (``gate_up_proj`` ``(E, 2I, d)``, ``down_proj`` ``(E, d, I)``) without biases, outputs combined by the gate
    weights after ``down_proj`` (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3)."""
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(down, torch.Tensor) or gu.dim() != 3 or down.dim() != 3:
        return False
    if any(getattr(experts, n, None) is not None for n in ("gate_up_proj_bias", "down_proj_bias")):
        return False
    return down.shape[0] == gu.shape[0] and down.shape[2] * 2 == gu.shape[1] and down.shape[1] == gu.shape[2]


class ExpertStash:
    """The FP stream's expert hidden states ``h = gate(x W_gu[e]^T)`` (the down projections' FP inputs), kept while
    the FP forward computes them: the experts module's forward is this loop for the duration of ``attach``, so the
    FP cross-Gram (DESIGN 3.5c) looks them up instead of computing every FP product a second time; ``complete``
    adds the pairs the FP forward did not run (VSRAQ's near misses) while the weights are still FP, after which
    the cross-Gram needs no copy of the FP gate/up. Per batch: the routing ``(T, k)`` and the rows ``(T k + m, I)``
    in float32 (the FP choices token-major, then the ``m`` added pairs), or None past ``limit`` bytes."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit, self.bytes, self.num_experts = STASH_BYTES if limit is None else limit, 0, 0
        self.batches: list[_Kept | None] = []
        self.whole = False  # every pair of the layer's expert problem is in the stash (``complete``)
        self._map: tuple[int, torch.Tensor] | None = None

    def attach(self, experts: nn.Module):
        """A context in which ``experts``' forward is this stash's loop."""
        return forward_replaced(experts, lambda *args, **kwargs: self._forward(experts, args, kwargs))

    def _forward(self, experts: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """``sum_j w_j down_e(h)`` per token, in float32 (the cross-Gram's precision), cast back to the input's
        dtype: the family's own forward up to summation order."""
        hidden = args[0] if args else kwargs["hidden_states"]
        x, idx, w = routing_args(args, kwargs)
        x = x.reshape(-1, x.shape[-1])
        (T, k), (E, two_i, _) = idx.shape, experts.gate_up_proj.shape
        self.num_experts = E
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        nbytes = T * k * (two_i // 2) * 4
        keep = self.bytes + nbytes <= self.limit
        h_all = torch.empty(T * k, two_i // 2, device=x.device) if keep else None
        out = torch.zeros(T, x.shape[-1], device=x.device)
        tokens, eids = expert_pairs(x, idx)  # pair p = t k + j: row p of h_all is (token t, slot j)
        wf = w.reshape(-1)
        for e, sel in expert_groups(eids, E):
            toks = tokens[sel]
            h = expert_gate(experts, gate_up, e, x[toks].float())
            if keep:
                h_all[sel] = h
            out.index_add_(0, toks, (h @ down[e].T.float()).mul_(wf[sel, None]))
        self.bytes += nbytes if keep else 0
        self.batches.append(_Kept(idx.long(), h_all) if keep else None)
        return out.to(hidden.dtype).view(hidden.shape)

    def complete(self, experts: nn.Module, x_fp: list[torch.Tensor], pairs: list) -> bool:
        """Add the (token, expert) pairs that the FP forward did not run, from the experts' weights as they are now
        (call it before they are quantized). ``pairs``: per batch ``(tokens, experts)``, tokens local to the batch.
        True, and ``whole`` set, when every batch was kept (else nothing is added: the caller keeps an FP copy)."""
        if not self.batches or any(kept is None for kept in self.batches) or len(self.batches) != len(pairs):
            return False
        gate_up = experts.gate_up_proj.detach()
        for b, (t, e) in enumerate(pairs):
            miss = self._rows(b)[t, e] < 0
            t, e = t[miss], e[miss]
            if not t.numel():
                continue
            kept = self.batches[b]
            extra = torch.empty(t.numel(), kept.h.shape[-1], device=kept.h.device)
            for ex, part in expert_groups(e, self.num_experts):
                extra[part] = expert_gate(experts, gate_up, ex, x_fp[b][t[part]].float())
            kept.h = torch.cat([kept.h, extra])
            kept.extra = (t, e)
            self.bytes += extra.numel() * 4
            self._map = None
        self.whole = True
        return True

    def _rows(self, batch: int) -> torch.Tensor:
        """The batch's (token, expert) -> row map ``(T, E)`` int32 (-1: not stashed), built once per batch (only the
        last one is held)."""
        if self._map is None or self._map[0] != batch:
            kept = self.batches[batch]
            T, k = kept.idx.shape
            rows = torch.full((T, self.num_experts), -1, dtype=torch.int32, device=kept.idx.device)
            rows.scatter_(1, kept.idx, torch.arange(T * k, dtype=torch.int32, device=rows.device).view(T, k))
            if kept.extra is not None:
                t, e = kept.extra
                rows[t, e] = torch.arange(T * k, T * k + t.numel(), dtype=torch.int32, device=rows.device)
            self._map = (batch, rows)
        return self._map[1]

    def lookup(self, batch: int, e: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Expert ``e``'s stashed FP hidden states for ``tokens`` of ``batch``: ``(h, found)``, ``h`` ``(n, I)``
        with the rows where ``found`` is False left to the caller; None when the batch was not kept."""
        kept = self.batches[batch] if batch < len(self.batches) else None
        if kept is None:
            return None
        r = self._rows(batch)[tokens, e]
        return kept.h[r.clamp(min=0).long()], r >= 0


@dataclass
class _Kept:
    idx: torch.Tensor  # (T, k) the FP forward's routing
    h: torch.Tensor  # (T k + m, I) its hidden states, then the m pairs ``complete`` added
    extra: tuple[torch.Tensor, torch.Tensor] | None = None  # those m pairs' (tokens, experts)


class ExpertCross:
    """Per expert, ``sum w h~ h^T`` of the down projections' inputs, quantized stream (current gate/up) against FP
    stream (the original gate/up ``fp_gate_up`` on ``x_fp``, the FP hidden states of every routed batch), built in
    ``down_hessians``' pass: each quantized input is computed once for the Hessian and the cross-Gram (DESIGN
    3.5c). Exact mode: float64 sums of per-batch float32 terms (``reduce`` over the ranks). ``stash``: the FP
    hidden states the FP forward kept (looked up, computed only where missing); ``offset``: the global id of
    ``fp_gate_up``'s first expert (an expert chunk)."""

    def __init__(
        self,
        fp_gate_up: torch.Tensor | None,
        x_fp: list[torch.Tensor],
        exact: bool,
        stash: ExpertStash | None = None,
        offset: int = 0,
        shape: tuple[int, int] | None = None,
    ) -> None:
        if fp_gate_up is None and (stash is None or not stash.whole or shape is None):
            raise ValueError("ExpertCross needs the FP gate/up, or a whole stash and the (experts, I) shape.")
        E, inter = shape if fp_gate_up is None else (fp_gate_up.shape[0], fp_gate_up.shape[1] // 2)
        device = x_fp[0].device if fp_gate_up is None else fp_gate_up.device
        self.fp_gate_up = None if fp_gate_up is None else fp_gate_up.detach().float()
        self.x_fp, self.stash, self.offset = x_fp, stash, offset
        dt = torch.float64 if exact else torch.float32
        self.S = torch.zeros(E, inter, inter, dtype=dt, device=device)
        self.wsum = torch.zeros(E, dtype=torch.float64, device=device)

    def fp_hidden(self, experts, batch: int, e: int, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Expert ``e``'s (local id) FP hidden states for ``tokens`` of ``batch``: from the stash where it has them."""
        xfp = self.x_fp[batch]
        got = None if self.stash is None else self.stash.lookup(batch, e + self.offset, tokens)
        if got is None:
            return expert_gate(experts, self.fp_gate_up, e, xfp[tokens].to(dtype))
        h, found = got
        if not bool(found.all()):
            if self.fp_gate_up is None:  # never: ``complete`` stashed every pair of the problem
                raise RuntimeError(f"expert {e + self.offset}: a pair missing from a whole stash.")
            miss = (~found).nonzero().flatten()
            h[miss] = expert_gate(experts, self.fp_gate_up, e, xfp[tokens[miss]].to(dtype))
        return h.to(dtype)

    def add(self, experts, gate_up, x, batch: int, tokens, eids, w, acc: HessianAccumulator | None = None) -> None:
        """One routed batch: per expert, its tokens' quantized inputs into ``acc`` (when given) and, with the FP
        inputs, into S. With ``acc``, one ``acc.add`` for the batch whose per-expert transform also folds the
        cross term: the accumulator visits the experts in the order of ``expert_groups`` (the same stable sort),
        so both see the same samples, and each Hessian gets the same sums as from one call per expert."""

        def fold(e: int, sel: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
            h_q = expert_gate(experts, gate_up, e, xs)
            we = w[sel].float()
            h_fp = self.fp_hidden(experts, batch, e, tokens[sel], h_q.dtype)
            self.S[e] += ((h_q * we[:, None]).T @ h_fp).to(self.S.dtype)
            self.wsum[e] += float(we.sum())
            return h_q

        if acc is None:
            for e, sel in expert_groups(eids, self.S.shape[0]):
                fold(e, sel, x[tokens[sel]])
            return
        groups = expert_groups(eids, self.S.shape[0])

        def transform(e: int, xs: torch.Tensor) -> torch.Tensor:
            e_group, sel = next(groups)
            if e_group != e:  # never: both orders come from the same stable sort of eids
                raise RuntimeError(f"expert {e} visited where expert {e_group} was expected.")
            return fold(e, sel, xs)

        acc.add(x, w, index=eids, rows=tokens, transform=transform)

    def matrix(self, dist=None) -> torch.Tensor:
        if dist is not None:
            dist.all_reduce_sum_(self.S)
            dist.all_reduce_sum_(self.wsum)
        return (self.S / self.wsum.clamp(min=1e-12)[:, None, None]).float()


def expert_cross(
    experts: nn.Module, fp_gate_up: torch.Tensor, pairs, x_fp: torch.Tensor, chunk: slice | None = None
) -> torch.Tensor:
    """Per expert, ``C = sum w h~ h^T / sum w`` of the down projections' inputs (DESIGN 3.5c) over all the pairs at
    once, in float32 (the float32-sums mode; exact sums build it batch by batch in ``down_hessians``' pass).
    ``chunk``: only those experts (``fp_gate_up`` then holds only theirs)."""
    X, tokens, eids, w = pairs
    chunk = slice(0, fp_gate_up.shape[0]) if chunk is None else chunk
    tokens, eids, w = in_chunk(tokens, eids, w, chunk)
    cross = ExpertCross(fp_gate_up, [x_fp], exact=False)
    cross.add(experts, experts.gate_up_proj.detach()[chunk].float(), X, 0, tokens, eids, w)
    return cross.matrix()
