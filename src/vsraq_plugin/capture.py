"""Running a decoder layer on stored hidden states and recording what its linears see (forward hooks, early stop).

The calibration streams are lists of per-batch hidden states ``(batch, seq, d)``. They live on the *store*
device (the solve device, or host memory when offloaded, ``QuantConfig.offload``); each batch is moved to the
*compute* device only while a layer runs on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

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


class ExpertCross:
    """Per expert, ``sum w h~ h^T`` of the down projections' inputs, quantized stream (current gate/up) against FP
    stream (the original gate/up ``fp_gate_up`` on ``x_fp``, the FP hidden states of every routed batch), built in
    ``down_hessians``' pass: each quantized input is computed once for the Hessian and the cross-Gram (DESIGN
    3.5c). Exact mode: float64 sums of per-batch float32 terms (``reduce`` over the ranks)."""

    def __init__(self, fp_gate_up: torch.Tensor, x_fp: list[torch.Tensor], exact: bool) -> None:
        E, two_i, _ = fp_gate_up.shape
        self.fp_gate_up, self.x_fp = fp_gate_up.detach().float(), x_fp
        dt = torch.float64 if exact else torch.float32
        self.S = torch.zeros(E, two_i // 2, two_i // 2, dtype=dt, device=fp_gate_up.device)
        self.wsum = torch.zeros(E, dtype=torch.float64, device=fp_gate_up.device)

    def add(self, experts, gate_up, x, batch: int, tokens, eids, w, acc: HessianAccumulator | None = None) -> None:
        """One routed batch: per expert, its tokens' quantized inputs into ``acc`` (when given) and, with the FP
        inputs, into S. With ``acc``, one ``acc.add`` for the batch whose per-expert transform also folds the
        cross term: the accumulator visits the experts in the order of ``expert_groups`` (the same stable sort),
        so both see the same samples, and each Hessian gets the same sums as from one call per expert."""
        xfp = self.x_fp[batch]

        def fold(e: int, sel: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
            h_q = expert_gate(experts, gate_up, e, xs)
            we = w[sel].float()
            h_fp = expert_gate(experts, self.fp_gate_up, e, xfp[tokens[sel]].to(h_q.dtype))
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
