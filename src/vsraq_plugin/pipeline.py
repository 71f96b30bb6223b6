"""The layer loop (DESIGN 3.2, 7): onload -> stages -> solve -> write -> offload, for every method.

For each decoder layer, in true-sequential order: attention's first linears (q/k/v), then o_proj, then the
experts' gate/up together with the shared experts' gate/up, then every down projection. Each stage re-runs the
layer over the calibration batches with the stages before it already quantized, so every linear sees the
inputs the quantized model really gives it. The experts' Hessians are scattered into one ``(E, d, d)`` batch
and solved together. What differs between methods (token weights, output metrics, FP targets, the router)
comes from the method's ``LayerPlan`` (``methods.py``).

Two streams: the quantized stream (inputs produced by the layers already quantized) feeds the solves; the
full-precision stream is carried beside it when the method needs FP targets, and an FP pre-pass records the
FP router logits of every MoE layer when the method needs routing targets.

Two layer stores (``streaming.py``): an in-memory model (``quantize_model``: quantized in place, layers moved
to the solve device one at a time) or a model folder (``quantize_folder``: streamed layer by layer from its
safetensors shards, each finished layer written to the checkpoint and freed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import CalibrationError, calibration_windows
from .capture import (
    ExpertCross,
    ExpertStash,
    LayerRunner,
    StageCapture,
    StopForward,
    down_hessians,
    expert_cross,
    expert_hessians,
    expert_pairs,
    forward_replaced,
    stashable,
    to_store,
)
from .config import QuantConfig, dynamic_override
from .distributed import SINGLE, Dist
from .gptq import HessianAccumulator
from .methods import RESIDUAL_WRITERS, LayerContext, LayerPlan, method_for, router_name, stream_readers
from .mixed_precision import expert_damage, gate_up_output_loss, read_metric, stream_sq_norms
from .models import EXPERT_PROJECTIONS, MoEAdapter, MoELayer, record_router_logits, sequential_stages
from .quantizer import QuantizedWeight, rtn
from .resume import ResumeState, apply_layer, fingerprint
from .solve import (
    QuantizationResult,
    dequantize_grid,
    rows_of,
    solve_batch,
    solve_shared,
    split_rows,
    take,
    weight_to,
    with_coverage,
)
from .streaming import (
    InMemoryLayers,
    ModelSource,
    StreamedLayers,
    frozen_imports,
    release_host_memory,
    resolve_device,
    resolve_store,
)
from .validation import check_quantize_folder, check_quantize_model
from .vsraq import writer_target

__all__ = [
    "CalibrationError",
    "QuantizationResult",
    "calibration_windows",
    "quantize_folder",
    "quantize_model",
    "router_name",
    "solve_batch",
]

LayerSink = Callable[[MoELayer, dict[str, QuantizedWeight]], None]


# ---------------------------------------------------------------------------------------------- targets
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


def module_config(adapter: MoEAdapter, cfg: QuantConfig, name: str) -> QuantConfig | None:
    """The settings of one attention, dense-MLP or shared-expert linear (``name``: its module name in the model)
    under ``cfg.dynamic``; None for a module a ``-:`` pattern leaves unquantized."""
    return cfg.for_module(*adapter.module_names(name)) if cfg.dynamic else cfg


def _note_overrides(result: QuantizationResult, cfg: QuantConfig, settings: dict[str, QuantConfig | None]) -> None:
    """Record, in the summary, each linear whose settings ``dynamic`` changed: its ``bits`` and ``group_size``, or
    None where it stays unquantized. The checkpoint's ``dynamic`` block names these modules one by one (see
    ``checkpoint.quantization_config``)."""
    for name, s in settings.items():
        if s is not cfg:
            entry = None if s is None else {"bits": s.bits, "group_size": s.group_size}
            result.summary.setdefault("module_overrides", {})[name] = entry


def _check_dynamic(adapter: MoEAdapter, layers: list[MoELayer], cfg: QuantConfig) -> None:
    """What ``dynamic`` can do, checked before any long work: any setting of the attention, dense-MLP and
    shared-expert linears, and whole routed experts' widths (``_dynamic_expert_bits``, derived again when the run
    starts: 0.2 s at DeepSeek-V3's 58 x 256 experts); not a router that ``router_mode="quantize"`` quantizes."""
    _dynamic_expert_bits(adapter, layers, cfg)
    if cfg.router_mode == "quantize":
        for layer in layers:
            if layer.is_moe and dynamic_override(cfg.dynamic, *adapter.module_names(router_name(layer))) is not None:
                raise NotImplementedError(
                    f"dynamic: a pattern matches the quantized router {router_name(layer)!r}; it takes `bits`. "
                    r"Narrow the pattern (e.g. end it with '\.(q|k|v|o)_proj$')."
                )


def _dynamic_expert_bits(adapter: MoEAdapter, layers: list[MoELayer], cfg: QuantConfig) -> dict[int, torch.Tensor]:
    """The routed experts' widths that ``dynamic`` sets, by MoE layer (only layers it changes): an override of a
    routed expert must set ``bits`` alone, the same for its gate, up and down (a layer's experts are solved as one
    batched weight per projection, at one group size; widths per projection come from the measured allocation),
    and cannot leave it unquantized; nor can it be combined with ``bits_budget`` (the allocation sets the widths)."""
    out = {}
    for layer in layers:
        if not layer.is_moe or not cfg.dynamic:
            continue
        i, widths = layer.index, []
        for e in range(adapter.num_experts()):
            per_projection = []
            for p in EXPERT_PROJECTIONS:
                names = (f"model.layers.{i}.mlp.experts.{e}.{p}", adapter.expert_key(i, e, p))
                o = dynamic_override(cfg.dynamic, *names)
                what = None
                if o is False:
                    what = "leaves it unquantized"
                elif o and o.get("group_size", cfg.group_size) != cfg.group_size:
                    what = "sets its group_size"
                elif o and cfg.bits_budget is not None and o.get("bits", cfg.bits) != cfg.bits:
                    what = "sets its width while bits_budget allocates the experts' widths"
                if what:
                    raise NotImplementedError(
                        f"dynamic: a pattern matching the routed expert {names[-1]!r} {what}; a routed expert can "
                        r"take another `bits` only (the same for its gate, up and down). Narrow the pattern (e.g. "
                        r"end it with '\.(q|k|v|o)_proj$')."
                    )
                per_projection.append(int(o.get("bits", cfg.bits)) if o else cfg.bits)
            if len(set(per_projection)) > 1:
                got = dict(zip(EXPERT_PROJECTIONS, per_projection, strict=True))
                raise NotImplementedError(
                    f"dynamic: layer {i} expert {e} would get {got} bits; "
                    "a routed expert takes one width for gate, up and down by `dynamic` (widths per projection come "
                    "from bits_budget with width_per_projection)."
                )
            widths.append(per_projection[0])
        if any(w != cfg.bits for w in widths):
            out[i] = torch.tensor(widths)
    if out and cfg.method == "rtn":
        raise NotImplementedError("dynamic widths of routed experts are applied by gptq, agq and vsraq, not rtn.")
    return out


def _check_settings(adapter: MoEAdapter, layers: list[MoELayer], cfg: QuantConfig, windows) -> None:
    """Refuse what the loop does not apply, before any long work (shapes are read from a meta model too)."""
    if cfg.router_mode == "quantize" and cfg.method != "vsraq":
        raise NotImplementedError("router_mode='quantize' is part of method='vsraq'; use it with that method.")
    if cfg.dynamic:
        _check_dynamic(adapter, layers, cfg)
    if not cfg.true_sequential:
        raise NotImplementedError("only true_sequential=True is implemented (each stage sees the ones before it).")
    if cfg.method == "rtn" and cfg.refine_steps > 0:
        raise NotImplementedError("refinement starts from a GPTQ solve: use method gptq, agq or vsraq with it.")
    if cfg.method == "rtn" and cfg.bits_budget is not None:
        raise NotImplementedError("expert-wise mixed precision is implemented for gptq, agq and vsraq, not rtn.")
    for layer in layers:
        for t in layer_targets(adapter, layer):
            mcfg = cfg if t.kind == "expert" else module_config(adapter, cfg, t.name)
            if mcfg is not None:
                mcfg.check_in_features(t.weight.shape[-1], t.name)
    if cfg.method != "rtn" and (windows is None or windows.dim() != 2 or windows.numel() == 0):
        raise CalibrationError(
            f"method={cfg.method!r} needs calibration windows: a non-empty (n, seq_len) "
            "token tensor (see calibration_windows)."
        )


# ---------------------------------------------------------------------------------------------- entry points
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
    dist: Dist | None = None,
    dist_timeout: float = 600.0,
) -> QuantizationResult:
    """Quantize an in-memory ``model`` in place with ``config.method`` on calibration ``windows`` ``(n, seq_len)``.

    The model keeps its dtype and ends up computing with the dequantized weights in it (each layer is solved,
    and its outputs streamed to the next, in float32 on ``config.device``, one layer at a time: a bf16 model
    never holds more than one float32 layer beside itself); the returned result holds the integer codes and
    grids for the checkpoint (``checkpoint.save_checkpoint``), the same bytes as ``quantize_folder`` writes, and
    each dequantized float32 weight only where it is the model's own tensor (a float32 model solved on its own
    device; else ``weight`` is None and ``solve.dequantize_grid`` rebuilds it). With ``work_dir``, every finished
    layer is saved there and a re-run with the same model, data and config resumes after the last finished layer,
    bit for bit.
    With ``config.bits_budget``, each MoE layer's experts get widths by ``config.allocation`` (``mixed_precision``):
    ``measured`` solves the layer's experts once per candidate width and keeps, per expert, the width of the exact
    least-damage allocation under the budget (``width_per_projection``: per expert and projection, gate/up and down;
    a down whose width differs from its gate/up's is solved once more on the chosen gate/up); ``router-norm`` scores
    with ``router_init`` (every router's weight at initialisation by layer index, when given); ``expert_bits``
    imposes an allocation instead. Inside a process group
    (``torchrun``; or ``dist``) the work is shared by the ranks (``distributed.py``), every rank ends with the
    same quantized model.
    """
    check_quantize_model(model, windows, config, batch_size)
    source_dtype = next(model.parameters()).dtype
    device = _rank_device(config.device)
    dist = dist or Dist.from_env(device, dist_timeout)
    store = InMemoryLayers(model, device)
    _check_settings(store.adapter, store.layers, config, windows)
    model.eval()
    result = _run(store, windows, config, batch_size, work_dir, progress, on_layer_done, router_init, expert_bits,
                  dist=dist)  # fmt: skip
    result.source_dtype = source_dtype
    return result


@torch.no_grad()
def quantize_folder(
    path: str | Path,
    windows: torch.Tensor | None,
    config: QuantConfig,
    out: str | Path,
    *,
    tokenizer=None,
    batch_size: int = 8,
    work_dir: str | Path | None = None,
    progress: bool = True,
    on_layer_done: Callable[[int], None] | None = None,
    router_init: dict[int, torch.Tensor] | None = None,
    expert_bits: dict[int, torch.Tensor] | None = None,
    key_layout: str = "original",
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    dist: Dist | None = None,
    dist_timeout: float = 600.0,
) -> QuantizationResult:
    """Quantize the model in folder ``path`` layer by layer and write its GPTQ v1 checkpoint to ``out``.

    The model is never materialised whole: each decoder layer is read from the safetensors shards, quantized on
    ``config.device`` in float32, written (packed tensors appended to size-capped shards, unquantized tensors in
    the source dtype) and freed. The folder is built under a temporary name beside ``out`` and renamed when
    complete. Resume (``work_dir``) works as with ``quantize_model``, bit for bit. Inside a process group
    (``torchrun``) the ranks share the work (``distributed.py``) and rank 0 writes.
    """
    from .checkpoint import StreamingCheckpoint

    check_quantize_folder(path, windows, config, out, batch_size, work_dir)
    source = ModelSource(path)
    device = _rank_device(config.device)
    dist = dist or Dist.from_env(device, dist_timeout)
    store = StreamedLayers(source, device)
    _check_settings(store.adapter, store.layers, config, windows)
    writer = StreamingCheckpoint(out, store, config, key_layout, overwrite, max_shard_size) if dist.writer else None
    try:
        sink = writer.write_layer if writer is not None else _discard
        result = _run(store, windows, config, batch_size, work_dir, progress, on_layer_done, router_init,
                      expert_bits, sink=sink, dist=dist)  # fmt: skip
        result.source_dtype = source.dtype
        if writer is not None:
            writer.finish(result, tokenizer)
        dist.barrier()  # no rank reports success before the checkpoint is in place
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return result


def _discard(layer: MoELayer, weights: dict[str, QuantizedWeight]) -> None:
    """The sink of the ranks that do not write (rank 0 writes the checkpoint)."""


def _rank_device(device: str) -> torch.device:
    """The solve device; under torchrun with CUDA, the GPU of this rank's LOCAL_RANK."""
    import os

    if Dist.launched() and device in ("auto", "cuda") and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return resolve_device(device)


# ---------------------------------------------------------------------------------------------- the loop
@frozen_imports()  # the imported libraries' objects out of the per-layer collections' way
def _run(
    store: InMemoryLayers | StreamedLayers,
    windows: torch.Tensor | None,
    cfg: QuantConfig,
    batch_size: int,
    work_dir,
    progress: bool,
    on_layer_done,
    router_init,
    expert_bits,
    sink: LayerSink | None = None,
    dist: Dist | None = None,
) -> QuantizationResult:
    t_start = time.perf_counter()
    dist = dist or SINGLE
    adapter, layers = store.adapter, store.layers
    method = method_for(cfg)
    result = QuantizationResult(
        weights={}, config=cfg, summary={"method": cfg.method, "fallbacks": [], "layer_seconds": []}
    )
    host = torch.device("cpu")
    keep = sink is None  # in memory: results stay in ``result``; streamed: the sink writes them
    derived = _dynamic_expert_bits(adapter, layers, cfg)  # routed experts' widths set by `dynamic`
    if derived and expert_bits is not None:
        raise NotImplementedError("expert_bits and `dynamic` overrides of routed experts: give the widths one way.")
    widths = _ExpertWidths(adapter, cfg, router_init, expert_bits if expert_bits is not None else derived or None,
                           result)  # fmt: skip

    def finish_layer(layer: MoELayer, weights: dict[str, QuantizedWeight]) -> None:
        if keep:
            result.weights.update(weights)
        else:
            sink(layer, weights)

    if cfg.method == "rtn":
        for layer in tqdm(layers, desc=f"rtn W{cfg.bits}", unit="layer", disable=not progress):
            t0 = time.perf_counter()
            layer = store.onload(layer.index)
            done = {}
            for t in layer_targets(adapter, layer):
                mcfg = cfg if t.kind == "expert" else module_config(adapter, cfg, t.name)
                _note_overrides(result, cfg, {t.name: mcfg})
                if mcfg is None:  # left unquantized (a "-:" dynamic pattern)
                    continue
                qw = rtn(t.weight.float(), mcfg.bits, mcfg.group_size, mcfg.sym, mcfg.mse_norm)
                t.weight.copy_(qw.weight)
                qw.weight = t.weight.detach()  # the model now holds these values: no second copy (as in the solves)
                # (the codes to the host at once, streamed too: later targets' round-to-nearest copies need the room)
                done[t.name] = _layer_result(qw, keep, host, codes_to_host=True, own=not store.lifted(layer.index))
            finish_layer(layer, done)
            store.offload(layer.index)
            result.summary["layer_seconds"].append(time.perf_counter() - t0)
        result.summary["seconds"] = time.perf_counter() - t_start
        return result

    device = store.device
    # The FP stream, carried layer by layer, also gives the FP router logits (layer l's from its own FP forward,
    # the next MoE layer's by a look-ahead up to its router): no separate full-precision pre-pass.
    fp_stream = method.fp_stream or method.needs_fp_logits
    hidden = int(adapter.config.hidden_size)
    streams = 2 if fp_stream else 1
    stream_bytes = windows.numel() * hidden * 4 * streams * 2
    store_dev = resolve_store(
        cfg.offload, device, stream_bytes, _working_bytes(layers, cfg, cfg.exact_sums or dist.active)
    )
    result.summary["device"], result.summary["stream_store"] = str(device), str(store_dev)
    all_windows = windows
    n_batches = -(-windows.shape[0] // batch_size)
    all_batch_tokens = [min(batch_size, windows.shape[0] - b * batch_size) * windows.shape[1] for b in range(n_batches)]
    mine = range(n_batches)
    if dist.active:  # this rank's contiguous block of calibration batches (distributed.py)
        mine = dist.batch_range(n_batches)
        if not len(mine):
            raise CalibrationError(
                f"{dist.world} ranks but only {n_batches} calibration batches of {batch_size} windows: every rank "
                "needs one. Use fewer ranks, more --n-samples or a smaller --batch-size."
            )
        windows = windows[mine.start * batch_size : mine.stop * batch_size]
        result.summary["world_size"] = dist.world
    store.prepare_inputs()
    runner = LayerRunner(store.model, adapter, windows, batch_size, device, store_dev)
    store.finish_inputs()
    x_q = runner.inputs

    state = None
    first = 0
    if work_dir is not None:
        parts = (
            [*store.fingerprint_parts(), f"world={dist.world}".encode()] if dist.active else store.fingerprint_parts()
        )
        state = ResumeState(work_dir, fingerprint(cfg, all_windows, parts), dist)
        first = state.completed()
    x_fp = list(x_q) if fp_stream else None
    restored = state.summary() if first else {}
    if widths.mode == "measured" and cfg.budget_scope == "model":  # every layer's share first (the cheap pre-pass)
        if "expert_layer_budget_params" in restored:  # a resumed run keeps its shares: no second pre-pass
            widths.budgets = restored["expert_layer_budget_params"]
        else:
            widths.budgets, means = _model_budgets(store, runner, cfg, runner.inputs, dist)
            result.summary["expert_layer_budgets"] = means  # each MoE layer's mean width allowance
            result.summary["expert_layer_budget_params"] = widths.budgets  # the same in width x parameters
    if first:
        result.summary.update(restored)
        for i in range(first):  # the finished layers: into the model (in memory) or the checkpoint (streamed)
            weights, router = state.load_layer(i, cfg)
            layer = store.onload(i)
            widths.of(layer)
            apply_layer(adapter, layer, weights, router)
            finish_layer(layer, weights)
            store.offload(i)
        x_q, x_fp = state.load_streams(first, store_dev)

    bar = tqdm(total=len(layers), initial=first, desc=f"{cfg.method} W{cfg.bits}g{cfg.group_size}", unit="layer",
               disable=not progress)  # fmt: skip

    carried: dict[str, _Attention] = {}  # what a step leaves to the next: the next layer's FP attention

    def step(index: int, x_q: list[torch.Tensor], x_fp: list[torch.Tensor] | None):
        """onload -> stages -> solve -> write -> offload for one layer; its locals (the layer's results, the FP
        copy, the plan) are gone when it returns, so nothing of layer l is alive while layer l+1 runs."""
        t0, moved = time.perf_counter(), dist.bytes_moved
        layer = store.onload(index)
        bits = widths.of(layer)  # from the original weights
        # The FP stream past this layer, from its weights before they are quantized (the next layer's FP input and
        # the refinement's target), recording on the way this layer's FP router logits and the FP inputs of its
        # residual writers (FP targets, DESIGN 3.5c); then the next MoE layer's FP logits (its margins).
        x_fp_next, fp_inputs, fp_gate_up, stash = None, None, None, None
        if fp_stream:
            watch = _residual_writers(adapter, layer) if method.fp_targets else {}
            attention = carried.pop("attention", None)
            x_fp_next, fp_inputs, logits, stash = _fp_forward(runner, layer, x_fp, watch, attention)
            if method.needs_fp_logits:  # per-token FP quantities: every rank holds every token's (in order)
                if logits is not None:
                    result.fp_router_logits[index] = dist.all_gather_cat(logits)
                ahead, attention = _lookahead_logits(store, runner, index, x_fp_next, method.fp_targets)
                result.fp_router_logits.update({i: dist.all_gather_cat(z) for i, z in ahead.items()})
                if attention is not None:  # the next layer's attention on the FP stream: its FP forward replays it
                    carried["attention"] = attention
        exact = cfg.exact_sums or dist.active
        ctx = LayerContext(adapter, layer, all_batch_tokens, result.fp_router_logits, store.router, mine, exact,
                           dist.all_reduce_sum_, [i for i, lay in enumerate(store.layers) if lay.is_moe])  # fmt: skip
        plan = method.plan(ctx)
        # The FP experts' down inputs: stashed whole by the FP forward, or an FP copy of gate/up.
        if fp_stream and method.fp_targets and layer.is_moe and not _complete_stash(stash, layer, fp_inputs, plan, x_q,
                                                                                     exact):  # fmt: skip
            fp_gate_up = _host_copy(layer.experts.gate_up_proj.detach())
        drift = None
        if method.drift_targets and x_fp is not None:
            writers = [n for n in adapter.attention_linears(layer) if n.endswith("o_proj")]
            drift = {n: _Diff(x_fp, x_q, runner.device) for n in writers}
        quantize_layer(runner, adapter, layer, x_q, cfg, plan, result, bits, fp_inputs, fp_gate_up, dist, widths, drift,
                       stash)  # fmt: skip
        del fp_inputs, fp_gate_up, stash, ctx, plan
        if cfg.refine_steps > 0:
            _refine(store, runner, adapter, layer, x_q, x_fp_next, result, cfg, progress)
        x_q = runner.run(layer.layer, x_q)
        prefix = f"model.layers.{index}."
        own = not store.lifted(index)
        done = {n: _layer_result(qw, keep, host, own=own) for n, qw in result.weights.items() if n.startswith(prefix)}
        for n in done:
            del result.weights[n]
        router = layer.router.weight.detach().clone() if layer.is_moe else None
        result.summary["layer_seconds"].append(time.perf_counter() - t0)
        if dist.active:  # payload this rank sent or received in collectives for the layer (bench_distributed.py)
            result.summary.setdefault("layer_comm_bytes", []).append(dist.bytes_moved - moved)
        if state is not None:
            state.save_layer(index, done, router, result.summary, x_q, x_fp_next)
        finish_layer(layer, done)
        store.offload(index)
        return x_q, x_fp_next

    def step_and_release(index: int, x_q, x_fp):
        out = step(index, x_q, x_fp)
        release_host_memory()  # the layer's host memory back to the OS before the next one
        return out

    for index in range(first, len(layers)):
        x_q, x_fp = step_and_release(index, x_q, x_fp)
        bar.update(1)
        if on_layer_done is not None:
            on_layer_done(index)
    bar.close()
    result.summary["seconds"] = time.perf_counter() - t_start
    if device.type == "cuda":
        result.summary["peak_device_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def _model_budgets(store, runner: LayerRunner, cfg: QuantConfig, hidden: list[torch.Tensor], dist):
    """``budget_scope="model"``: each MoE layer's share of the model's budget (in width x parameters).

    Layer-by-layer quantization cannot see a later layer's measured damages before it commits an earlier one, so
    the shares come from a cheap pre-pass: the full-precision model run once over the calibration tokens, and for
    every expert and width the round-to-nearest damage ``sum_t g_t (||E_gu x_t||^2 + ||E_down h_t||^2)`` (gate
    weights ``g``, FP down inputs ``h``; with ``width_per_projection`` its two terms are two items, gate/up and down,
    as in the layer's own allocation, gate/up's measured in the residual stream, ``||W_down (h~_t - h_t)||^2``).
    The exact knapsack over all items of the model on these damages gives each layer its total; each layer then
    allocates exactly, on its measured damages, under its total. The totals sum to at most the model's budget, so
    the model's mean width (weighted by parameters) is within it. Deterministic: same data, same shares. Returns
    the totals and the same as mean widths, by layer index."""
    from .capture import expert_gate, routing_args
    from .mixed_precision import allocate_measured, budget_bit_params

    levels = sorted(cfg.bit_levels)
    damages, params, owners = [], [], []
    for layer in store.layers:
        layer = store.onload(layer.index)
        try:
            if not layer.is_moe:
                hidden = runner.run(layer.layer, hidden)
                continue
            seen: list = []
            handle = layer.experts.register_forward_pre_hook(
                lambda _m, a, k, seen=seen: seen.append(routing_args(a, k)), with_kwargs=True
            )
            try:
                hidden = runner.run(layer.layer, hidden)
            finally:
                handle.remove()
            experts = layer.experts
            gu, dn = experts.gate_up_proj.detach().float(), experts.down_proj.detach().float()
            E = gu.shape[0]
            # Per expert and width: the gate/up and down damages as two items (width_per_projection), or their sum.
            # One expert at a time, its round-to-nearest copies at every width made once (never every expert's at
            # every width: 3 x 45 GB at DeepSeek-V3's widths); the batches in order, so the sums are the same.
            d = torch.zeros(2 if cfg.per_projection else 1, E, len(levels), dtype=torch.float64)
            read = _read_metric(store.adapter, layer, cfg)  # per projection: both terms in the read metric
            batches = [(x.reshape(-1, x.shape[-1]).float(), idx, w) for x, idx, w in seen]
            for e in range(E):
                q_gu = {b: rtn(gu[e : e + 1], b, cfg.group_size, cfg.sym, cfg.mse_norm).weight for b in levels}
                err_dn = {
                    b: dn[e] - rtn(dn[e : e + 1], b, cfg.group_size, cfg.sym, cfg.mse_norm).weight[0] for b in levels
                }
                for x, idx, w in batches:
                    hit = idx == e
                    rows = hit.any(-1).nonzero().flatten()
                    if not rows.numel():
                        continue
                    g = (w * hit).sum(-1)[rows].double()
                    xs = x[rows]
                    h = expert_gate(experts, gu, e, xs)
                    for j, b in enumerate(levels):
                        if cfg.per_projection:  # gate/up's error in the residual stream, as down's
                            gate_up_sq = stream_sq_norms((expert_gate(experts, q_gu[b], 0, xs) - h) @ dn[e].T, read)
                        else:
                            gate_up_sq = (xs @ (gu[e] - q_gu[b][0]).T).pow(2).sum(-1)
                        sq = (gate_up_sq, stream_sq_norms(h @ err_dn[b].T, read))
                        for p, term in enumerate(sq if cfg.per_projection else (sq[0] + sq[1],)):
                            d[p, e, j] += float((g * term.double()).sum())
            if dist is not None and dist.active:
                d = d.to(gu.device)
                dist.all_reduce_sum_(d)
                d = d.cpu()
            damages += list(d)  # the same items as the layer's own allocation
            sizes = [gu[0].numel(), dn[0].numel()] if len(d) == 2 else [gu[0].numel() + dn[0].numel()]
            params += [n for n in sizes for _ in range(E)]
            owners.append((layer.index, d.shape[0] * E))
        finally:
            store.offload(layer.index)
    if not damages:
        return {}, {}
    widths = allocate_measured(torch.cat(damages), levels, budget_bit_params(cfg.bits_budget, params), params)
    budgets, means, i = {}, {}, 0
    for index, n in owners:
        budgets[index] = sum(int(widths[i + k]) * params[i + k] for k in range(n))
        means[index] = budgets[index] / sum(params[i : i + n])
        i += n
    return budgets, means


def _working_bytes(layers: list[MoELayer], cfg: QuantConfig, exact: bool) -> int:
    """Bytes one layer needs on the device beyond the streams: its float32 weights (twice, a margin for the solves'
    working copies) and its largest Hessian batch, one chunk of experts (``_expert_chunks``) with a working copy."""
    worst = 0
    for layer in layers:
        params = sum(p.numel() for p in layer.layer.parameters()) * 4
        hess = 0
        if layer.is_moe:
            E, _, d = layer.experts.gate_up_proj.shape
            chunk = _expert_chunks(E, d, exact, cfg, "cuda")[0]  # (only asked about a GPU)
            hess = (chunk.stop - chunk.start) * d * d * (8 if exact else 4) * 2
        worst = max(worst, params * 2 + hess)
    return worst


class _Diff:
    """``a[i] - b[i]`` on demand on the compute device: the drift between two streams, batch by batch, without
    storing it (the streams may live in host memory)."""

    def __init__(self, a: list[torch.Tensor], b: list[torch.Tensor], device: torch.device) -> None:
        self.a, self.b, self.device = a, b, device

    def __getitem__(self, i: int) -> torch.Tensor:
        a, b = (t[i].to(self.device, non_blocking=True).float() for t in (self.a, self.b))
        return a - b


def _residual_writers(adapter: MoEAdapter, layer: MoELayer) -> dict[str, nn.Module]:
    """The modules whose FP inputs the FP targets need (DESIGN 3.5c): the residual writers (``o_proj``, the dense or
    shared experts' ``down_proj``) and, in a MoE layer, the experts (their down projections' FP inputs)."""
    linears = {**adapter.attention_linears(layer), **adapter.dense_mlp_linears(layer)}
    out: dict[str, nn.Module] = {n: m for n, m in linears.items() if n.endswith(RESIDUAL_WRITERS)}
    if layer.is_moe:
        out["experts"] = layer.experts
    return out


def _read_metric(adapter: MoEAdapter, layer: MoELayer, cfg: QuantConfig):
    """The read metric (``mixed_precision.read_metric``) of a MoE layer's residual stream, from its linears that read
    the stream (``methods.stream_readers``), for the measured allocation with widths per projection
    (``damage_metric="readers"``); else None."""
    if not (cfg.per_projection and cfg.damage_metric == "readers"):
        return None
    return read_metric(stream_readers(adapter, layer))


@dataclass
class _Attention:
    """A layer's attention on the FP stream, from the look-ahead that ran it to reach the router: its output per
    batch (the store's device) and the FP inputs of its residual writers (o_proj). That layer's own FP forward takes
    them instead of computing the attention a second time (the same input and weights: the same values)."""

    index: int
    outputs: list[torch.Tensor]
    writer_inputs: dict[str, list[torch.Tensor]]


def _record_inputs(inputs: dict[str, list[torch.Tensor]], name: str):
    """A forward pre-hook appending the module's input as ``(tokens, d)`` float32 to ``inputs[name]``."""

    def fn(_module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        inputs[name].append(x.detach().reshape(-1, x.shape[-1]).float())

    return fn


def _replayed(attention: nn.Module, outputs: list[torch.Tensor], runner: LayerRunner):
    """A context in which the attention module returns ``outputs`` in turn, one per call, instead of computing them
    (as ``(output, None)``: every supported family unpacks ``hidden, _ = self.self_attn(...)``)."""
    it = iter(outputs)
    return forward_replaced(attention, lambda *_a, **_k: (runner.batch(next(it)), None))


def _fp_forward(runner: LayerRunner, layer: MoELayer, hidden: list[torch.Tensor], watch: dict[str, nn.Module],
                ahead: _Attention | None = None):  # fmt: skip
    """The layer (still full precision) on the FP stream: its outputs, the inputs ``(tokens, d)`` of the ``watch``
    modules per batch, its router logits ``(T, E)`` on the host (None for a dense layer) and, when ``watch`` has
    the experts, their hidden states (``capture.ExpertStash``, else None): the FP cross-Gram's FP half. ``ahead``:
    this layer's attention from the previous step's look-ahead (replayed, not computed)."""
    ahead = ahead if ahead is not None and ahead.index == layer.index else None
    if ahead is not None:
        watch = {n: m for n, m in watch.items() if n not in ahead.writer_inputs}
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in watch}
    experts = watch.get("experts")
    stash = ExpertStash() if experts is not None and stashable(experts) else None

    handles = [m.register_forward_pre_hook(_record_inputs(inputs, n), with_kwargs=True) for n, m in watch.items()]
    try:
        loop = stash.attach(experts) if stash is not None else contextlib.nullcontext()
        replay = _replayed(layer.attention, ahead.outputs, runner) if ahead is not None else contextlib.nullcontext()
        with record_router_logits([layer] if layer.is_moe else []) as rec, loop, replay:
            out = runner.run(layer.layer, hidden)
    finally:
        for h in handles:
            h.remove()
    if ahead is not None:
        inputs.update(ahead.writer_inputs)
    logits = torch.cat(rec[0]).cpu() if layer.is_moe else None
    return out, inputs, logits, stash


def _batch_bounds(x: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Each calibration batch's token range ``(t0, t1)`` in the tokens numbered across the batches ``(b, s, d)``."""
    offsets = [0, *torch.tensor([h.shape[0] * h.shape[1] for h in x]).cumsum(0).tolist()]
    return list(itertools.pairwise(offsets))


def _complete_stash(stash: ExpertStash | None, layer: MoELayer, fp_inputs, plan: LayerPlan, x_q, exact: bool) -> bool:
    """Whether the FP forward's stash holds every FP input the down projections' cross-Gram will ask for, after
    adding VSRAQ's near-miss pairs from the still-FP experts (exact sums, whose cross-Gram goes batch by batch)."""
    if stash is None or not exact or plan.expert_pairs is None or "experts" not in (fp_inputs or {}):
        return False
    per_batch = _split_pairs(*plan.expert_pairs, _batch_bounds(x_q))
    return stash.complete(layer.experts, fp_inputs["experts"], [(t, e) for t, e, _ in per_batch])


def _keep_attention(kept: _Attention, layer: MoELayer, adapter: MoEAdapter, runner: LayerRunner, fp_targets: bool):
    """Hooks that fill ``kept`` while the layer runs: its attention's output, and with ``fp_targets`` the FP inputs
    of the attention's residual writers (as ``_fp_forward`` records them)."""

    def output(_module, _args, out):
        kept.outputs.append(to_store(out[0].detach(), runner.store))

    handles = [layer.attention.register_forward_hook(output)]
    writers = _residual_writers(adapter, layer) if fp_targets else {}
    for n, m in writers.items():
        if n.startswith("self_attn."):
            kept.writer_inputs[n] = []
            handles.append(m.register_forward_pre_hook(_record_inputs(kept.writer_inputs, n), with_kwargs=True))
    return handles


def _lookahead_logits(
    store, runner: LayerRunner, index: int, hidden: list[torch.Tensor], fp_targets: bool = False
) -> tuple[dict[int, torch.Tensor], _Attention | None]:
    """The FP router logits of the next MoE layer after ``index`` on the FP stream ``hidden`` (its input), by a
    forward stopped at that router (dense layers in between run whole). Each layer is onloaded for this only.
    When that layer is the next one, also its attention (``_Attention``: with ``fp_targets`` its writers' FP
    inputs too) for its own FP forward at the next step."""
    for nxt in range(index + 1, len(store.layers)):
        layer = store.onload(nxt, experts=False)  # a MoE layer without its experts: the forward stops at the router
        try:
            if not layer.is_moe:
                hidden = runner.run(layer.layer, hidden)
                continue

            def stop(*_):
                raise StopForward

            kept = _Attention(nxt, [], {}) if nxt == index + 1 else None
            handles = _keep_attention(kept, layer, store.adapter, runner, fp_targets) if kept is not None else []
            with record_router_logits([layer]) as rec:
                handles.append(layer.router.register_forward_hook(stop))  # after the recording hook: logits, then stop
                try:
                    runner.capture(layer.layer, hidden)
                finally:
                    for h in handles:
                        h.remove()
            return {nxt: torch.cat(rec[0]).cpu()}, kept
        finally:
            store.offload(nxt)
    return {}, None


def _layer_result(
    qw: QuantizedWeight, keep: bool, host: torch.device, codes_to_host: bool = False, own: bool = False
) -> QuantizedWeight:
    """A finished layer's result as it leaves the step. In memory it stays with the caller, on the host, with its
    dequantized weight only when that is the model's own tensor (``own``: a float32 model solved where it lives);
    a lifted layer's float32 copy (another device, or a bf16 model) is not kept, or the result would hold the
    model again in float32 (``solve.dequantize_grid`` rebuilds it from the codes). Streamed, only the sink reads
    it and it packs codes, scales and zeros: those stay where they were solved (the sink packs them there and moves
    the packed words; ``codes_to_host`` moves them now instead), and the dequantized weight is dropped instead of
    copied to the host (DeepSeek-V3: 45 GB a layer over PCIe and in host memory)."""
    if keep and own:
        return weight_to(qw, host)
    codes = dataclasses.replace(qw, weight=None, prequant=None)
    return weight_to(codes, host) if codes_to_host or keep else codes


def _refine(store, runner, adapter, layer, x_q, fp_out, result: QuantizationResult, cfg, progress) -> None:
    """Block-wise refinement of one solved layer (DESIGN 3.7): the next layer's attention and router on the path."""
    from .refine import refine_block

    nxt = None
    logits = None
    if layer.index + 1 < len(store.layers) and store.layers[layer.index + 1].is_moe:
        logits = result.fp_router_logits.get(layer.index + 1)
        if logits is not None:
            nxt = store.onload(layer.index + 1, experts=False)  # full precision, up to its router
    try:
        report = refine_block(runner, adapter, layer, nxt, x_q, fp_out, result.weights, logits, cfg, progress)
    finally:
        if nxt is not None:
            store.offload(nxt.index)
    loss = report["loss"]
    result.summary.setdefault("refine", {})[layer.index] = {
        "first_loss": loss[0],
        "last_loss": loss[-1],
        "best_loss": min(loss),  # the step whose state the block keeps
    }
    for qw in result.weights.values():  # the pre-rounding values are only needed while a layer is refined
        qw.prequant = None


class _ExpertWidths:
    """Per MoE layer, the width of every expert (DESIGN 6; measured with ``width_per_projection``: of its gate/up and
    of its down). Rule-based allocations (``router-norm``, ``random``) come from the layer's original weights when it
    is first onloaded (a streamed model never holds more than one layer); ``frequency`` and ``measured`` are decided
    inside the layer (``quantize_layer``), from its calibration tokens and, for ``measured``, from one solve per
    candidate width."""

    SCORES: ClassVar[dict[str, str]] = {
        "measured": "measured damage: solve loss tr(E H E^T) (gate/up + down) x routing mass ({weight}), exact "
        "knapsack under the budget per {scope}{parts}",
        "random": "random (seed {seed})",
        "frequency": "routed calibration tokens (most-routed experts widest)",
    }

    def __init__(self, adapter, cfg: QuantConfig, router_init, given, result: QuantizationResult) -> None:
        self.adapter, self.cfg, self.router_init, self.given, self.result = adapter, cfg, router_init, given, result
        self.used_init: list[bool] = []
        self.budgets: dict[int, int] | None = None  # budget_scope="model": bit-params per MoE layer (pre-pass)
        if given is not None:
            result.summary["expert_bits"] = {i: w.tolist() for i, w in given.items()}
            result.summary["expert_bits_scores"] = "given by the caller"

    @property
    def mode(self) -> str | None:
        """The allocation decided inside the layer ("measured", "frequency"), or None."""
        if self.given is not None or not self.cfg.bits_budget or self.cfg.allocation not in ("measured", "frequency"):
            return None
        return self.cfg.allocation

    def record(self, index: int, widths: torch.Tensor, **per_layer: torch.Tensor) -> None:
        """Layer ``index``'s widths (gate/up's: ``expert_bits``) and the other per-layer lists (``expert_damage``,
        and with widths per projection ``expert_down_bits`` and ``expert_down_damage``) into the summary."""
        summary = self.result.summary
        for key, value in {"expert_bits": widths, **per_layer}.items():
            summary.setdefault(key, {})[index] = value.tolist()
            summary[key] = dict(sorted(summary[key].items()))
        c = self.cfg
        parts = ""
        if c.per_projection:
            read = ", damages in the stream's read metric" if c.damage_metric == "readers" else ""
            parts = f"{read}, widths per projection (gate/up, down)"
        summary["expert_bits_scores"] = self.SCORES[c.allocation].format(
            weight=c.allocation_weight, scope=c.budget_scope, seed=c.allocation_seed, parts=parts
        )

    def budget(self, index: int, params: list[int]) -> int:
        """The layer's budget in width x parameters (``measured``)."""
        from .mixed_precision import budget_bit_params

        if self.budgets is not None:
            return self.budgets[index]
        return budget_bit_params(self.cfg.bits_budget, params)

    def frequency(self, index: int, counts: torch.Tensor) -> torch.Tensor:
        from .mixed_precision import allocate_bits

        widths = allocate_bits(torch.argsort(counts.cpu(), descending=True, stable=True), self.cfg.bit_levels,
                               self.cfg.bits_budget)  # fmt: skip
        self.record(index, widths)
        return widths

    def measured(
        self, index: int, measured: _Measured, gate_up_params: int, down_params: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact allocation of one layer's measured damages: the widths of every expert's gate/up and of its down
        (the same unless ``width_per_projection``, where each expert's two parts are separate knapsack items)."""
        from .mixed_precision import allocate_parts

        E = measured.mass.numel()
        damage = measured.damage()
        if self.cfg.per_projection:
            down = measured.damage("down")
            parts, params = [measured.damage("gate_up"), down], [[gate_up_params] * E, [down_params] * E]
        else:
            parts, params = [damage], [[gate_up_params + down_params] * E]
        budget = self.budget(index, [p for ps in params for p in ps])
        widths = allocate_parts(parts, self.cfg.bit_levels, budget, params)
        if self.cfg.per_projection:
            self.record(index, widths[0], expert_damage=damage, expert_down_bits=widths[1], expert_down_damage=down)
        else:
            self.record(index, widths[0], expert_damage=damage)
        return widths[0], widths[-1]

    def of(self, layer: MoELayer) -> torch.Tensor | None:
        if self.given is not None:
            return self.given.get(layer.index)
        if not self.cfg.bits_budget or not layer.is_moe or self.mode is not None:
            return None
        from .mixed_precision import (
            ExpertScores,
            allocate_bits,
            max_intra_neuron_variance,
            router_norm_change,
            sensitivity_order,
        )

        if self.cfg.allocation == "random":
            E = layer.router.weight.shape[0]
            g = torch.Generator().manual_seed(self.cfg.allocation_seed * 1_000_003 + layer.index)
            widths = allocate_bits(torch.randperm(E, generator=g), self.cfg.bit_levels, self.cfg.bits_budget)
            self.record(layer.index, widths)
            return widths
        init = (self.router_init or {}).get(layer.index)
        change, used_init = router_norm_change(layer.router.weight.detach().cpu(), init)
        self.used_init.append(used_init)
        variance = max_intra_neuron_variance(
            {k: v.cpu() for k, v in self.adapter.expert_weights(layer.experts).items()}
        )
        order = sensitivity_order(ExpertScores(change, variance, used_init), self.cfg.promote_factor)
        widths = allocate_bits(order, self.cfg.bit_levels, self.cfg.bits_budget)
        summary = self.result.summary
        summary.setdefault("expert_bits", {})[layer.index] = widths.tolist()
        summary["expert_bits"] = dict(sorted(summary["expert_bits"].items()))
        summary["expert_bits_scores"] = (
            "router-norm change since initialisation"
            if all(self.used_init)
            else "final router-row norm (no router at initialisation was given: the fallback of DESIGN 6)"
        )
        return widths


# ---------------------------------------------------------------------------------------------- one layer
def _stages(adapter: MoEAdapter, layer: MoELayer) -> list[tuple[dict[str, nn.Linear], str | None]]:
    """The true-sequential stages of a layer: (linears, expert stage) with expert stage None, "gate_up", "down"."""
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
    return stages


def quantize_layer(
    runner: LayerRunner,
    adapter: MoEAdapter,
    layer: MoELayer,
    x_q: list[torch.Tensor],
    cfg: QuantConfig,
    plan: LayerPlan,
    result: QuantizationResult,
    expert_bits: torch.Tensor | None = None,
    fp_inputs: dict[str, list[torch.Tensor]] | None = None,
    fp_gate_up: torch.Tensor | None = None,
    dist: Dist | None = None,
    allocator: _ExpertWidths | None = None,
    drift: dict[str, list[torch.Tensor]] | None = None,
    fp_stash: ExpertStash | None = None,
) -> None:
    """Quantize one layer, stage by stage, each stage seeing the stages before it already quantized.
    ``fp_inputs``: the FP stream's inputs of the layer's residual writers and experts, per batch, and
    ``fp_gate_up`` the experts' original gate/up weights (FP targets, DESIGN 3.5c); ``fp_stash`` the FP experts'
    hidden states the FP forward kept (``capture.ExpertStash``). ``dist``: the ranks of a
    distributed run: statistics are exact sums reduced over them, solves are shared (``distributed.py``)."""
    prefix = f"model.layers.{layer.index}"
    distributed = dist is not None and dist.active
    exact = cfg.exact_sums or distributed
    bounds = _batch_bounds(x_q)
    fallbacks = result.summary["fallbacks"]
    fp_inputs = dict(fp_inputs or {}) if plan.fp_targets else {}
    routed: list = []
    starved: list[int] = []
    pairs = None
    measured: _Measured | None = None
    read = None  # the read metric of the measured allocation's damages (widths per projection)
    fp_experts_x = fp_inputs.pop("experts", None)
    for linears, expert_stage in _stages(adapter, layer):
        settings = {n: module_config(adapter, cfg, f"{prefix}.{n}") for n in linears}
        _note_overrides(result, cfg, {f"{prefix}.{n}": s for n, s in settings.items()})
        linears = {n: lin for n, lin in linears.items() if settings[n] is not None}  # "-:" modules stay as they are
        stage_fp = {n: fp_inputs.pop(n) for n in linears if plan.fp_target(n) and n in fp_inputs}
        if linears:
            plan.probe_metrics(runner, adapter, layer, x_q, linears, cfg)
        cap = StageCapture(
            linears,
            layer.experts if expert_stage == "gate_up" else None,
            plan.weighted_experts,
            plan.attention_weights if expert_stage is None else None,
            stage_fp,
            exact,
            {n: v for n, v in (drift or {}).items() if n in linears},
        )
        try:
            if cap.active:
                runner.capture(layer.layer, x_q)
        finally:
            cap.close()
        cap.reduce(dist)
        # A distributed run gives each linear of the stage to one rank (longest first); one process solves all.
        owners = dist.owners([float(lin.out_features * lin.in_features**2 + lin.in_features**3)
                              for lin in linears.values()]) if distributed else [0] * len(linears)  # fmt: skip
        for (name, lin), owner in zip(linears.items(), owners, strict=True):
            W = lin.weight[None].float()
            if name in cap.cross or name in cap.drift_cross:  # FP / drift targets (DESIGN 3.5c, 3.5e (ii))
                C, D = (cap.cross_matrix(name) if name in cap.cross else None,
                        cap.drift_matrix(name) if name in cap.drift_cross else None)  # fmt: skip
                W = writer_target(W, cap.acc[name].H, cfg.damp_percent, C, cfg.fp_target_alpha, D, cfg.drift_beta)
            target, metric, mcfg = f"{prefix}.{name}", plan.metric_for(name), settings[name]
            H, nb = cap.acc[name].H, plan.metric_blocks.get(name.rsplit(".", 1)[-1], 1) if metric is not None else 1
            if nb > 1:  # a block-diagonal metric (v_proj, one block per kv head): the blocks are separate problems
                W, H, metric = _blocks(W, H, metric, nb)
            if distributed:
                qw = solve_shared(dist, W, H, mcfg, target, fallbacks, None, metric, owner_of=[owner] * nb)
            else:
                qw = solve_batch(W, H, mcfg, target, fallbacks, metric)
            if nb > 1:
                qw = _join_blocks(qw)
            lin.weight.copy_(qw.weight[0])
            qw.weight = lin.weight.detach()[None]  # the model now holds these values: no second copy
            result.weights[f"{prefix}.{name}"] = qw
        if expert_stage is None:
            continue
        experts = layer.experts

        down_name = f"{prefix}.mlp.experts.down_proj"
        E = experts.gate_up_proj.shape[0]
        if expert_stage == "gate_up":
            routed = cap.routed
            plan.align_router(adapter, layer, routed, cfg, result)
            if plan.expert_pairs is not None:  # experts see the FP decisions, weighted (DESIGN 3.5)
                X = torch.cat([x for x, _, _ in routed])
                tokens, eids, w = plan.expert_pairs
                pairs = (X, tokens, eids, w)
            name = f"{prefix}.mlp.experts.gate_up_proj"
            W = experts.gate_up_proj
            mode = allocator.mode if allocator is not None and layer.is_moe else None
            if mode == "frequency":
                expert_bits = allocator.frequency(layer.index, _routing_mass(routed, E, dist, False))
            chunks = _gate_up_chunks(experts, routed, pairs, plan.weighted_experts, exact, bounds, dist, cfg,
                                     cap.all_tokens, name, starved, fallbacks)  # fmt: skip
            if mode != "measured":
                parts = []
                for ch, acc, H in chunks:
                    bits = None if expert_bits is None else expert_bits[ch]
                    metric = plan.gate_up_metric(adapter, experts, pairs, cfg, ch)  # (lambda_metric_up > 0)
                    parts.append(_chunk_solve(dist, W, ch, H, cfg, name, [], bits, metric, fallbacks))
                    del acc, H, metric
                _store_experts(prefix, experts, _join_chunks(parts, W), None, result)
                continue
            # The measured allocation: every chunk's experts solved once per candidate width (the chunk's Hessians
            # built once); the allocation waits for down's.
            levels = sorted(cfg.bit_levels)
            solved = {b: _Chunked(cfg.refine_steps > 0) for b in levels}
            weight_sums = []
            for ch, acc, H in chunks:
                metric = plan.gate_up_metric(adapter, experts, pairs, cfg, ch)
                weight_sums.append(acc.weight_sum.double().cpu())
                for width in levels:
                    sub = []
                    full = torch.full((ch.stop - ch.start,), width, dtype=torch.long)
                    qw = solve_shared(dist, W[ch].float(), H, cfg, name, sub, full, metric)
                    solved[width].add(ch, qw, expert_damage(W[ch], qw.weight, H), sub)
                del acc, H, metric
            if cfg.allocation_weight == "fragility" and pairs is not None:
                mass = torch.cat(weight_sums)  # gate weight x next router's fragility (+ near misses)
            else:
                mass = _routing_mass(routed, E, dist, True)
            measured = _Measured(levels, mass)
            for width in levels:
                measured.add("gate_up", width, *solved.pop(width).joined(E))
            if cfg.per_projection:  # gate/up's damage in the residual stream, where down's is measured
                if pairs is not None:
                    batches = [pairs]
                else:
                    batches = [(x, *expert_pairs(x, idx), w.reshape(-1) if plan.weighted_experts
                                else torch.ones(idx.numel(), device=x.device)) for x, idx, w in routed]  # fmt: skip
                gate_ups = {b: measured.results["gate_up"][b] for b in measured.levels}  # (codes: per expert)
                read = _read_metric(adapter, layer, cfg)  # both parts' damages in the stream's read metric
                out = gate_up_output_loss(experts, W, gate_ups, experts.down_proj, batches, dist, read)
                measured.losses["gate_up"].update(out)
            continue
        elif measured is not None:  # the down projections on each width's gate/up, then the exact allocation
            chunks = _expert_chunks(E, experts.down_proj.shape[-1], exact, cfg, experts.down_proj.device)
            for width in measured.levels:
                _dequantize_into(experts.gate_up_proj, measured.results["gate_up"][width], chunks)
                solved = _Chunked(cfg.refine_steps > 0)
                for ch in chunks:
                    notes, sub = [], []
                    W, H, metric = _down_problem(experts, pairs, routed, plan, starved, exact, bounds, dist,
                                                 fp_experts_x, fp_gate_up, cfg, down_name, notes, ch,
                                                 fp_stash)  # fmt: skip
                    if width == measured.levels[0]:  # coverage notes: once, not per width
                        fallbacks.extend({**f, "index": ch.start + f["index"]} for f in notes)
                    qw = solve_shared(dist, W, H, cfg, down_name, sub, torch.full((W.shape[0],), width), metric)
                    solved.add(ch, qw, expert_damage(W, qw.weight, H, read), sub)
                    del W, H
                measured.add("down", width, *solved.joined(E))
            gu_bits, dn_bits = allocator.measured(layer.index, measured, experts.gate_up_proj[0].numel(),
                                                  experts.down_proj[0].numel())  # fmt: skip
            fallbacks.extend(measured.fallbacks(gu_bits, dn_bits))
            _store_experts(prefix, experts, measured.select("gate_up", gu_bits, chunks, experts.gate_up_proj), None,
                           result)  # fmt: skip
            # Widths per projection: a down whose width differs from its gate/up's was solved (and measured) on
            # gate/up at its own width; it is solved once more on the chosen gate/up, the inputs it will really see.
            again = []
            redo = (dn_bits != gu_bits).nonzero().flatten()
            for ch in chunks:
                mine = redo[(redo >= ch.start) & (redo < ch.stop)]
                if not mine.numel():
                    continue
                W, H, metric = _down_problem(experts, pairs, routed, plan, starved, exact, bounds, dist, fp_experts_x,
                                             fp_gate_up, cfg, down_name, [], ch, fp_stash)  # fmt: skip
                for width in sorted(set(dn_bits[mine].tolist())):
                    ids = mine[dn_bits[mine] == width]
                    sub, dev = [], (ids - ch.start).to(W.device)
                    qw = solve_shared(dist, W[dev], H[dev], cfg, down_name, sub, torch.full((ids.numel(),), width),
                                      rows_of(metric, dev))  # fmt: skip
                    fallbacks.extend({**f, "index": int(ids[f["index"]])} for f in sub)
                    again.append((ids, _codes_only(qw, cfg.refine_steps > 0)))
                del W, H
            _store_experts(prefix, experts, None, measured.select("down", dn_bits, chunks, experts.down_proj, again),
                           result)  # fmt: skip
            continue
        parts = []
        for ch in _expert_chunks(E, experts.down_proj.shape[-1], exact, cfg, experts.down_proj.device):
            sub = []
            W, H, metric = _down_problem(experts, pairs, routed, plan, starved, exact, bounds, dist, fp_experts_x,
                                         fp_gate_up, cfg, down_name, sub, ch, fp_stash)  # fmt: skip
            bits = None if expert_bits is None else expert_bits[ch]
            parts.append(_chunk_solve(dist, experts.down_proj, ch, H, cfg, down_name, sub, bits, metric, fallbacks, W))
            del W, H
        _store_experts(prefix, experts, None, _join_chunks(parts, experts.down_proj), result)


# Auto ``expert_chunk``: the experts whose Hessians are built and solved together hold at most this many bytes of
# Hessian sums. On a GPU, 8 GiB (Qwen3-30B-A3B's 128 gate/up Hessians in float64, 4.3 GB: one chunk; DeepSeek-V3's
# 105 GB: 20 of 411 MB each per chunk), so a chunk's batched solves stay large next to the per-column launches. On
# the CPU, 1 GiB: measured at Qwen3-30B-A3B's shape (128 experts, bench_scale.py), 16 experts at a time were 9-12 %
# faster than all 128 at once and took 0.59-0.67x the peak memory.
EXPERT_HESSIAN_BYTES = {"cuda": 8 << 30, "cpu": 1 << 30}


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in host memory (pinned beside a GPU, pageable when pinning fails): the experts' FP gate/up for
    FP targets, moved to the device a chunk of experts at a time (DeepSeek-V3: 30 GB that the device need not hold)."""
    if t.device.type == "cpu":
        return t.clone()
    try:
        return to_store(t, torch.device("cpu"))
    except RuntimeError:  # the pinned pool cannot hold it: slower transfers, same values
        return t.cpu()


def _expert_chunks(E: int, d_in: int, exact: bool, cfg: QuantConfig, device: torch.device) -> list[slice]:
    """The experts of a layer in chunks whose Hessians (``d_in``-wide, float64 sums when ``exact``) are built and
    solved together: ``cfg.expert_chunk`` experts, or (0) as many as ``EXPERT_HESSIAN_BYTES`` holds on ``device``."""
    budget = EXPERT_HESSIAN_BYTES["cuda" if torch.device(device).type == "cuda" else "cpu"]
    size = cfg.expert_chunk or max(1, budget // (d_in * d_in * (8 if exact else 4)))
    return [slice(a, min(a + size, E)) for a in range(0, E, size)]


def _gate_up_chunks(experts, routed, pairs, weighted: bool, exact: bool, bounds, dist, cfg: QuantConfig,
                    all_tokens: HessianAccumulator, name: str, starved: list[int], fallbacks: list[dict]):  # fmt: skip
    """Per chunk of experts (only its Hessians are held, ``expert_chunk``): ``(chunk, acc, H)``, its gate/up
    Hessians with the starved ones blended with the ``all_tokens`` coverage in place; the starved experts go into
    ``starved`` and their coverage notes into ``fallbacks``, both with the layer's expert indices."""
    E, _, d = experts.gate_up_proj.shape
    cov_H, cov_n = all_tokens.H, int(all_tokens.tokens[0])
    for ch in _expert_chunks(E, d, exact, cfg, experts.gate_up_proj.device):
        acc = _gate_up_hessians(routed, pairs, weighted, exact, bounds, dist, ch)
        local = [e for e in range(acc.num_matrices) if int(acc.tokens[e]) < cfg.min_expert_tokens]
        starved.extend(ch.start + e for e in local)
        notes: list[dict] = []
        H = with_coverage(acc, cov_H, cov_n, local, name, notes, in_place=True)
        fallbacks.extend({**f, "index": ch.start + f["index"]} for f in notes)
        yield ch, acc, H
        del acc, H  # before the next chunk's are built (the caller drops its references too)


def _gate_up_hessians(routed, pairs, weighted: bool, exact: bool, bounds, dist, ch: slice) -> HessianAccumulator:
    """The gate/up Hessians of the experts in ``ch``, reduced over the ranks: from the routing recorded in the
    gate/up stage, or with ``pairs`` from VSRAQ's FP (token, expert, weight) triples, one term per calibration batch
    in exact mode (float32 running sums: the pairs in one term)."""
    if pairs is None:
        acc = expert_hessians(routed, ch, weighted, exact=exact)
    elif exact:
        inputs, per_batch = _pairs_by_batch(pairs, bounds)
        acc = expert_hessians(inputs, ch, pairs=per_batch, exact=True)
    else:
        X, tokens, eids, w = pairs
        acc = expert_hessians([(X, None, None)], ch, pairs=[(tokens, eids, w)])
    if exact:
        acc.reduce(dist)
    return acc


def _pairs_by_batch(pairs, bounds) -> tuple[list, list]:
    """VSRAQ's (token, expert, weight) pairs split by calibration batch (``bounds``: each batch's token range): each
    batch's inputs ``(X_b, None, None)`` and its pairs with tokens local to it (``_split_pairs``), one term per batch
    as every exact sum."""
    X, tokens, eids, w = pairs
    return [(X[t0:t1], None, None) for t0, t1 in bounds], _split_pairs(tokens, eids, w, bounds)


def _split_pairs(tokens: torch.Tensor, eids: torch.Tensor, w: torch.Tensor, bounds) -> list:
    """Per calibration batch, ``(tokens - t0, eids, w)`` of the pairs whose token is in the batch's range, in order."""
    # The tokens come as a few ascending runs (the FP choices, then the near misses): a batch's pairs are then one
    # slice of each run, found by binary search, taken run after run: the pairs a mask over all of them would keep,
    # in the same order, without a pass over every pair per batch (pairs x batches at real calibration sizes).
    breaks = (tokens[1:] < tokens[:-1]).nonzero().flatten().add(1).tolist() if tokens.numel() > 1 else []
    if len(breaks) > 8:  # not a few sorted runs: the mask per batch
        per_batch = []
        for t0, t1 in bounds:
            sel = (tokens >= t0) & (tokens < t1)
            per_batch.append((tokens[sel] - t0, eids[sel], w[sel]))
        return per_batch
    runs = list(itertools.pairwise([0, *breaks, tokens.numel()]))
    edges = torch.tensor([t for bound in bounds for t in bound], dtype=tokens.dtype, device=tokens.device)
    cuts = [(a + torch.searchsorted(tokens[a:b], edges)).view(-1, 2).tolist() for a, b in runs]
    per_batch = []
    for i, (t0, _) in enumerate(bounds):
        sel = torch.cat([torch.arange(*run[i], device=tokens.device) for run in cuts])
        per_batch.append((tokens[sel] - t0, eids[sel], w[sel]))
    return per_batch


def _chunk_solve(dist, param: torch.Tensor, ch: slice, H, cfg: QuantConfig, name: str, sub: list[dict],
                 bits, metric, fallbacks: list[dict], W: torch.Tensor | None = None):  # fmt: skip
    """Solve the experts ``ch`` of ``param`` (or the targets ``W`` of that chunk), write the result into ``param``
    and return the codes and grids without the float32 weight (the model holds it): ``(chunk, result)``.
    ``sub``'s fallbacks (chunk-local indices) go into ``fallbacks`` with the layer's expert indices."""
    W = param[ch].float() if W is None else W
    qw = solve_shared(dist, W, H, cfg, name, sub, bits, metric)
    param[ch].copy_(qw.weight)
    qw.weight = param.detach()[ch]
    fallbacks.extend({**f, "index": ch.start + f["index"]} for f in sub)
    return ch, qw


def _join_chunks(parts: list[tuple[slice, QuantizedWeight]], param: torch.Tensor) -> QuantizedWeight:
    """The chunks' results as one result over all experts; the weight is ``param``, which already holds them."""
    if len(parts) == 1:
        return parts[0][1]
    E = param.shape[0]
    qws = []
    for ch, qw in parts:
        qw = dataclasses.replace(qw, weight=None)  # the model holds the weights: no E-expert copy to gather
        ids = torch.arange(ch.start, ch.stop)
        if qw.bits_per_matrix is None:
            qws.append((ids, qw))
            continue
        for width in sorted(set(qw.bits_per_matrix.tolist())):  # a mixed chunk: one part per width
            sel = (qw.bits_per_matrix == width).nonzero().flatten()
            pre = None if qw.prequant is None else qw.prequant[sel]
            one = QuantizedWeight(qw.codes[sel], qw.scales[sel], qw.zeros[sel], qw.g_idx[sel], None, width,
                                  qw.group_size, None, pre)  # fmt: skip
            qws.append((ids[sel], one))
    joined = take(qws, E)
    joined.weight = param.detach()
    return joined


def _blocks(W: torch.Tensor, H: torch.Tensor, metric: torch.Tensor, nb: int):
    """One matrix ``(1, rows, in)`` with a block-diagonal output metric (whole, or its ``(nb, r, r)`` blocks) as ``nb``
    matrices of ``r = rows / nb`` rows sharing the Hessian: GPTQ is separable over rows, and the metric couples only
    rows of the same block."""
    r = W.shape[1] // nb
    if metric.ndim == 3:  # already the blocks (the probe metrics)
        return W.reshape(nb, r, W.shape[2]), H.expand(nb, *H.shape[1:]), metric
    Mb = torch.stack([metric[i * r : (i + 1) * r, i * r : (i + 1) * r] for i in range(nb)])
    return W.reshape(nb, r, W.shape[2]), H.expand(nb, *H.shape[1:]), Mb


def _join_blocks(qw: QuantizedWeight) -> QuantizedWeight:
    """The inverse of ``_blocks`` on a result: the blocks' rows back into one matrix (same grid, same ``g_idx``)."""
    if not torch.equal(qw.g_idx, qw.g_idx[:1].expand_as(qw.g_idx)):
        raise RuntimeError("the blocks of one matrix were given different column orders.")  # one H: never
    one = lambda t: None if t is None else t.reshape(1, -1, t.shape[-1])  # noqa: E731
    return QuantizedWeight(one(qw.codes), one(qw.scales), one(qw.zeros), qw.g_idx[:1], one(qw.weight), qw.bits,
                           qw.group_size, None, one(qw.prequant))  # fmt: skip


def _down_problem(experts, pairs, routed, plan: LayerPlan, starved: list[int], exact: bool, bounds, dist,
                  fp_experts_x, fp_gate_up, cfg: QuantConfig, down_name: str, fallbacks: list[dict],
                  ch: slice | None = None, stash: ExpertStash | None = None):  # fmt: skip
    """The down projections' weights (or FP targets), Hessians and metric, with the experts' current (quantized)
    gate/up: what the solve of the down stage sees. ``ch``: only those experts (indices in ``fallbacks`` local
    to the chunk). ``stash``: the FP experts' hidden states the FP forward kept."""
    ch = slice(0, experts.down_proj.shape[0]) if ch is None else ch
    starved = [e - ch.start for e in starved if ch.start <= e < ch.stop]
    whole = exact and stash is not None and stash.whole  # the stash has every FP input: no FP gate/up copy needed
    targets = fp_experts_x is not None and pairs is not None and (fp_gate_up is not None or whole)
    fp_chunk = fp_gate_up[ch].to(experts.down_proj.device) if targets and not whole else None  # (kept in host memory)
    cross = None
    if pairs is not None:
        X, tokens, eids, w = pairs
        if exact:  # the pairs of each calibration batch on that batch's tokens
            parts, chunks = _pairs_by_batch(pairs, bounds)
            shape = (ch.stop - ch.start, experts.down_proj.shape[-1])
            cross = ExpertCross(fp_chunk, fp_experts_x, True, stash, ch.start, shape) if targets else None
            acc, cov = down_hessians(experts, parts, False, starved, pairs=chunks, exact=True, cross=cross, chunk=ch)
            acc.reduce(dist)
            if cov is not None:
                cov.reduce(dist)
        else:
            acc, cov = down_hessians(experts, [(X, None, None)], False, starved, pairs=(tokens, eids, w), chunk=ch)
    else:
        acc, cov = down_hessians(experts, routed, plan.weighted_experts, starved, exact=exact, chunk=ch)
        acc.reduce(dist)
        if cov is not None:
            cov.reduce(dist)
    cov_tokens = int(cov.tokens.max()) if cov is not None else 0
    # In place: the targets below read acc.H too, but a starved expert keeps its own weight as its target.
    H = with_coverage(acc, cov.H if cov is not None else acc.H[:1], cov_tokens, starved, down_name, fallbacks, True)
    W = experts.down_proj[ch]
    if targets:
        if cross is not None:
            C = cross.matrix(dist if dist is not None and dist.active else None)
        else:
            C = expert_cross(experts, fp_chunk, pairs, torch.cat(fp_experts_x), ch)
        target = writer_target(W.float(), acc.H, cfg.damp_percent, C, cfg.fp_target_alpha)
        keep = torch.zeros(W.shape[0], dtype=torch.bool, device=W.device)
        keep[starved] = True  # their Hessians mix in all-token coverage: no matching cross term
        W = torch.where(keep[:, None, None], W.float(), target)
    return W.float(), H, rows_of(plan.metric_for("down_proj"), ch)


def _store_experts(prefix: str, experts: nn.Module, gate_up: QuantizedWeight | None, down: QuantizedWeight | None,
                   result: QuantizationResult) -> None:  # fmt: skip
    """The experts' solved gate/up and/or down into the model (no second copy) and the results by checkpoint name."""
    if gate_up is not None:
        if gate_up.weight.data_ptr() != experts.gate_up_proj.data_ptr():  # (chunked solves wrote it already)
            experts.gate_up_proj.copy_(gate_up.weight)
        gate_up.weight = experts.gate_up_proj.detach()  # the model now holds these values: no second copy
        inter = experts.gate_up_proj.shape[1] // 2
        gate, up = split_rows(gate_up, [inter, inter])
        result.weights[f"{prefix}.mlp.experts.gate_proj"] = gate
        result.weights[f"{prefix}.mlp.experts.up_proj"] = up
    if down is not None:
        if down.weight.data_ptr() != experts.down_proj.data_ptr():
            experts.down_proj.copy_(down.weight)
        down.weight = experts.down_proj.detach()
        result.weights[f"{prefix}.mlp.experts.down_proj"] = down


def _routing_mass(routed: list, E: int, dist: Dist | None, weighted: bool) -> torch.Tensor:
    """Per expert, the sum of its gate weights (``weighted``) or its routed-token count over the calibration tokens
    (the routing of the stage capture), summed over the ranks of a distributed run; float64 on the host."""
    device = routed[0][1].device if routed else torch.device("cpu")
    mass = torch.zeros(E, dtype=torch.float64, device=device)
    for _x, idx, w in routed:
        val = w.reshape(-1).double() if weighted else torch.ones(idx.numel(), dtype=torch.float64, device=device)
        mass.index_add_(0, idx.reshape(-1).long().to(device), val.to(device))
    if dist is not None and dist.active:
        dist.all_reduce_sum_(mass)
    return mass.cpu()


def _codes_only(qw: QuantizedWeight, keep_prequant: bool = False) -> QuantizedWeight:
    """``qw`` without its float32 weight (``dequantize_grid`` rebuilds it exactly: the solver's own arithmetic) and,
    unless refinement will read them, without the values the solver rounded."""
    return dataclasses.replace(qw, weight=None, prequant=qw.prequant if keep_prequant else None)


def _dequantize_into(param: torch.Tensor, qw: QuantizedWeight, chunks: list[slice]) -> None:
    """``qw``'s weights written into ``param`` a chunk of experts at a time (the temporaries of one chunk only)."""
    for ch in chunks:
        param[ch].copy_(dequantize_grid(qw.codes[ch], qw.scales[ch], qw.zeros[ch], qw.g_idx[ch]))


class _Chunked:
    """One width's results over the expert chunks of a layer (measured allocation): solves, losses, fallbacks. The
    results are kept as codes and grids: every width's float32 weights of a layer would be 3 x 30 GB of gate/up
    at DeepSeek-V3's widths over {2, 3, 4}, their codes a quarter of that."""

    def __init__(self, keep_prequant: bool = False) -> None:
        self.parts: list[tuple[torch.Tensor, QuantizedWeight]] = []
        self.losses: list[torch.Tensor] = []
        self.notes: list[dict] = []
        self.keep_prequant = keep_prequant  # (refinement starts from them)

    def add(self, ch: slice, qw: QuantizedWeight, loss: torch.Tensor, notes: list[dict]) -> None:
        self.parts.append((torch.arange(ch.start, ch.stop), _codes_only(qw, self.keep_prequant)))
        self.losses.append(loss)
        self.notes.extend({**f, "index": ch.start + f["index"]} for f in notes)

    def joined(self, E: int) -> tuple[QuantizedWeight, torch.Tensor, list[dict]]:
        """``(result, loss, fallbacks)`` over all ``E`` experts."""
        return take(self.parts, E), torch.cat(self.losses), self.notes


class _Measured:
    """The measured allocation of one MoE layer (DESIGN 6): every width's solved experts (kept: the chosen width's
    codes are used as they are; a down whose width differs from its gate/up's is solved again), their solve losses
    and the solves' fallbacks."""

    def __init__(self, levels: list[int], mass: torch.Tensor) -> None:
        self.levels, self.mass = levels, mass
        self.results: dict[str, dict[int, QuantizedWeight]] = {"gate_up": {}, "down": {}}
        self.losses: dict[str, dict[int, torch.Tensor]] = {"gate_up": {}, "down": {}}
        self.sub: dict[str, dict[int, list[dict]]] = {"gate_up": {}, "down": {}}

    def add(self, part: str, width: int, qw: QuantizedWeight, loss: torch.Tensor, fallbacks: list[dict]) -> None:
        self.results[part][width], self.losses[part][width], self.sub[part][width] = qw, loss, fallbacks

    def damage(self, part: str | None = None) -> torch.Tensor:
        """``(E, levels)``: routing mass x the recorded loss of ``part`` ("gate_up", "down"; None: both summed) per
        expert and width (gate/up's: its solve loss, or with widths per projection its loss in the residual
        stream, ``gate_up_output_loss``)."""
        if part is None:
            loss = torch.stack([self.losses["gate_up"][b] + self.losses["down"][b] for b in self.levels], dim=1)
        else:
            loss = torch.stack([self.losses[part][b] for b in self.levels], dim=1)
        return self.mass[:, None] * loss

    def fallbacks(self, gate_up: torch.Tensor, down: torch.Tensor) -> list[dict]:
        """The solves' fallbacks of the widths each expert's gate/up and down got (a down solved again on the chosen
        gate/up, its width differing from theirs, reports that solve's instead)."""
        kept = {"gate_up": gate_up, "down": torch.where(down == gate_up, down, 0)}
        return [f for part in ("gate_up", "down") for b in self.levels for f in self.sub[part][b]
                if int(kept[part][f["index"]]) == b]  # fmt: skip

    def select(
        self,
        part: str,
        widths: torch.Tensor,
        chunks: list[slice],
        param: torch.Tensor,
        again: list[tuple[torch.Tensor, QuantizedWeight]] = (),
    ) -> QuantizedWeight:
        """One batch from the chosen width of every expert (``take``: per-matrix widths when they differ), its weights
        written into ``param`` (the model's experts) chunk by chunk; the experts of ``again`` (indices, a result of
        one width) were solved once more and are taken from there."""
        parts = list(again)
        solved = torch.zeros(widths.numel(), dtype=torch.bool)
        for ids, _ in again:
            solved[ids] = True
        for b in sorted(set(widths.tolist())):
            ids = ((widths == b) & ~solved).nonzero().flatten()
            if not ids.numel():
                continue
            qw = self.results[part][b]
            dev = ids.to(qw.codes.device)
            pick = lambda t, d=dev: None if t is None else t[d]  # noqa: E731
            sub = QuantizedWeight(pick(qw.codes), pick(qw.scales), pick(qw.zeros), pick(qw.g_idx), None, b,
                                  qw.group_size, None, pick(qw.prequant))  # fmt: skip
            parts.append((ids, sub))
        chosen = take(parts, widths.numel())
        _dequantize_into(param, chosen, chunks)
        chosen.weight = param.detach()
        return chosen
