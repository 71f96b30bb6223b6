"""The native entry point: ``vsraq_plugin.quantize(model_or_path, calib=..., config=..., out=...)``.

Every integration (optimum, transformers, the CLI) translates its arguments to this call, so one quantized
model is the same bytes whichever door it came through.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, QuantConfig
from .pipeline import QuantizationResult, calibration_windows, quantize_folder, quantize_model
from .validation import InputError, check_model_dir, check_output_dir, check_paths, positive_int

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
    key_layout: str = "original",
    max_shard_size: str | int = "5GB",
) -> tuple[nn.Module | None, QuantizationResult]:
    """Quantize a causal LM (an ``nn.Module`` or a model folder) with VSRAQ (or ``config.method``).

    ``calib``: a text file, a list of texts, a ``datasets.Dataset`` with a ``text`` column, or token windows.
    A model folder is streamed layer by layer (never materialised whole; ``config.device`` runs the solve) and
    its checkpoint written to ``out`` as it goes: returns ``(None, result)``; load the result with
    ``vsraq_plugin.load(out)``. An ``nn.Module`` is quantized in place (it then computes with the dequantized
    weights; its layers visit ``config.device`` one at a time) and, with ``out``, saved there: returns the
    model and the result (codes, grids, summary). Checkpoints are written atomically.
    """
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig; got {type(config).__name__} (use QuantConfig(**settings)).")
    positive_int(seq_len, "seq_len", "tokens per calibration window, e.g. 256")
    positive_int(n_samples, "n_samples", "the number of calibration windows, e.g. 128")
    positive_int(batch_size, "batch_size", "windows per forward pass, e.g. 8")
    if out is not None:
        check_output_dir(out, overwrite, "out")
    if isinstance(model, (str, Path)):
        from .cli import load_tokenizer

        if out is None:
            raise InputError(
                f"quantizing the model folder {model} streams it layer by layer and writes the checkpoint as it goes: "
                "pass out=... (or load the model yourself and pass the nn.Module)."
            )
        check_model_dir(model)
        check_paths(Path(model), Path(out), None if work_dir is None else Path(work_dir))
        tokenizer = tokenizer or load_tokenizer(model)
        windows = None if config.method == "rtn" else calibration_windows(tokenizer, calib, seq_len, n_samples)
        result = quantize_folder(
            model, windows, config, out, tokenizer=tokenizer, batch_size=batch_size, progress=progress,
            work_dir=work_dir, key_layout=key_layout, overwrite=overwrite, max_shard_size=max_shard_size,
        )  # fmt: skip
        return None, result
    windows = None
    if config.method != "rtn":
        windows = calibration_windows(tokenizer, calib, seq_len, n_samples)
    with torch.no_grad():
        result = quantize_model(model, windows, config, batch_size=batch_size, progress=progress, work_dir=work_dir)
    if out is not None:
        from .checkpoint import save_checkpoint

        save_checkpoint(
            model, result, out, tokenizer=tokenizer, overwrite=overwrite, key_layout=key_layout,
            max_shard_size=max_shard_size,
        )  # fmt: skip
    return model, result


def load(path: str | Path, dtype: torch.dtype | str = torch.float32, device_map="cpu") -> nn.Module:
    """A GPTQ v1 (MoE) checkpoint as a transformers model with the plugin's quantized modules, built module by
    module on ``device_map`` (a device, ``"auto"`` or a dict of module prefixes) in ``dtype`` (``"auto"``: the
    checkpoint's own dtype)."""
    from .checkpoint import load_checkpoint

    return load_checkpoint(path, dtype, device_map)
