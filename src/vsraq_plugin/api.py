"""The native entry point: ``vsraq_plugin.quantize(model_or_path, calib=..., config=..., out=...)``.

Every integration (optimum, transformers, the CLI) translates its arguments to this call, so one quantized
model is the same bytes whichever door it came through.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, QuantConfig
from .pipeline import QuantizationResult, calibration_windows, quantize_model

# GPTQConfig / GPTQQuantizer fields that map one to one onto QuantConfig.
GPTQ_FIELDS = ("bits", "group_size", "sym", "desc_act", "damp_percent", "true_sequential", "static_groups")


def config_from_gptq(fields: dict, knobs: dict | None = None) -> QuantConfig:
    """A ``QuantConfig`` (method ``vsraq``) from a GPTQ config's fields plus the plugin's own knobs."""
    settings = {k: fields[k] for k in GPTQ_FIELDS if fields.get(k) is not None}
    settings.update(knobs or {})
    settings.setdefault("method", "vsraq")
    unknown = sorted(set(settings) - set(QuantConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown vsraq settings {unknown}; see QuantConfig for the valid names.")
    return QuantConfig(**settings)


def quantize(
    model: nn.Module | str | Path,
    calib,
    config: QuantConfig | None = None,
    *,
    out: str | Path | None = None,
    tokenizer=None,
    seq_len: int = 256,
    n_samples: int = 128,
    batch_size: int = 8,
    progress: bool = True,
    work_dir: str | Path | None = None,
    overwrite: bool = False,
) -> tuple[nn.Module, QuantizationResult]:
    """Quantize a causal LM (an ``nn.Module`` or a model folder) with VSRAQ (or ``config.method``).

    ``calib``: a text file, a list of texts, a ``datasets.Dataset`` with a ``text`` column, or token windows.
    The model is quantized in place (it then computes with the dequantized weights); with ``out`` the GPTQ
    v1 checkpoint is written there atomically. Returns the model and the result (codes, grids, summary).
    """
    config = config or QuantConfig()
    if isinstance(model, (str, Path)):
        from .cli import CLIError, load_model, load_tokenizer

        try:
            tokenizer = tokenizer or load_tokenizer(model)
            model = load_model(model)
        except CLIError as exc:
            raise ValueError(str(exc)) from exc
    windows = None
    if config.method != "rtn":
        windows = calibration_windows(tokenizer, calib, seq_len, n_samples)
    with torch.no_grad():
        result = quantize_model(model, windows, config, batch_size=batch_size, progress=progress, work_dir=work_dir)
    if out is not None:
        from .checkpoint import save_checkpoint

        save_checkpoint(model, result, out, tokenizer=tokenizer, overwrite=overwrite)
    return model, result


def load(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A GPTQ v1 (MoE) checkpoint as a transformers model with the plugin's quantized modules."""
    from .checkpoint import load_checkpoint

    return load_checkpoint(path, dtype)
