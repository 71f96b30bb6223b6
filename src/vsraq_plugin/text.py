"""Text to tokens: the one tokenisation shared by calibration and evaluation.

Documents are separated by blank lines; each is tokenised without special tokens and followed by EOS,
and the stream is cut into non-overlapping windows.
"""

from __future__ import annotations

import torch


def split_documents(text: str) -> list[str]:
    return [d for d in text.split("\n\n") if d.strip()]


def token_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents' tokens, each document followed by the EOS token, as one 1-D tensor."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    if not docs:  # a tokenizer given an empty batch fails deep inside; no documents are no tokens
        return torch.tensor(ids, dtype=torch.long)
    for doc_ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(doc_ids)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def cut_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """Non-overlapping windows ``(n, seq_len)``; ``n = 0`` when the stream is shorter than one window."""
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)
