"""transformers 5: ``GPTQConfig(..., quantizer="vsraq")``, the registered ``"vsraq"`` method, GPTQ MoE loading.

Thin translation only: quantizing calls ``vsraq_plugin.quantize``; loading calls ``checkpoint.install_quantized``;
saving writes ``checkpoint.checkpoint_tensors``. The hooks (installed once by ``install()``):

* ``GPTQConfig`` keeps ``quantizer`` and ``dynamic`` (stock transformers drops unknown keys), through
  ``to_dict`` / ``from_dict``.
* ``AutoHfQuantizer.from_config`` hands a GPTQ config to ``GptqMoEHfQuantizer`` when it asks for ``vsraq``
  or loads a pre-quantized checkpoint: that quantizer serves MoE families the plugin knows (and checkpoints
  it wrote) and delegates everything else to transformers' own ``GptqHfQuantizer``.
* ``register_quantization_config("vsraq")`` / ``register_quantizer("vsraq")``: ``VsraqConfig`` with every knob.
* ``ExpertsInterface`` gains ``"vsraq"``: ``experts_implementation="vsraq"`` runs ``QuantExperts`` on the fused
  MoE Triton kernel (CUDA).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface
from transformers.quantizers import auto as hf_auto
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizer_gptq import GptqHfQuantizer
from transformers.utils.quantization_config import GPTQConfig, QuantizationConfigMixin

from ..api import config_from_gptq, quantize
from ..checkpoint import (
    QUANT_SUFFIXES,
    CheckpointError,
    QuantSlot,
    SafetensorsFiles,
    check_gptq_config,
    checkpoint_tensors,
    install_quantized,
    placement_of,
    quantization_config,
    quantized_routers,
    quantized_slots,
    quantized_state_dict,
)
from ..config import QuantConfig
from ..models import ADAPTERS, get_adapter, set_module
from ..models import _is_moe as is_moe_config
from ..nn.experts import EXPERTS_IMPLEMENTATION, vsraq_experts_forward

METHOD = "vsraq"


class VsraqConfig(QuantizationConfigMixin):
    """``quant_method="vsraq"``: GPTQ-style fields, calibration settings and every ``QuantConfig`` knob.

    ``from_pretrained(path, quantization_config=VsraqConfig(bits=4, dataset=texts, tokenizer=tok))``
    quantizes with the plugin; the saved checkpoint is plain GPTQ v1 (``quant_method="gptq"``).
    """

    def __init__(
        self,
        bits: int = 4,
        dataset=None,
        tokenizer=None,
        group_size: int = 128,
        seq_len: int = 256,
        n_samples: int = 128,
        batch_size: int = 8,
        **knobs,
    ) -> None:
        self.quant_method = METHOD
        self.bits, self.group_size = bits, group_size
        self.dataset, self.tokenizer = dataset, tokenizer
        self.seq_len, self.n_samples, self.batch_size = seq_len, n_samples, batch_size
        self.knobs = knobs
        self.quant_config()  # validate now, with QuantConfig's errors

    def quant_config(self) -> QuantConfig:
        return config_from_gptq({"bits": self.bits, "group_size": self.group_size}, self.knobs)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("knobs", "tokenizer")}
        out.update(self.knobs)
        return out


class GPTQCheckpointConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a checkpoint the plugin wrote, serialised verbatim (GPTQ v1)."""

    def __init__(self, block: dict) -> None:
        self.block = block
        self.quant_method = block["quant_method"]

    def to_dict(self) -> dict:
        return dict(self.block)


class _Pending(nn.Module):
    """Holds a quantized module's place while transformers loads the other weights (it has no state)."""


def _quantizer_tags(qc) -> list[str]:
    meta = getattr(qc, "meta", None) or {}
    return [str(t) for t in (meta.get("quantizer") or [])]


def owns_checkpoint(config, qc) -> bool:
    """Whether the plugin loads this pre-quantized GPTQ model: checkpoints it wrote and MoE families it knows.

    A GPTQ MoE of any other family raises: transformers would load it with random or unquantized experts."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(t.startswith(f"{METHOD}:") for t in _quantizer_tags(qc)):
        return True
    if getattr(text, "model_type", None) in ADAPTERS:
        return True
    if is_moe_config(text):
        raise ValueError(
            f"this GPTQ checkpoint is a mixture of experts of type {text.model_type!r}, which vsraq-plugin has no "
            f"adapter for (supported: {sorted(ADAPTERS)}); transformers would load its experts unquantized or "
            "randomly initialised. Add an adapter in vsraq_plugin/models/, or load it with a tool that supports it."
        )
    return False


class _PluginQuantizer:
    """The plugin's side of an ``HfQuantizer``: quantize after loading, or rebuild a GPTQ checkpoint's modules.

    ``_plugin``: True = the plugin serves this model; False = delegate to the next class (stock GPTQ);
    None = not decided yet (pre-quantized GPTQ: decided from the model config).
    """

    _plugin: bool | None = True

    def _init_plugin(self) -> None:
        self._env = None
        self._result = None
        self._slots: list[QuantSlot] | None = None
        self._files: list[str] | None = None
        self._tensors: SafetensorsFiles | None = None

    # ------------------------------------------------------------------ environment
    def validate_environment(self, *args, **kwargs):
        if self._plugin is None:
            self._env = (args, kwargs)  # the stock check needs gptqmodel; run it only if stock GPTQ serves
            return None
        return None if self._plugin else super().validate_environment(*args, **kwargs)

    def update_device_map(self, device_map):
        if self._plugin is False:
            return super().update_device_map(device_map)
        return {"": torch.device("cpu")} if device_map is None else device_map

    def update_attn_implementation(self, config):
        if self._plugin is None:
            self._plugin = owns_checkpoint(config, self.quantization_config)
            if not self._plugin:
                GptqHfQuantizer.__init__(self, self.quantization_config, pre_quantized=self.pre_quantized)
                args, kwargs = self._env or ((), {})
                GptqHfQuantizer.validate_environment(self, *args, **kwargs)
        return super().update_attn_implementation(config)

    def update_dtype(self, dtype):
        if not self._plugin:
            return super().update_dtype(dtype)
        # Quantizing keeps the dtype the user asked for: each layer is solved in float32 on its turn (pipeline),
        # so a bf16 model is never held whole in float32.
        return dtype

    # ------------------------------------------------------------------ model
    def _process_model_before_weight_loading(self, model, **kwargs):
        if not self._plugin:
            return super()._process_model_before_weight_loading(model, **kwargs)
        if not self.pre_quantized:
            return model
        self._files = [str(f) for f in (kwargs.get("checkpoint_files") or [])]
        # Linears a "-:" dynamic pattern left unquantized load as the 16-bit linears they are.
        self._block = self._saved_block()
        self._slots = [s for s in quantized_slots(model) if s.rule(self._block.get("dynamic")) is not False]
        patterns = {rf"\.({'|'.join(QUANT_SUFFIXES)})$"}
        # Quantized routers (router_mode="quantize") are dequantized into their weight after loading.
        self._tensors = SafetensorsFiles(self._files) if self._files else None
        routers = quantized_routers(model, self._tensors.keys()) if self._tensors is not None else {}
        missing = {rf"^{re.escape(name)}$" for name in routers}
        model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | missing
        for slot in self._slots:
            set_module(model, slot.path, _Pending())
            if slot.bias:
                patterns |= {rf"^{re.escape(k)}\.bias$" for k in slot.keys}
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | patterns
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self._plugin:
            return super()._process_model_after_weight_loading(model, **kwargs)
        if self.pre_quantized:
            return self._install(model)
        return self._quantize(model)

    def _saved_block(self) -> dict:
        """The ``quantization_config`` block as the checkpoint wrote it (GPTQConfig adds its own defaults), so a
        re-save is faithful; the loaded config's when the folder has no config.json."""
        saved = Path(self._files[0]).parent / "config.json" if self._files else None
        block = json.loads(saved.read_text()).get("quantization_config") if saved and saved.is_file() else None
        return block or self.quantization_config.to_dict()

    def _install(self, model):
        if self._tensors is None:
            raise CheckpointError("the GPTQ checkpoint has no weight files to read the quantized tensors from.")
        folder = Path(self._files[0]).parent
        block = check_gptq_config(self._block, str(folder))
        emb = model.get_input_embeddings().weight
        # Each quantized module goes where the user's device_map puts it (transformers keeps the map it used).
        dmap = getattr(model, "hf_device_map", None) or {"": emb.device}
        install_quantized(model, self._slots, self._tensors, block, str(folder), emb.dtype, placement_of(dmap))
        model.config.quantization_config = GPTQCheckpointConfig(block)
        return model

    def _quantize(self, model):
        qc = self.quantization_config
        if isinstance(qc, VsraqConfig):
            cfg, seq_len, n_samples, batch = qc.quant_config(), qc.seq_len, qc.n_samples, qc.batch_size
        else:
            cfg = config_from_gptq(qc.to_dict(), getattr(qc, "vsraq", None))
            seq_len, n_samples, batch = qc.model_seqlen or 256, 128, max(int(qc.batch_size or 1), 1)
        if qc.dataset is None or (isinstance(qc.dataset, str) and not Path(qc.dataset).is_file()):
            raise ValueError(
                f"quantizer='vsraq' needs calibration texts it can read offline: dataset={qc.dataset!r} is not a "
                "list of texts or a text file. Pass dataset=[...texts] (or a datasets.Dataset with a 'text' column)."
            )
        tokenizer = qc.tokenizer or model.name_or_path
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        _, self._result = quantize(
            model, qc.dataset, cfg, tokenizer=tokenizer, seq_len=seq_len, n_samples=n_samples, batch_size=batch
        )
        block = quantization_config(cfg, self._result.summary, get_adapter(model))
        model.config.quantization_config = GPTQCheckpointConfig(block)
        return model

    # ------------------------------------------------------------------ saving
    def get_state_dict_and_metadata(self, model):
        if not self._plugin:
            return super().get_state_dict_and_metadata(model)
        tensors = checkpoint_tensors(model, self._result) if self._result is not None else quantized_state_dict(model)
        return tensors, {}

    def is_serializable(self):
        return True if self._plugin else super().is_serializable()

    @property
    def is_trainable(self) -> bool:
        return False if self._plugin else GptqHfQuantizer.is_trainable.fget(self)


class VsraqHfQuantizer(_PluginQuantizer, HfQuantizer):
    """``quant_method="vsraq"``: quantizes with the plugin when the model is loaded."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs) -> None:
        HfQuantizer.__init__(self, quantization_config, **kwargs)
        self._init_plugin()
        self._plugin = True


class GptqMoEHfQuantizer(_PluginQuantizer, GptqHfQuantizer):
    """A GPTQ config routed to the plugin: ``quantizer="vsraq"``, or a pre-quantized checkpoint of a MoE family
    the plugin knows (or that it wrote). Anything else falls through to transformers' ``GptqHfQuantizer``."""

    def __init__(self, quantization_config, **kwargs) -> None:
        # Not GptqHfQuantizer.__init__: it builds optimum's quantizer, which needs gptqmodel; stock GPTQ gets
        # that only when it turns out to serve the model (update_attn_implementation).
        HfQuantizer.__init__(self, quantization_config, **kwargs)
        self._init_plugin()
        self._plugin = True if not self.pre_quantized else None


# ---------------------------------------------------------------------------------------------- hooks
def _wants_plugin(qc, kwargs: dict) -> bool:
    if type(qc) is not GPTQConfig:  # AwqConfig and other subclasses keep their own path
        return False
    return getattr(qc, "quantizer", None) == METHOD or kwargs.get("pre_quantized", True)


def install() -> None:
    """Install the transformers hooks (idempotent)."""
    if getattr(GPTQConfig.__init__, "_vsraq_hook", False):
        return
    stock_init = GPTQConfig.__init__

    def gptq_init(self, *args, quantizer: str | None = None, dynamic: dict | None = None, vsraq=None, **kwargs):
        stock_init(self, *args, **kwargs)
        if quantizer is not None:
            if quantizer not in ("gptq", METHOD):
                raise ValueError(f"quantizer={quantizer!r} is unknown; use 'gptq' (stock) or 'vsraq'.")
            self.quantizer = quantizer
        if dynamic:
            self.dynamic = dynamic
        if vsraq:
            self.vsraq = dict(vsraq)
            config_from_gptq({"bits": self.bits}, self.vsraq)  # validate the knobs now

    gptq_init._vsraq_hook = True
    gptq_init.__doc__ = stock_init.__doc__
    GPTQConfig.__init__ = gptq_init

    stock_from_config = hf_auto.AutoHfQuantizer.from_config.__func__

    def from_config(cls, quantization_config, **kwargs):
        qc = quantization_config
        if isinstance(qc, dict):
            qc = hf_auto.AutoQuantizationConfig.from_dict(qc)
        if _wants_plugin(qc, kwargs):
            return GptqMoEHfQuantizer(qc, **kwargs)
        return stock_from_config(cls, qc, **kwargs)

    hf_auto.AutoHfQuantizer.from_config = classmethod(from_config)
    if EXPERTS_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(EXPERTS_IMPLEMENTATION, vsraq_experts_forward)
    if METHOD not in hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        hf_auto.register_quantization_config(METHOD)(VsraqConfig)
    if METHOD not in hf_auto.AUTO_QUANTIZER_MAPPING:
        hf_auto.register_quantizer(METHOD)(VsraqHfQuantizer)
