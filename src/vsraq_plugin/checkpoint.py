"""GPTQ v1 checkpoints (DESIGN 5): save with atomic rename, load back onto transformers 5 models.

A saved folder holds ``model.safetensors`` (per-expert ``qweight``/``qzeros``/``scales``/``g_idx`` under the
family's original names; routers, norms, embeddings and ``lm_head`` unquantized), ``config.json`` with
``quantization_config`` (``quant_method: "gptq"``, ``meta.quantizer`` = ``["vsraq:<version>"]``, and a
``vsraq`` block with every setting), ``quantize_config.json``, and the tokenizer when given.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .config import QuantConfig
from .models import EXPERT_PROJECTIONS, MoEAdapter, MoELayer, get_adapter
from .nn import QuantExperts, QuantLinear
from .packing import pack_linear
from .pipeline import QuantizationResult, router_name

WEIGHTS_NAME = "model.safetensors"
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")  # the GPTQ v1 tensors of one quantized linear
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------- names
def _native_to_checkpoint(adapter: MoEAdapter, name: str) -> str:
    """Transformers-5 parameter name -> the family's original checkpoint name (Mixtral: block_sparse_moe)."""
    if adapter.moe_block_key != "mlp" and ".mlp." in name:
        parts = name.split(".")
        if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
            return name.replace(".mlp.", f".{adapter.moe_block_key}.", 1)
    return name


KEY_LAYOUTS = ("original", "transformers")


def _param_key(adapter: MoEAdapter, name: str, layout: str) -> str:
    return _native_to_checkpoint(adapter, name) if layout == "original" else name


def _expert_key(adapter: MoEAdapter, layer_index: int, expert: int, proj: str, layout: str) -> str:
    """``original``: the family's names (Mixtral ``block_sparse_moe.experts.{e}.w1``: vLLM, AutoGPTQ, the Hub);
    ``transformers``: transformers-5 module names (``mlp.experts.{e}.gate_proj``: what gptqmodel 7 reads)."""
    if layout == "original":
        return adapter.expert_key(layer_index, expert, proj)
    return f"model.layers.{layer_index}.mlp.experts.{expert}.{proj}"


def _linear_targets(adapter: MoEAdapter, layer: MoELayer) -> dict[str, nn.Linear]:
    return {**adapter.attention_linears(layer), **adapter.dense_mlp_linears(layer)}


def dynamic_overrides(adapter: MoEAdapter, expert_bits: dict, base_bits: int, layout: str = "original") -> dict:
    """GPTQ ``dynamic`` entries (module-name regex -> settings) for every expert whose width differs from
    ``bits``: the form gptqmodel and vLLM read for per-module widths."""
    out = {}
    for layer_index, widths in sorted(expert_bits.items(), key=lambda kv: int(kv[0])):
        for e, b in enumerate(widths):
            if b != base_bits:
                prefix = _expert_key(adapter, int(layer_index), e, "gate_proj", layout).rsplit(".", 1)[0]
                out["+:^" + re.escape(prefix) + r"\."] = {"bits": int(b)}
    return out


def dynamic_bits(dynamic: dict | None, module: str, default: int) -> int:
    """The width a ``dynamic`` block gives ``module`` (first matching positive pattern), else ``default``."""
    for pattern, override in (dynamic or {}).items():
        if pattern.startswith("-:"):
            continue
        if re.search(pattern[2:] if pattern.startswith("+:") else pattern, module) and "bits" in override:
            return int(override["bits"])
    return default


def quantization_config(
    config: QuantConfig, summary: dict | None = None, adapter: MoEAdapter | None = None, layout: str = "original"
) -> dict:
    """The ``quantization_config`` block that GPTQ loaders (transformers, gptqmodel, vLLM) read."""
    vsraq = config.to_dict()
    if summary:
        vsraq["fallbacks"] = summary.get("fallbacks", [])
        if "expert_bits" in summary:
            vsraq["expert_bits"] = summary["expert_bits"]
            vsraq["expert_bits_scores"] = summary.get("expert_bits_scores")
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": config.bits,
        "group_size": config.group_size,
        "desc_act": config.desc_act,
        "sym": config.sym,
        "static_groups": config.static_groups,
        "true_sequential": config.true_sequential,
        "damp_percent": config.damp_percent,
        "lm_head": False,
        "dynamic": (
            dynamic_overrides(adapter, summary["expert_bits"], config.bits, layout)
            if summary and "expert_bits" in summary and adapter is not None
            else (config.dynamic or None)
        ),
        "meta": {"quantizer": [f"vsraq:{__version__}"], "vsraq": vsraq},
    }


# ---------------------------------------------------------------------------------------------- save
def checkpoint_tensors(
    model: nn.Module, result: QuantizationResult, layout: str = "original"
) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by its name in the file (``layout``: see ``_expert_key``)."""
    if layout not in KEY_LAYOUTS:
        raise CheckpointError(f"key_layout={layout!r} is unknown; use one of {KEY_LAYOUTS}.")
    adapter = get_adapter(model)
    tensors: dict[str, torch.Tensor] = {}
    quantized_params: set[str] = set()
    for layer in adapter.layers(model):
        prefix = f"model.layers.{layer.index}"
        for name, lin in _linear_targets(adapter, layer).items():
            full = f"{prefix}.{name}"
            if full not in result.weights:
                raise CheckpointError(f"{full} was not quantized; run the quantization before saving.")
            qw = result.weights[full]
            packed = pack_linear(qw.codes[0], qw.scales[0], qw.zeros[0], qw.g_idx[0], qw.bits)
            key = _param_key(adapter, full, layout)
            tensors.update({f"{key}.{k}": v for k, v in packed.state_dict().items()})
            if lin.bias is not None:
                tensors[f"{key}.bias"] = lin.bias.detach().contiguous()
            quantized_params.update({f"{full}.weight", f"{full}.bias"})
        if layer.is_moe:
            for proj in EXPERT_PROJECTIONS:
                qw = result.weights[f"{prefix}.mlp.experts.{proj}"]
                for e in range(qw.codes.shape[0]):
                    bits = qw.bits if qw.bits_per_matrix is None else int(qw.bits_per_matrix[e])
                    packed = pack_linear(qw.codes[e], qw.scales[e], qw.zeros[e], qw.g_idx[e], bits)
                    key = _expert_key(adapter, layer.index, e, proj, layout)
                    tensors.update({f"{key}.{k}": v for k, v in packed.state_dict().items()})
            quantized_params.update({f"{prefix}.mlp.experts.gate_up_proj", f"{prefix}.mlp.experts.down_proj"})
            rname = router_name(layer)
            if rname in result.weights:  # router_mode="quantize": the router is a GPTQ linear too
                qw = result.weights[rname]
                packed = pack_linear(qw.codes[0], qw.scales[0], qw.zeros[0], qw.g_idx[0], qw.bits)
                key = _param_key(adapter, rname, layout)
                tensors.update({f"{key}.{k}": v for k, v in packed.state_dict().items()})
                quantized_params.add(f"{rname}.weight")
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        if name in quantized_params or (tied and name == "lm_head.weight"):
            continue
        tensors[_param_key(adapter, name, layout)] = tensor.detach().contiguous()
    return tensors


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of a model that holds ``QuantLinear``/``QuantExperts`` (a loaded checkpoint):
    the same names and per-expert layout ``checkpoint_tensors`` writes, so a loaded model re-saves as it came."""
    adapter = get_adapter(model)
    tensors: dict[str, torch.Tensor] = {}
    skip: set[str] = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, QuantExperts):
            index = int(re.match(r"model\.layers\.(\d+)\.", mod_name + ".").group(1))
            for proj in EXPERT_PROJECTIONS:
                for e in range(mod.num_experts):
                    key = adapter.expert_key(index, e, proj)
                    tensors.update({f"{key}.{k}": v for k, v in mod.expert_tensors(proj, e).items()})
            skip.update(f"{mod_name}.{k}" for k in mod.state_dict())
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        if name in skip or (tied and name == "lm_head.weight"):
            continue
        tensors[_native_to_checkpoint(adapter, name)] = tensor.detach().contiguous()
    return tensors


def save_checkpoint(
    model: nn.Module,
    result: QuantizationResult,
    out_dir: str | Path,
    tokenizer=None,
    overwrite: bool = False,
    key_layout: str = "original",
) -> Path:
    """Write the GPTQ v1 checkpoint into ``out_dir``: built in a temporary folder beside it, then renamed,
    so a failure never leaves a half-written checkpoint. ``key_layout``: ``original`` (the family's names,
    as vLLM and the Hub's GPTQ models use) or ``transformers`` (transformers-5 names, as gptqmodel 7 reads)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} exists and is not empty; choose another --out or pass overwrite=True.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise CheckpointError(f"cannot write to {out.parent}: {exc.strerror}; pick a writable --out.") from exc
    try:
        tensors = checkpoint_tensors(model, result, key_layout)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        qcfg = quantization_config(result.config, result.summary, get_adapter(model), key_layout)
        cfg = model.config.to_dict()
        cfg["quantization_config"] = qcfg
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        if out.exists():
            backup = out.with_name(f".{out.name}.old")
            os.replace(out, backup)
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------- load
class SafetensorsFiles(Mapping):
    """A checkpoint's tensors by name across its safetensors files, each read on first access (no full copy in
    memory). Anything but safetensors is refused; an unreadable file is a ``CheckpointError``."""

    def __init__(self, files) -> None:
        bad = [f for f in files if not str(f).endswith(".safetensors")]
        if bad:
            raise CheckpointError(f"{bad[0]} is not safetensors; vsraq never unpickles weights: re-save it.")
        self._where = {}
        for f in files:
            handle = self._guard(f, lambda f=f: safe_open(str(f), framework="pt"))
            self._where.update({k: (f, handle) for k in handle.keys()})  # noqa: SIM118 (no __iter__)

    @staticmethod
    def _guard(f, read):
        try:
            return read()
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"{f} is not a readable safetensors file ({exc}); the checkpoint is corrupt or truncated: re-create it."
            ) from exc

    def __getitem__(self, key: str) -> torch.Tensor:
        f, handle = self._where[key]
        return self._guard(f, lambda: handle.get_tensor(key))

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _open_weights(path: Path) -> SafetensorsFiles:
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        hint = f" (found pickled {pickles}: vsraq never unpickles weights)" if pickles else ""
        raise CheckpointError(f"{path} holds no *.safetensors weights{hint}; save the model with safetensors.")
    return SafetensorsFiles(files)


@dataclass
class QuantSlot:
    """One module a GPTQ checkpoint replaces: where it sits, its shape, and its candidate checkpoint names."""

    path: str  # dotted module path from the model root
    kind: str  # "linear" | "experts"
    keys: tuple[str, ...]  # linears: candidate checkpoint prefixes (original name first, then transformers 5)
    in_features: int = 0
    out_features: int = 0
    bias: bool = False
    experts: nn.Module | None = None  # the family's experts module (its implementation is reused)
    layer_index: int = 0


def quantized_slots(model: nn.Module) -> list[QuantSlot]:
    """Every module a GPTQ MoE checkpoint of this family quantizes, read from the unquantized model (its
    weights may be on the meta device)."""
    adapter = get_adapter(model)
    slots = []
    for layer in adapter.layers(model):
        prefix = f"model.layers.{layer.index}"
        for name, lin in _linear_targets(adapter, layer).items():
            full = f"{prefix}.{name}"
            keys = (_native_to_checkpoint(adapter, full), full)
            slots.append(QuantSlot(full, "linear", keys, lin.in_features, lin.out_features, lin.bias is not None))
        if layer.is_moe:
            path = f"{prefix}.mlp.{_child_name(layer.mlp, layer.experts)}"
            slots.append(QuantSlot(path, "experts", (), experts=layer.experts, layer_index=layer.index))
    return slots


class _TensorSource:
    """Checkpoint tensors by name; remembers which were used, so leftovers can be reported."""

    def __init__(self, tensors: dict[str, torch.Tensor], origin: str) -> None:
        self.tensors, self.origin, self.consumed = tensors, origin, set()

    def take(self, *keys: str) -> torch.Tensor:
        """The first of the candidate names present: the family's original name (what vsraq, vLLM and
        AutoGPTQ write), then the transformers-5 module name (what gptqmodel 7 writes)."""
        for key in keys:
            if key in self.tensors:
                self.consumed.add(key)
                return self.tensors[key]
        fused = [k for k in self.tensors if k.endswith((".experts.gate_up_proj", ".experts.down_proj"))]
        if ".experts." in keys[0] and fused:
            raise CheckpointError(
                f"{self.origin}: the experts are stored unquantized (fused 3D weights, e.g. {fused[0]!r}): the tool "
                "that wrote it skipped them (stock optimum GPTQ does on transformers 5). Re-quantize with "
                "quantizer='vsraq' (optimum/transformers) or `vsraq quantize`."
            )
        raise CheckpointError(
            f"{self.origin}: tensor {keys[0]!r} is missing; the checkpoint is incomplete or of another "
            "layout (expected per-expert GPTQ tensors under the family's names)."
        )


def build_quantized(slot: QuantSlot, source: _TensorSource, qcfg: dict, adapter: MoEAdapter, dtype) -> nn.Module:
    """The ``QuantLinear`` / ``QuantExperts`` for one slot, filled from the checkpoint tensors."""
    bits, group_size = int(qcfg["bits"]), int(qcfg["group_size"])
    if slot.kind == "linear":
        ql = QuantLinear(slot.in_features, slot.out_features, bits, group_size, bias=slot.bias, dtype=dtype)
        for buf in QUANT_SUFFIXES:
            getattr(ql, buf).copy_(source.take(*(f"{k}.{buf}" for k in slot.keys)))
        if slot.bias:
            ql.bias.copy_(source.take(*(f"{k}.bias" for k in slot.keys)))
        return ql
    i = slot.layer_index
    E = slot.experts.gate_up_proj.shape[0]
    dyn = qcfg.get("dynamic")
    widths = [  # the dynamic block may name experts in either layout
        dynamic_bits(dyn, _expert_key(adapter, i, e, "gate_proj", "transformers"),
                     dynamic_bits(dyn, adapter.expert_key(i, e, "gate_proj"), bits))
        for e in range(E)
    ]  # fmt: skip
    qe = QuantExperts(slot.experts, widths, group_size)
    for proj in EXPERT_PROJECTIONS:
        for e in range(E):
            keys = (  # original names (vsraq, vLLM); transformers-5 names (gptqmodel); the mix AutoRound writes
                adapter.expert_key(i, e, proj),
                f"model.layers.{i}.mlp.experts.{e}.{proj}",
                f"model.layers.{i}.{adapter.moe_block_key}.experts.{e}.{proj}",
            )
            tensors = (source.take(*(f"{k}.{b}" for k in keys)) for b in QUANT_SUFFIXES)
            qe.load_expert(proj, e, *tensors)
    return qe


def check_gptq_config(qcfg, origin: str) -> dict:
    """The checkpoint's ``quantization_config`` as a dict, checked to be GPTQ v1."""
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "gptq":
        raise CheckpointError(
            f"{origin} is not a GPTQ checkpoint (quantization_config.quant_method != 'gptq'); "
            "load it with transformers' from_pretrained instead."
        )
    fmt = qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq"
    if fmt != "gptq":
        raise CheckpointError(f"checkpoint_format={fmt!r} is not supported; vsraq reads GPTQ v1 ('gptq').")
    return qcfg


def quantized_routers(model: nn.Module, keys) -> dict[str, tuple[str, ...]]:
    """Router parameters a checkpoint stores as GPTQ tensors (``router_mode="quantize"``): parameter name ->
    the checkpoint prefixes found (original name first)."""
    adapter = get_adapter(model)
    out = {}
    for layer in adapter.moe_layers(model):
        rname = router_name(layer)
        found = tuple(k for k in (_native_to_checkpoint(adapter, rname), rname) if f"{k}.qweight" in keys)
        if found:
            out[f"{rname}.weight"] = found
    return out


def install_quantized(
    model: nn.Module, slots: list[QuantSlot], tensors: dict[str, torch.Tensor], qcfg: dict, origin: str, dtype
) -> tuple[set[str], set[str]]:
    """Put the checkpoint's quantized modules in place of ``slots`` and dequantize quantized routers into their
    weights; returns the tensor names used and the parameter names filled. Any quantized tensor (``qweight``...)
    left unused is an error: a module the loader would leave unquantized."""
    from .packing import dequantize_packed

    adapter = get_adapter(model)
    source = _TensorSource(tensors, origin)
    routers = quantized_routers(model, tensors.keys())
    with torch.no_grad():
        for slot in slots:
            _replace(model, slot.path, build_quantized(slot, source, qcfg, adapter, dtype))
        for param, keys in routers.items():
            weight = model.get_parameter(param)
            parts = [source.take(*(f"{k}.{b}" for k in keys)) for b in QUANT_SUFFIXES]
            out_f, in_f = weight.shape
            weight.copy_(dequantize_packed(*parts, int(qcfg["bits"]), in_f, out_f, torch.float32).to(weight.dtype))
    leftover = sorted(k for k in tensors if k not in source.consumed and k.rsplit(".", 1)[-1] in QUANT_SUFFIXES)
    if leftover:
        raise CheckpointError(
            f"{origin}: quantized tensors {leftover[:4]} belong to no module vsraq knows for this family; "
            "loading would leave those modules unquantized. The checkpoint does not match this model's layout."
        )
    return source.consumed, set(routers)


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a GPTQ v1 MoE checkpoint (ours, or any per-expert GPTQ checkpoint of a supported family) onto
    the transformers 5 model, with ``QuantLinear``/``QuantExperts`` in place of the quantized modules."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; it is not a saved model folder.")
    tensors = _open_weights(path)
    config = AutoConfig.from_pretrained(path)
    qcfg = check_gptq_config(getattr(config, "quantization_config", None), str(path))
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = get_adapter(model)
    consumed, filled = install_quantized(model, quantized_slots(model), tensors, qcfg, str(path), dtype)
    with torch.no_grad():
        rest = {}
        for name in model.state_dict():
            for key in (_native_to_checkpoint(adapter, name), name):
                if key in tensors and key not in consumed:
                    rest[name] = tensors[key]
                    consumed.add(key)
                    break
        model.load_state_dict(rest, strict=False)
    quant_names = {
        f"{mod_name}.{k}"
        for mod_name, mod in model.named_modules()
        if isinstance(mod, (QuantLinear, QuantExperts))
        for k in mod.state_dict()
    }
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [
        n
        for n in model.state_dict()
        if n not in quant_names and n not in rest and n not in filled and not (tied and n == "lm_head.weight")
    ]
    leftover = sorted(set(tensors) - consumed)
    if missing or leftover:
        raise CheckpointError(
            f"{path}: tensors missing from the checkpoint {missing[:5]} or not used {leftover[:5]}; "
            "it does not match this model family's layout."
        )
    if tied:
        model.tie_weights()
    return model.eval()


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    return next(n for n, m in parent.named_children() if m is child)


def _replace(root: nn.Module, dotted: str, new: nn.Module) -> None:
    *path, leaf = dotted.split(".")
    parent = root
    for p in path:
        parent = getattr(parent, p)
    setattr(parent, leaf, new)
