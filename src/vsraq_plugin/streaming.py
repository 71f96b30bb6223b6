"""Models larger than memory (DESIGN 7): a weightless skeleton, layers read from the safetensors shards one at a
time, solve-device placement and activation offload.

Two layer stores serve the layer loop through the same interface:

- ``InMemoryLayers``: an ``nn.Module`` already materialised (on the host); each layer moves to the solve device
  for its turn and back afterwards, keeping its quantized weights.
- ``StreamedLayers``: a model folder. The model is built on the meta device; the embeddings and the rotary
  module are materialised on the solve device (the layer-0 inputs need them); layer ``l``'s tensors are read
  from the shards in their stored dtype when its turn comes, cast to float32 on the device, and freed after
  its packed tensors are written. Peak memory is one layer, its Hessians and the calibration streams,
  whatever the depth.

Checkpoints of the families' original layouts are mapped onto transformers-5 modules here: per-expert
``w1/w3/w2`` (Mixtral) or ``gate/up/down_proj`` (Qwen, OLMoE, DeepSeek) are stacked into the fused
``experts.gate_up_proj`` / ``experts.down_proj``, as transformers' own conversion mapping does at load time.
"""

from __future__ import annotations

import ctypes
import gc
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import ConfigError
from .methods import RouterView
from .models import MoEAdapter, MoELayer, child_name, get_adapter
from .validation import InputError, check_model_dir, nonfinite_count, one_line

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
INDEX_NAME = "model.safetensors.index.json"


class ModelSourceError(InputError):
    """A model folder cannot be read; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------- device
def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` (or None): the current CUDA device when there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r} but torch sees no CUDA device; use device='cpu' or 'auto'.")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_store(offload: str, device: torch.device, stream_bytes: int, working_bytes: int) -> torch.device:
    """Where the calibration streams live: on the solve device when they fit beside the layer's working set
    (``offload="auto"``), or as forced (``"device"``, ``"cpu"``)."""
    if offload == "cpu" or device.type == "cpu":
        return torch.device("cpu")
    if offload == "device":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if stream_bytes + working_bytes < 0.8 * free else torch.device("cpu")


def release_host_memory() -> None:
    """Free what a finished layer left behind: collect reference cycles (hooks and closures that still point at
    the layer's tensors) and hand the freed host memory back to the OS (glibc keeps freed chunks in its arenas,
    so the resident size of a long run would creep up layer after layer; trimming is a no-op elsewhere)."""
    global _LIBC
    gc.collect()
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC = _LIBC if hasattr(_LIBC, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


@contextmanager
def frozen_imports():
    """Within a run, ``release_host_memory``'s collection walks only the objects made since the run began: the
    ~400k objects already alive (the imported libraries, mostly) are moved out of the collector's reach
    (``gc.freeze``) and handed back after. A full collection over them took 0.19-0.27 s a layer on the CPU. Left
    alone when the caller has frozen objects of its own."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()  # nothing already garbage is frozen
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# ---------------------------------------------------------------------------------------------- source files
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class ModelSource:
    """A model folder read lazily: its config and, by name, the tensors of its safetensors shards (with or
    without ``model.safetensors.index.json``). A read opens each shard it needs once and closes it after, so
    no mapping of a shard outlives the layer it was read for."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoConfig

        self.path = Path(path)
        check_model_dir(self.path, error=ModelSourceError)
        try:
            self.config = AutoConfig.from_pretrained(self.path)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ModelSourceError(
                f"{self.path}/config.json cannot be read as a transformers config ({one_line(exc)[:300]}); restore it "
                "from the original model."
            ) from exc
        files = self._weight_files()
        self.where: dict[str, Path] = {}
        self.meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 (no __iter__)
                        sl = handle.get_slice(key)
                        if sl.get_dtype() not in _DTYPES:
                            raise ModelSourceError(
                                f"{f.name}: {key} is stored as {sl.get_dtype()}, which vsraq cannot read; convert "
                                "the model to bfloat16 or float16 first (e.g. DeepSeek's fp8_cast_bf16.py)."
                            )
                        self.where[key] = f
                        self.meta[key] = (_DTYPES[sl.get_dtype()], tuple(sl.get_shape()))
            except (SafetensorError, OSError) as exc:
                raise ModelSourceError(
                    f"{f} is not a readable safetensors file ({one_line(exc)}); the model folder is damaged: "
                    "re-download it."
                ) from exc

    def _weight_files(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ModelSourceError(f"{index} is not a valid safetensors index ({exc}).") from exc
            files = sorted({self.path / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelSourceError(
                    f"{index} names shards that are missing: {missing[:4]}; the download is incomplete."
                )
            return files
        files = sorted(self.path.glob("*.safetensors"))
        files = [f for f in files if f.name not in ("router_init.safetensors",)]
        if not files:
            pickles = [p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            hint = f" (found pickled {pickles[:3]}: vsraq never unpickles weights)" if pickles else ""
            raise ModelSourceError(
                f"{self.path} holds no *.safetensors weights{hint}; re-save the model with "
                "save_pretrained(safe_serialization=True)."
            )
        return files

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def dtype_of(self, key: str) -> torch.dtype:
        return self.meta[key][0]

    @property
    def dtype(self) -> torch.dtype:
        """The stored dtype of the floating-point weights (the most common one, by element count)."""
        counts: dict[torch.dtype, int] = {}
        for dt, shape in self.meta.values():
            if dt.is_floating_point:
                counts[dt] = counts.get(dt, 0) + int(torch.Size(shape).numel())
        return max(counts, key=counts.get) if counts else torch.float32

    @contextmanager
    def opened(self) -> Iterator:
        """``get(key)``: one stored tensor at a time, each shard opened once for the block and closed after it (its
        mapping, and the resident pages it brought in, do not outlive the block). A tensor holding NaN or Inf is
        refused as it is read (every weight a run uses passes here once)."""
        handles: dict[Path, object] = {}

        def get(key: str) -> torch.Tensor:
            f = self.where[key]
            try:
                if f not in handles:
                    handles[f] = safe_open(str(f), framework="pt").__enter__()
                tensor = handles[f].get_tensor(key)
            except (SafetensorError, OSError) as exc:
                raise ModelSourceError(
                    f"{f} cannot be read ({one_line(exc)}); the model folder is damaged: re-download it."
                ) from exc
            bad = nonfinite_count(tensor)
            if bad:
                raise ModelSourceError(
                    f"{f.name}: {key} holds {bad} NaN/Inf value(s); the weights are damaged: re-download or "
                    "re-export the model."
                )
            return tensor

        try:
            yield get
        finally:
            for h in handles.values():
                h.__exit__(None, None, None)

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors of ``keys`` in their stored dtype, on the host."""
        with self.opened() as get:
            return {k: get(k) for k in keys}

    def fingerprint_parts(self) -> list[bytes]:
        """What identifies these weights for resume: config, names, shapes, dtypes and a sample of every tensor."""
        parts = [self.config.to_json_string().encode()]
        keys = sorted(self.where)
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
        for f in sorted(by_file):
            with safe_open(str(f), framework="pt") as handle:
                for k in by_file[f]:
                    sl = handle.get_slice(k)
                    shape = sl.get_shape()
                    head = sl[:1] if shape else handle.get_tensor(k)
                    parts.append(f"{k}{shape}{sl.get_dtype()}".encode())
                    parts.append(head.reshape(-1)[:64].float().numpy().tobytes())
        return parts


# ---------------------------------------------------------------------------------------------- key mapping
def native_to_source(adapter: MoEAdapter, name: str) -> str:
    """Transformers-5 parameter name -> the family's original checkpoint name (Mixtral: ``block_sparse_moe``)."""
    if adapter.moe_block_key != "mlp" and ".mlp." in name:
        parts = name.split(".")
        if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
            return name.replace(".mlp.", f".{adapter.moe_block_key}.", 1)
    return name


def source_keys(adapter: MoEAdapter, source: ModelSource, name: str, shape: tuple[int, ...]) -> list[str] | None:
    """The source tensors that make up the transformers-5 parameter ``name``: itself (or its original name),
    or, for fused experts stored per expert, the per-expert weights in stacking order."""
    for key in (name, native_to_source(adapter, name)):
        if key in source:
            return [key]
    for fused, projs in ((".experts.gate_up_proj", ("gate_proj", "up_proj")), (".experts.down_proj", ("down_proj",))):
        if not name.endswith(fused):
            continue
        index = int(name.split(".")[2])
        keys = []
        for proj in projs:
            for e in range(shape[0]):
                cands = (
                    f"{adapter.expert_key(index, e, proj)}.weight",
                    f"model.layers.{index}.mlp.experts.{e}.{proj}.weight",
                )
                found = next((c for c in cands if c in source), None)
                if found is None:
                    return None
                keys.append(found)
        return keys
    return None


def read_params(
    adapter: MoEAdapter, source: ModelSource, names: dict[str, tuple[int, ...]], device, dtype
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Tensors for transformers-5 parameter names (name -> shape), on ``device`` in ``dtype`` (floating point), and
    the source keys used. Per-expert weights are copied one at a time into the fused layout (gate rows, then up
    rows): no stacked copy of a layer's experts is ever made beside the result."""
    plan = {}
    for name, shape in names.items():
        keys = source_keys(adapter, source, name, shape)
        if keys is None:
            raise ModelSourceError(
                f"{source.path}: no tensor for {name!r} (looked for it under its transformers-5 and original "
                "names); the weights do not match the config's model family."
            )
        plan[name] = keys
    out = {}
    with source.opened() as get:
        for name, keys in plan.items():
            shape = tuple(names[name])
            stored = [source.meta[k] for k in keys]
            if len(keys) == 1:
                got = stored[0][1]
            else:  # E experts per projection, stacked, projections concatenated along the rows
                E, per = shape[0], len(keys) // shape[0]
                rows = stored[0][1][0]
                got = (E, rows * per, *stored[0][1][1:])
                if any(s[1] != stored[0][1] for s in stored):
                    got = None
            if got != shape:
                raise ModelSourceError(
                    f"{source.path}: {name} has shape {got} in the weights but {shape} in the model built from "
                    "config.json; the config does not describe these weights."
                )
            floating = stored[0][0].is_floating_point
            target = dtype if floating else stored[0][0]
            if len(keys) == 1:
                out[name] = get(keys[0]).to(device=device, dtype=target)
                continue
            t = torch.empty(shape, device=device, dtype=target)
            for i, k in enumerate(keys):
                proj, e = divmod(i, shape[0])
                t[e, proj * rows : (proj + 1) * rows].copy_(get(k))
            out[name] = t
    used = {k for keys in plan.values() for k in keys}
    return out, used


def split_around(module: nn.Module, skip: nn.Module | None) -> tuple[list[nn.Module], list[nn.Module]]:
    """``module`` without its submodule ``skip``, as modules to take whole (the largest ones that do not contain
    ``skip``) and modules to take without their children (those on the path down to ``skip``)."""
    if skip is None:
        return [module], []
    whole: list[nn.Module] = []
    own: list[nn.Module] = []

    def walk(m: nn.Module) -> None:
        if m is skip:
            return
        if not any(s is skip for s in m.modules()):
            whole.append(m)
            return
        own.append(m)
        for c in m.children():
            walk(c)

    walk(module)
    return whole, own


def submodule_name(module: nn.Module, sub: nn.Module) -> str:
    return next(n for n, m in module.named_modules() if m is sub)


@torch.no_grad()
def materialize(
    model: nn.Module, module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], device,
    skip: nn.Module | None = None,
) -> None:  # fmt: skip
    """Give a meta ``module`` (at ``prefix`` in ``model``) real storage: persistent state from ``tensors`` (full
    names), non-persistent buffers (rotary frequencies) recomputed by the model's own initialisation. ``skip``: a
    submodule left on the meta device (no storage, no tensors expected for it)."""
    whole, own = split_around(module, skip)
    for m in whole:
        m.to_empty(device=device)
    for m in own:
        m.to_empty(device=device, recurse=False)
    inside = set() if skip is None else {id(m) for m in skip.modules()}
    for sub in module.modules():
        if id(sub) not in inside and sub._non_persistent_buffers_set and hasattr(model, "_init_weights"):
            model._init_weights(sub)
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if skip is not None:
        meta = submodule_name(module, skip) + "."
        missing = [k for k in missing if not k.startswith(meta)]
    if missing or unexpected:
        raise ModelSourceError(f"{prefix or 'model'}: tensors missing {missing[:4]} or unexpected {unexpected[:4]}.")


def _state_shapes(module: nn.Module, prefix: str) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}{k}": tuple(v.shape) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------- layer stores
# What a lifted tensor was: its module, which slot, and the original tensor (kept: put back writes into it).
Held = dict[tuple[int, str, str], tuple[nn.Module, torch.Tensor]]


def lift(modules: Iterable[nn.Module], device: torch.device, held: Held, recurse: bool = True) -> None:
    """The tensors of ``modules`` (with ``recurse=False`` only their own) on ``device``, floating ones in float32
    (the solve's dtype); the originals go into ``held`` for ``put_back``. A tensor already held keeps its first
    record, so lifting a module twice (the look-ahead's part, then the whole layer) undoes in one step."""
    for top in modules:
        for m in top.modules() if recurse else (top,):
            for kind in ("_parameters", "_buffers"):
                for name, t in getattr(m, kind).items():
                    key = (id(m), kind, name)
                    if t is None or key in held:
                        continue
                    dtype = torch.float32 if t.is_floating_point() else t.dtype
                    if t.device == device and t.dtype == dtype:
                        continue
                    held[key] = (m, t.detach())
                    _set_tensor(m, kind, name, t.detach().to(device, dtype))


def put_back(held: Held) -> None:
    """Every lifted tensor's values written back into its original tensor (device and dtype as before ``lift``;
    a quantized layer's dequantized weights are rounded to the model's dtype here, as a server loading the
    checkpoint in that dtype rounds them), which the module then holds again. Written in place: the model's
    memory is the memory it came with (no second allocation per layer; a memory-mapped load stays one copy)."""
    for (_, kind, name), (m, original) in held.items():
        original.copy_(getattr(m, kind)[name].detach())
        _set_tensor(m, kind, name, original)
    held.clear()


def _set_tensor(m: nn.Module, kind: str, name: str, t: torch.Tensor) -> None:
    if kind == "_buffers":
        m._buffers[name] = t
        return
    param = m._parameters[name]
    try:
        param.data = t  # the same Parameter object: hooks and tied references keep seeing it
    except RuntimeError:  # a tensor type .data cannot take (the meta device): a new Parameter, as Module.to does
        m._parameters[name] = nn.Parameter(t, requires_grad=param.requires_grad)


class InMemoryLayers:
    """A materialised model, left in its own dtype: each layer is lifted to the solve device in float32 for its
    turn and put back afterwards (its quantized weights rounded to the model's dtype), so a bf16 model never
    holds more than one float32 layer beside itself."""

    streamed = False

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        self.adapter = get_adapter(model)
        self.layers = self.adapter.layers(model)
        self.held: dict[int | str, Held] = {}

    def _inputs_modules(self) -> list[nn.Module]:
        base = getattr(self.model, "model", self.model)
        return [child for name, child in base.named_children() if name != "layers"]

    def prepare_inputs(self) -> None:
        """What the layer-0 capture runs (embeddings, rotary) on the solve device in float32, as a streamed
        model builds them: the layer-0 inputs and position embeddings are then the streamed run's, bit for bit."""
        lift(self._inputs_modules(), self.device, self.held.setdefault("inputs", {}))

    def finish_inputs(self) -> None:
        put_back(self.held.pop("inputs", {}))

    def onload(self, index: int, experts: bool = True) -> MoELayer:
        """Layer ``index`` on the solve device in float32; ``experts=False``: all but its routed experts (a forward
        that stops at the router, the look-ahead's, needs no more)."""
        layer = self.layers[index]
        whole, own = split_around(layer.layer, None if experts else layer.experts)
        held = self.held.setdefault(index, {})
        lift(whole, self.device, held)
        lift(own, self.device, held, recurse=False)
        return layer

    def offload(self, index: int) -> None:
        put_back(self.held.pop(index, {}))

    def lifted(self, index: int) -> bool:
        """Whether layer ``index`` was moved or cast for its turn: its solved weights are then copies that
        ``offload`` moves back or rounds, not the model's own tensors."""
        return bool(self.held.get(index))

    def router(self, index: int) -> RouterView:
        return RouterView.of(self.layers[index]).to(self.device)

    def fingerprint_parts(self) -> list[bytes]:
        parts = [self.model.config.to_json_string().encode()]
        for p in self.model.parameters():  # a strided sample, cast after slicing (no float32 copy of the model)
            parts.append(p.detach().flatten()[:: max(1, p.numel() // 64)].float().cpu().numpy().tobytes())
        return parts


def check_unquantized(source: ModelSource) -> None:
    """Quantizing starts from full precision: a folder whose config has a ``quantization_config`` is refused."""
    if getattr(source.config, "quantization_config", None) is not None:
        raise ModelSourceError(
            f"{source.path} is already quantized (its config has a quantization_config); pass the full-precision model."
        )


class StreamedLayers:
    """A model folder quantized layer by layer (see the module docstring)."""

    streamed = True

    def __init__(self, source: ModelSource, device: torch.device) -> None:
        from transformers import AutoModelForCausalLM

        self.source, self.device = source, device
        config = source.config
        check_unquantized(source)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.model.eval()
        self.adapter = get_adapter(self.model)
        self.layers = self.adapter.layers(self.model)
        self.used: set[str] = set()

    def prepare_inputs(self) -> None:
        """Embeddings and rotary on the device: all the layer-0 capture runs (the decoder layers stay meta)."""
        base = getattr(self.model, "model", self.model)
        for name, child in base.named_children():
            if name in ("layers", "norm"):
                continue
            prefix = f"model.{name}."
            tensors, used = read_params(self.adapter, self.source, _state_shapes(child, prefix), self.device,
                                        torch.float32)  # fmt: skip
            materialize(self.model, child, prefix, tensors, self.device)
            self.used |= used

    def finish_inputs(self) -> None:
        base = getattr(self.model, "model", self.model)
        for name, child in base.named_children():
            if name != "layers":
                child.to("meta")

    def layer_keys(self, index: int) -> set[str]:
        """Source keys of decoder layer ``index``, to check every one of them is used."""
        return {k for k in self.source.where if k.startswith(f"model.layers.{index}.")}

    def onload(self, index: int, experts: bool = True) -> MoELayer:
        """Layer ``index`` read from the shards onto the solve device; ``experts=False``: all but its routed
        experts, which stay on the meta device (a forward that stops at the router, the look-ahead's, needs no more:
        at DeepSeek-V3 widths ~0.5 GB read instead of ~23 GB (bf16), and no second layer of experts in memory)."""
        layer = self.layers[index]
        prefix = f"model.layers.{index}."
        skip = None if experts else layer.experts
        shapes = _state_shapes(layer.layer, prefix)
        if skip is not None:
            meta = f"{prefix}{submodule_name(layer.layer, skip)}."
            shapes = {k: v for k, v in shapes.items() if not k.startswith(meta)}
        tensors, used = read_params(self.adapter, self.source, shapes, self.device, torch.float32)
        materialize(self.model, layer.layer, prefix, tensors, self.device, skip)
        if skip is not None:
            return layer
        extra = {k for k in self.layer_keys(index) - used if not k.endswith("rotary_emb.inv_freq")}
        if extra:
            raise ModelSourceError(
                f"{self.source.path}: layer {index} has tensors the model built from config.json does not use, "
                f"e.g. {sorted(extra)[:3]}; the config does not describe these weights."
            )
        return layer

    def offload(self, index: int) -> None:
        self.layers[index].layer.to("meta")

    def lifted(self, index: int) -> bool:
        return True  # every tensor is read from the shards for the layer's turn and freed after it

    def router(self, index: int) -> RouterView:
        layer = self.layers[index]
        rname = f"model.layers.{index}.mlp.{child_name(layer.mlp, layer.router)}"
        names = {f"{rname}.weight": tuple(layer.router.weight.shape)}
        bias = getattr(layer.router, "e_score_correction_bias", None)
        if bias is not None:
            names[f"{rname}.e_score_correction_bias"] = tuple(bias.shape)
        norm = getattr(layer.layer, "post_attention_layernorm", None)
        if norm is not None and getattr(norm, "weight", None) is not None:
            names[f"model.layers.{index}.post_attention_layernorm.weight"] = tuple(norm.weight.shape)
        t, _ = read_params(self.adapter, self.source, names, self.device, torch.float32)
        return RouterView(
            t[f"{rname}.weight"],
            t.get(f"{rname}.e_score_correction_bias"),
            t.get(f"model.layers.{index}.post_attention_layernorm.weight"),
        )

    def fingerprint_parts(self) -> list[bytes]:
        return self.source.fingerprint_parts()
