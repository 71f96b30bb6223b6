"""Calibration data: texts, ``datasets`` or token tensors to the ``(n, seq_len)`` windows the pipeline runs."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .text import cut_windows, split_documents, token_stream
from .validation import InputError, positive_int, read_text


class CalibrationError(InputError):
    """The calibration data cannot drive a quantization run; the message says how to fix it."""


def calibration_windows(
    tokenizer, calib, seq_len: int = 256, n_samples: int = 128, *, exact: bool = False
) -> torch.Tensor:
    """Token windows ``(n, seq_len)`` from a text file path, a list of texts, a ``datasets.Dataset`` with a
    ``text`` column, or token tensors (``(n, seq_len)`` or a list of 1-D tensors): at most ``n_samples`` of them,
    exactly ``n_samples`` with ``exact`` (fewer is then an error that says how many the data hold)."""
    positive_int(seq_len, "seq_len", "tokens per calibration window, e.g. 256", error=CalibrationError)
    positive_int(n_samples, "n_samples", "the number of calibration windows, e.g. 128", error=CalibrationError)
    if isinstance(calib, torch.Tensor) or (
        isinstance(calib, (list, tuple)) and calib and all(isinstance(t, torch.Tensor) for t in calib)
    ):
        ids = torch.cat([t.reshape(-1) for t in (calib if not isinstance(calib, torch.Tensor) else [calib])])
        ids = ids.long()
    else:
        texts = _calibration_texts(calib)
        if tokenizer is None:
            raise CalibrationError("texts need a tokenizer; pass tokenizer=... or token tensors.")
        ids = token_stream(tokenizer, texts)
    windows = cut_windows(ids, seq_len, n_samples)
    if windows.shape[0] == 0:
        raise CalibrationError(
            f"the calibration data hold {ids.numel()} tokens, fewer than one window of {seq_len}; pass more or "
            "longer texts, or a smaller seq_len."
        )
    if exact and windows.shape[0] < n_samples:
        have = windows.shape[0]
        raise CalibrationError(
            f"the calibration data hold {ids.numel()} tokens: {have} window(s) of {seq_len}, fewer than the "
            f"{n_samples} asked; pass more text, ask for at most {have} windows (--n-samples / n_samples) or use "
            "shorter windows."
        )
    return windows


def _calibration_texts(calib) -> list[str]:
    if isinstance(calib, (str, os.PathLike)):
        path = Path(calib)
        calib = split_documents(read_text(path, "calibration file", CalibrationError))
    elif hasattr(calib, "column_names"):  # datasets.Dataset
        if "text" not in calib.column_names:
            raise CalibrationError(f"the dataset has columns {calib.column_names}; it needs a 'text' column.")
        calib = list(calib["text"])
    if not isinstance(calib, (list, tuple)) or not all(isinstance(t, str) for t in calib):
        raise CalibrationError(
            "calibration data must be a text file, a list of strings, a datasets.Dataset "
            "with a 'text' column, or token tensors."
        )
    texts = [t for t in calib if t.strip()]
    if not texts:
        raise CalibrationError("the calibration set is empty (no non-blank text); pass real texts.")
    return texts
