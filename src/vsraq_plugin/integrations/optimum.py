"""optimum: ``GPTQQuantizer(bits=..., dataset=..., quantizer="vsraq")`` runs the plugin.

Thin translation only. The hook gives ``GPTQQuantizer`` a ``__new__`` that returns a ``VsraqGPTQQuantizer``
(a subclass, so ``isinstance`` checks hold) when ``quantizer="vsraq"``; every other call is optimum's own.
``quantize_model`` quantizes experts included (stock optimum only finds ``nn.Linear`` and skips the fused 3D
experts of transformers 5) and ``save`` writes the plugin's GPTQ v1 checkpoint.
"""

from __future__ import annotations

from typing import Any

from optimum.gptq import quantizer as optimum_gptq

from .. import __version__
from ..api import GPTQ_FIELDS, config_from_gptq, quantize

METHOD = "vsraq"
GPTQQuantizer = optimum_gptq.GPTQQuantizer


class VsraqGPTQQuantizer(GPTQQuantizer):
    """optimum's ``GPTQQuantizer`` interface over ``vsraq_plugin.quantize``.

    GPTQ fields translate one to one (``bits``, ``group_size``, ``sym``, ``desc_act``, ``damp_percent``,
    ``true_sequential``); ``dataset`` is a list of texts, a text file or a ``datasets.Dataset``; ``vsraq``
    carries the plugin's own knobs (``QuantConfig`` names). Needs no gptqmodel.
    """

    def __init__(
        self,
        bits: int,
        dataset=None,
        group_size: int = 128,
        damp_percent: float = 0.1,
        desc_act: bool = False,
        sym: bool = True,
        true_sequential: bool = True,
        model_seqlen: int | None = None,
        batch_size: int = 1,
        quantizer: str = METHOD,
        vsraq: dict[str, Any] | None = None,
        meta: dict | None = None,
        format: str = "gptq",
        n_samples: int = 128,
        **kwargs,
    ) -> None:
        # Not GPTQQuantizer.__init__: it builds gptqmodel's QuantizeConfig. Same public attributes instead.
        if format.lower() != "gptq":
            raise ValueError(f"format={format!r}: quantizer='vsraq' writes GPTQ v1 checkpoints only; use 'gptq'.")
        self.bits, self.dataset, self.group_size = bits, dataset, group_size
        self.damp_percent, self.desc_act, self.sym = damp_percent, desc_act, sym
        self.true_sequential, self.model_seqlen, self.batch_size = true_sequential, model_seqlen, batch_size
        self.act_group_aware = False
        self.quantizer, self.vsraq, self.meta, self.format = quantizer, dict(vsraq or {}), meta, "gptq"
        self.n_samples = n_samples
        self.quant_method = optimum_gptq.QuantizationMethod.GPTQ
        self.modules_in_block_to_quantize = None
        self.serialization_keys = [
            "bits",
            "dataset",
            "group_size",
            "damp_percent",
            "desc_act",
            "sym",
            "true_sequential",
            "quant_method",
            "format",
            "meta",
            "quantizer",
            "vsraq",
        ]
        self.quant_config = config_from_gptq({k: getattr(self, k, None) for k in GPTQ_FIELDS}, self.vsraq)
        self._result = None
        self._tokenizer = None

    def to_dict(self) -> dict[str, Any]:
        out = {key: getattr(self, key) for key in self.serialization_keys}
        out["meta"] = dict(out["meta"] or {})
        out["meta"].setdefault("quantizer", [f"vsraq:{__version__}"])
        return out

    def quantize_model(self, model, tokenizer=None):
        """Quantize ``model`` in place with the plugin (experts included); it then computes with the
        dequantized weights, and ``save`` writes the packed GPTQ v1 checkpoint."""
        if self.dataset is None:
            raise ValueError("GPTQQuantizer(quantizer='vsraq') needs dataset=[...texts] (or a text file).")
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self._tokenizer = tokenizer
        _, self._result = quantize(
            model,
            self.dataset,
            self.quant_config,
            tokenizer=tokenizer,
            seq_len=self.model_seqlen or 256,
            n_samples=self.n_samples,
            batch_size=max(int(self.batch_size), 1),
        )
        return model

    def save(self, model, save_dir: str, max_shard_size: str = "10GB", safe_serialization: bool = True) -> None:
        """Write the GPTQ v1 checkpoint (atomically; an existing folder is replaced, as optimum's save does)."""
        from ..checkpoint import save_checkpoint

        if not safe_serialization:
            raise ValueError("safe_serialization=False would pickle the weights; vsraq writes safetensors only.")
        if self._result is None:
            raise ValueError("nothing to save: call quantize_model(model, tokenizer) first.")
        save_checkpoint(model, self._result, save_dir, tokenizer=self._tokenizer, overwrite=True)


def install() -> None:
    """Route ``GPTQQuantizer(..., quantizer="vsraq")`` to ``VsraqGPTQQuantizer`` (idempotent)."""
    if getattr(GPTQQuantizer.__new__, "_vsraq_hook", False):
        return

    def __new__(cls, *args, **kwargs):
        if cls is GPTQQuantizer and kwargs.get("quantizer") == METHOD:
            cls = VsraqGPTQQuantizer
        return object.__new__(cls)

    __new__._vsraq_hook = True
    GPTQQuantizer.__new__ = __new__
    stock_init = GPTQQuantizer.__init__
    if not getattr(stock_init, "_vsraq_hook", False):

        def __init__(self, *args, quantizer: str | None = None, **kwargs):
            if quantizer not in (None, "gptq"):
                raise ValueError(f"quantizer={quantizer!r} is unknown; use 'gptq' (stock) or 'vsraq'.")
            stock_init(self, *args, **kwargs)

        __init__._vsraq_hook = True
        GPTQQuantizer.__init__ = __init__
