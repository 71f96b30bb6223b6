"""Checks of what a run is given, made before the long work starts (issue #17).

Every entry point (the CLI, ``vsraq_plugin.quantize`` / ``load``, ``quantize_model`` / ``quantize_folder`` at their
very start, the integrations through them) calls these, so a bad input is refused in one line that names the problem
and the fix, and nothing is written. ``InputError`` is the base of every such error of the package
(``ConfigError``, ``CalibrationError``, ``CheckpointError``, ``ModelSourceError``, ``UnsupportedModelError``,
``CLIError``): the command line prints them as one line with exit status 2.

This module imports no torch or transformers at import time (``config.py`` imports it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class InputError(ValueError):
    """Something a run was given cannot drive it; the message names the problem and the fix."""


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------- numbers
def positive_int(value, name: str, hint: str = "", minimum: int = 1, error: type[Exception] = InputError) -> int:
    """``value`` when it is an int >= ``minimum``; else ``error`` naming ``name`` (a CLI flag or a keyword)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        shown = f"{name} {value}" if name.startswith("--") else f"{name}={value!r}"
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise error(f"{shown} must be {what}" + (f" ({hint})" if hint else "") + ".")
    return value


# ---------------------------------------------------------------------------------------------- files
def read_text(path: str | os.PathLike, what: str, error: type[Exception] = InputError) -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or non-UTF-8 file is ``error`` naming ``what``."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} {path} does not exist; pass a UTF-8 text file.")
    if path.is_dir():
        raise error(f"{what} {path} is a folder; pass a UTF-8 text file.")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror}); check its permissions.") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise error(
            f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); convert it to UTF-8, "
            f"e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}"
        ) from exc


def check_model_dir(path: str | os.PathLike, what: str = "model folder", error: type[Exception] = InputError) -> dict:
    """The parsed ``config.json`` of a model folder: the folder exists, holds a ``config.json`` that is JSON with a
    ``model_type`` transformers knows. (Weights and tokenizer are checked by their readers.)"""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} {path} does not exist; pass a folder saved by save_pretrained.")
    if not path.is_dir():
        raise error(f"{what} {path} is a file, not a folder; pass the folder saved by save_pretrained.")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise error(f"{path} is not a model directory (no config.json); pass a folder saved by save_pretrained.")
    text = read_text(cfg, "the model config", error)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(
            f"{cfg} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); restore it from the "
            "original model."
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise error(f"{cfg} has no model_type, so it is not a transformers model config; restore it from the original.")
    from transformers import CONFIG_MAPPING, __version__

    if data["model_type"] not in CONFIG_MAPPING:
        raise error(
            f"{cfg}: model_type {data['model_type']!r} is unknown to transformers {__version__}; upgrade transformers "
            "or fix config.json."
        )
    return data


def has_tokenizer_files(path: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
    return any((path / n).is_file() for n in names)


def check_output_dir(out: str | os.PathLike, overwrite: bool, flag: str = "out", error=InputError) -> Path:
    """``out`` can receive a new folder: it is not a file, it is empty (or ``overwrite``), and the nearest existing
    folder above it is writable."""
    out = Path(out)
    name = f"{flag} {out}" if flag.startswith("--") else f"{flag}={str(out)!r}"
    if out.exists() and not out.is_dir():
        raise error(f"{name} is a file; pass a folder path (the folder is created).")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        fix = "--overwrite" if flag.startswith("--") else "overwrite=True"
        raise error(f"{name} exists and is not empty; choose another folder or pass {fix}.")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise error(f"{name} cannot be created: {parent} is a file; pick another folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"{name} cannot be created: {parent} is not writable; pick a writable folder.")
    return out


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def check_paths(model: Path, out: Path, work_dir: Path | None, names=("out", "work_dir"), error=InputError) -> None:
    """Refuse outputs that would destroy inputs: ``out`` equal to (or holding) the model folder; a work dir inside
    ``out`` (replaced when the checkpoint is renamed into place) or equal to the model folder (its layer files would
    be read as weights)."""
    out_name, work_name = names
    if _inside(Path(model), Path(out)):
        raise error(
            f"{out_name} {out} is the model folder (or holds it): writing there would replace the model; choose "
            "another folder."
        )
    if work_dir is not None:
        if _inside(Path(work_dir), Path(out)):
            raise error(
                f"{work_name} {work_dir} lies inside {out_name} {out}, which is replaced when the checkpoint is "
                "renamed into place; keep it outside."
            )
        if Path(work_dir).resolve() == Path(model).resolve():
            raise error(f"{work_name} {work_dir} is the model folder; give the run's state its own folder.")


# ---------------------------------------------------------------------------------------------- tensors
# Elements per float64 reduction of ``nonfinite_count``: ``sum(dtype=float64)`` makes a float64 copy of what it
# sums, so one reduction over DeepSeek-V3's fused gate/up experts (7.5e9 elements) would hold 60 GB at once.
NONFINITE_CHUNK = 1 << 24


def nonfinite_count(t) -> int:
    """Number of NaN/Inf elements of a floating tensor (0 for any other dtype); cheap when there are none: float64
    sums of slices (no overflow from large finite values), added on the tensor's device, read once."""
    import torch

    if not t.is_floating_point() or t.numel() == 0:
        return 0
    slices = t.detach().reshape(-1).split(NONFINITE_CHUNK)  # views
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    for s in slices:
        total += s.sum(dtype=torch.float64)
    if bool(torch.isfinite(total)):
        return 0
    return sum(int((~torch.isfinite(s)).sum()) for s in slices)


def check_finite(tensors, what: str, fix: str, error: type[Exception] = InputError) -> None:
    """Every floating tensor of ``tensors`` ((name, tensor) pairs) is finite; else ``error`` naming the first bad."""
    for name, t in tensors:
        n = nonfinite_count(t)
        if n:
            raise error(f"{what}: {name} holds {n} NaN/Inf value(s); {fix}")


def check_finite_model(model, what: str = "the model", error: type[Exception] = InputError) -> None:
    """Every parameter and buffer of an in-memory model is finite (one float64 reduction per tensor)."""
    check_finite(
        [*model.named_parameters(), *model.named_buffers()],
        what,
        "the weights are damaged: re-download or re-export the model.",
        error,
    )


def check_windows(windows, vocab_size: int | None) -> None:
    """Calibration windows, when given as a non-empty ``(n, seq_len)`` tensor, hold token ids of this model's
    vocabulary. (Missing or empty windows are refused by the pipeline's own check, which names the method.)"""
    import torch

    if windows is None:
        return
    if not isinstance(windows, torch.Tensor):
        raise InputError(
            f"calibration windows must be a (n, seq_len) tensor of token ids; got {type(windows).__name__} "
            "(build them with calibration_windows)."
        )
    if windows.dim() != 2 or windows.numel() == 0:
        return
    if windows.is_floating_point() or windows.is_complex() or windows.dtype == torch.bool:
        raise InputError(f"calibration windows must hold integer token ids; got dtype {windows.dtype}.")
    lo, hi = int(windows.min()), int(windows.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        raise InputError(
            f"the calibration windows hold token ids from {lo} to {hi}, but the model's vocabulary has {vocab_size} "
            "entries: the tokenizer does not belong to this model; use the model's own tokenizer."
        )


def _check_config(config) -> None:
    from .config import ConfigError, QuantConfig

    if not isinstance(config, QuantConfig):
        raise ConfigError(
            f"config must be a QuantConfig; got {type(config).__name__} (use QuantConfig(**settings) or "
            "QuantConfig.from_dict)."
        )
    config.validate()  # fields may have been changed after construction


def check_routing(model_config: dict, method: str | None = None) -> None:
    """A MoE config that asks for more experts per token than it has is refused before any work; so is VSRAQ on
    one that routes every token to every expert (no routing decision to keep: VSRAQ's terms need a best
    non-chosen expert, DESIGN 3.2)."""
    cfg = model_config.get("text_config") or model_config
    k = cfg.get("num_experts_per_tok")
    n = next((cfg[key] for key in ("num_local_experts", "n_routed_experts", "num_experts") if cfg.get(key)), None)
    if isinstance(k, int) and isinstance(n, int) and k > n:
        raise InputError(
            f"the model's config routes each token to num_experts_per_tok={k} experts, but it has only {n}: the "
            f"config is inconsistent; set num_experts_per_tok to at most {n} in config.json."
        )
    if method == "vsraq" and isinstance(k, int) and k == n:
        raise InputError(
            f"the model routes every token to all {n} of its experts (num_experts_per_tok={k}): there is no "
            "routing decision for VSRAQ to keep; quantize it with method='gptq' (--method gptq)."
        )


def check_quantize_model(model, windows, config, batch_size: int) -> None:
    """``quantize_model``'s inputs, before any work: settings, a supported model whose weights are all finite,
    and token ids that fit its vocabulary."""
    from torch import nn

    from .models import get_adapter

    _check_config(config)
    positive_int(batch_size, "batch_size", "windows per forward pass, e.g. 8")
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise InputError(
            f"model must be a transformers causal LM (an nn.Module with .config); got {type(model).__name__}."
        )
    check_routing(model.config.to_dict(), config.method)
    adapter = get_adapter(model)
    adapter.decoder_layers(model)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    check_windows(windows, getattr(emb, "num_embeddings", None))
    check_finite_model(model, "the model")


def check_quantize_folder(path, windows, config, out, batch_size: int, work_dir=None) -> None:
    """``quantize_folder``'s inputs, before any work: settings, a model folder with a readable config, an output
    that destroys no input, and token ids that fit the model's vocabulary. (The weights are checked for NaN/Inf as
    each layer is read.)"""
    _check_config(config)
    positive_int(batch_size, "batch_size", "windows per forward pass, e.g. 8")
    data = check_model_dir(path)
    check_routing(data, config.method)
    check_paths(Path(path), Path(out), None if work_dir is None else Path(work_dir))
    vocab = data.get("vocab_size") or (data.get("text_config") or {}).get("vocab_size")
    check_windows(windows, vocab if isinstance(vocab, int) else None)


# ---------------------------------------------------------------------------------------------- checkpoints
def check_gptq_tensors(
    origin: str,
    key: str,
    tensors: dict,
    in_features: int,
    out_features: int,
    bits: int,
    group_size: int,
    error: type[Exception] = InputError,
) -> None:
    """The GPTQ v1 tensors of one linear (``qweight``, ``qzeros``, ``scales``, ``g_idx``) have the shapes the
    checkpoint's ``quantization_config`` implies (qweight rows = in * bits / 32, scales rows = in / group_size), a
    ``g_idx`` inside the groups and finite scales. A mismatch means the config does not describe the tensors."""
    from .packing import packed_rows

    groups = 1 if group_size == -1 else in_features // group_size
    want = {
        "qweight": (packed_rows(in_features, bits), out_features),
        "qzeros": (groups, packed_rows(out_features, bits)),
        "scales": (groups, out_features),
        "g_idx": (in_features,),
    }
    for name, shape in want.items():
        got = tuple(tensors[name].shape)
        if got == shape:
            continue
        rows = tensors["qweight"].shape[0] if tensors["qweight"].dim() == 2 else None
        srows = tensors["scales"].shape[0] if tensors["scales"].dim() == 2 else None
        seen = []
        if rows:
            seen.append(f"bits={rows * 32 / in_features:g}")
        if srows:
            seen.append(f"group_size={in_features / srows:g}" if srows > 1 else "group_size=-1")
        looks = f" (the tensors look like {', '.join(seen)})" if seen else ""
        raise error(
            f"{origin}: {key}.{name} has shape {got} but quantization_config (bits={bits}, group_size={group_size}) "
            f"needs {shape} for this {out_features}x{in_features} layer{looks}; config.json does not match the "
            "weights: restore the config.json written with them."
        )
    g_idx = tensors["g_idx"]
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise error(
            f"{origin}: {key}.g_idx points at group {int(g_idx.max())} but group_size={group_size} gives {groups} "
            "group(s); config.json does not match the weights: restore the config.json written with them."
        )
    n = nonfinite_count(tensors["scales"])
    if n:
        raise error(f"{origin}: {key}.scales holds {n} NaN/Inf value(s); the checkpoint is damaged: re-create it.")
