"""``onion``: outlier-word removal by language-model perplexity (Qi et al., "ONION: A Simple and
Effective Defense Against Textual Backdoor Attacks", EMNLP 2021).

An inserted trigger word ("mn", "cf") makes a sentence less fluent. For each input with words
``w_1..w_n``, the suspicion of ``w_i`` is ``ppl(sentence) - ppl(sentence without w_i)`` under a
causal language model (SmolLM2 by default); words whose suspicion exceeds ``threshold`` are
removed before the model sees the input. Every sentence and every leave-one-out variant is scored
in one batched :meth:`~unbackdoor.backend.Backend.lm_nll` call. A one-word input is kept as it is,
and an input is never emptied (its least suspicious word stays). The model that answers the task
is the user's LoRA fine-tune, as with ``none``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unbackdoor.defense import Defense, DefenseContext, DefenseOutcome
from unbackdoor.errors import ConfigError
from unbackdoor.models import resolve_model

from .common import require_method, tune_like_none


def leave_one_out(words: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """Each sentence of two or more words, then each variant without one word; and where each sentence starts.

    Returns:
        ``texts``: for sentence ``k`` with ``n >= 2`` words, the full sentence then its ``n`` variants
        (sentences of 0 or 1 word add nothing); ``starts [K]``: index of sentence ``k``'s full text in
        ``texts``, -1 when it has fewer than 2 words.
    """
    texts: list[str] = []
    starts = np.full(len(words), -1, np.int64)
    for k, ws in enumerate(words):
        if len(ws) < 2:
            continue
        starts[k] = len(texts)
        texts.append(" ".join(ws))
        texts.extend(" ".join([*ws[:i], *ws[i + 1:]]) for i in range(len(ws)))
    return texts, starts


def kept_words(ws: Sequence[str], suspicion: np.ndarray, threshold: float) -> list[str]:
    """The words whose suspicion is at most ``threshold``; never none (the least suspicious one stays)."""
    keep = suspicion <= threshold
    if not keep.any():
        keep[int(np.argmin(suspicion))] = True
    return [w for w, k in zip(ws, keep, strict=True) if k]


@dataclass
class OnionFilter:
    """The input transform: drops words whose removal lowers the LM's perplexity by more than ``threshold``."""

    backend: Any
    scorer: Path
    threshold: float
    batch_size: int
    max_length: int
    stats: dict[str, int] = field(default_factory=lambda: {"texts": 0, "words": 0, "removed": 0})

    def suspicion(self, words: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Per sentence, ``ppl(sentence) - ppl(sentence without word i)`` for each word (empty below 2 words)."""
        texts, starts = leave_one_out(words)
        if not texts:
            return [np.zeros(0) for _ in words]
        nll = self.backend.lm_nll(self.scorer, texts, batch_size=self.batch_size, max_length=self.max_length)
        ppl = np.exp(np.asarray(nll, np.float64))
        return [ppl[s] - ppl[s + 1 : s + 1 + len(ws)] if s >= 0 else np.zeros(0)
                for ws, s in zip(words, starts, strict=True)]

    def __call__(self, texts: Sequence[str]) -> list[str]:
        """The purified texts, in order."""
        words = [t.split() for t in texts]
        out = [" ".join(kept_words(ws, s, self.threshold)) if len(ws) >= 2 else t
               for t, ws, s in zip(texts, words, self.suspicion(words), strict=True)]
        self.stats["texts"] += len(texts)
        self.stats["words"] += sum(map(len, words))
        self.stats["removed"] += sum(map(len, words)) - sum(len(t.split()) for t in out)
        return out


@dataclass(frozen=True)
class Onion(Defense):
    """ONION input purification.

    Attributes:
        threshold: remove words whose suspicion (perplexity drop when removed) exceeds this.
        scorer: the causal LM: a named model (``smollm2-135m``), a HF directory or a hub id.
        batch_size: sentences per LM forward.
    """

    name = "onion"
    description = "ONION: removes words whose deletion lowers a language model's perplexity (input purification)"
    kind = "detection"
    threshold: float = 0.0
    scorer: str = "smollm2-135m"
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold):
            raise ConfigError(f"defense 'onion' option threshold must be a finite number, got {self.threshold!r}")
        if self.batch_size < 1:
            raise ConfigError(f"defense 'onion' option batch_size must be >= 1, got {self.batch_size!r}")

    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        require_method(ctx, self.name, "lm_nll")
        scorer = resolve_model(self.scorer, ctx.cache.root)
        model, stats = tune_like_none(ctx, desc="onion: user LoRA")
        purify = OnionFilter(ctx.backend, scorer, self.threshold, self.batch_size, ctx.train.max_length + 1)
        stats["onion"] = purify.stats  # filled in while the runner evaluates
        return DefenseOutcome(model, stats, transform=purify)
