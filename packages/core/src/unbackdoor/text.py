"""Tokenisation shared by every backend (HF ``tokenizer.json`` via ``tokenizers``).

Both backends see the same token ids because they share this code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import DataError


class TextEncoder:
    """Turns strings into variable-length int32 id arrays, truncated, never padded."""

    def __init__(self, tokenizer: Tokenizer, pad_id: int) -> None:
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer, self.pad_id = tokenizer, pad_id

    @classmethod
    def from_dir(cls, path: str | Path) -> TextEncoder:
        """Load ``tokenizer.json`` from a HF model directory; pad with its pad (or eos) token."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise DataError(f"model directory {str(path)!r} has no tokenizer.json (a HF fast tokenizer is required)")
        try:
            tokenizer = Tokenizer.from_file(str(file))
            return cls(tokenizer, _pad_id(path, tokenizer))
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise DataError(f"cannot read the tokenizer of {str(path)!r}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
                            ) from None

    def encode(self, texts: list[str] | tuple[str, ...], max_length: int) -> list[np.ndarray]:
        """Ids of each text, cut to ``max_length`` (the end is dropped, special tokens kept at the front)."""
        out = []
        for enc in self.tokenizer.encode_batch(list(texts)):
            ids = np.asarray(enc.ids, np.int32)
            if len(ids) > max_length:
                ids = np.concatenate([ids[: max_length - 1], ids[-1:]]) if _ends_special(enc) else ids[:max_length]
            out.append(ids)
        return out


def _ends_special(enc: object) -> bool:
    mask = getattr(enc, "special_tokens_mask", None)
    return bool(mask) and bool(mask[-1])


def _pad_id(path: Path, tokenizer: Tokenizer) -> int:
    """The pad token id: tokenizer_config's pad_token, else eos_token, else 0."""
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    for key in ("pad_token", "eos_token"):
        token = cfg.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if token and tokenizer.token_to_id(token) is not None:
            return int(tokenizer.token_to_id(token))
    return 0
