"""``strip``: STRIP, perturbation-entropy input detection (Gao et al., "STRIP: A Defence Against
Trojan Attacks on Deep Neural Networks", ACSAC 2019; the text version: Gao et al., "Design and
Evaluation of a Multi-Domain Trojan Detection Method on Deep Neural Networks" (STRIP-ViTA), 2021).

Each input is copied ``n_perturb`` times, every copy mixed word by word with a random clean
training row. A trigger keeps forcing the target class whatever else the text says, so the
model's predictions on the copies of a triggered input have LOW entropy; clean inputs, whose
meaning the mix disturbs, get high entropy. The score is ``-mean entropy``; the threshold is the
``1 - false_rejection_rate`` quantile of the scores of held-out clean rows. The model that
answers the task is the user's LoRA fine-tune, as with ``none``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from unbackdoor.data import TextDataset
from unbackdoor.defense import Defense, DefenseContext, DefenseOutcome
from unbackdoor.errors import ConfigError, check_choice, check_range
from unbackdoor.losses import softmax

from .common import tune_like_none

MIXES = ("replace", "interleave")
#: false rejection rates whose thresholds the runner's sweep reports
SWEEP_FRR = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def mix_words(text: str, other: str, mix: str, ratio: float, rng: np.random.Generator) -> str:
    """One perturbed copy of ``text`` mixed with the clean row ``other``.

    ``replace``: each word of ``text`` is swapped, with probability ``ratio``, for a random word of
    ``other``. ``interleave``: the words of both are riffled together, each keeping its order
    (superimposition; every word of ``text``, the trigger included, survives).
    """
    words, pool = text.split(), other.split() or [""]
    if mix == "replace":
        swap = rng.random(len(words)) < ratio
        picks = rng.integers(0, len(pool), len(words))
        return " ".join(pool[j] if s else w for w, s, j in zip(words, swap, picks, strict=True)).strip()
    slots = np.zeros(len(words) + len(pool), bool)
    slots[rng.choice(len(slots), len(words), replace=False)] = True
    mine, theirs = iter(words), iter(pool)
    return " ".join(next(mine) if s else next(theirs) for s in slots).strip()


def perturb(texts: Sequence[str], pool: Sequence[str], copies: int, mix: str, ratio: float, seed: int) -> list[str]:
    """``copies`` perturbed versions of each text, row-major (text ``i``'s copies at ``i*copies ...``), seeded."""
    rng = np.random.default_rng(seed)
    partners = rng.integers(0, len(pool), (len(texts), copies))
    return [mix_words(t, pool[j], mix, ratio, rng) for t, row in zip(texts, partners, strict=True) for j in row]


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of ``probs [..., C]``."""
    return -(probs * np.log(np.clip(probs, 1e-12, None))).sum(-1)  # type: ignore[no-any-return]


@dataclass
class EntropyDetector:
    """Scores inputs by ``-mean entropy`` of the model's predictions on perturbed copies (higher: suspicious)."""

    backend: Any
    model: Any
    pool: tuple[str, ...]
    options: Strip
    max_length: int
    threshold: float = 0.0
    thresholds: tuple[float, ...] = ()

    def score(self, data: TextDataset) -> np.ndarray:
        """One score per row ``[N]``, deterministic for the defense's seed."""
        o = self.options
        copies = perturb(data.texts, self.pool, o.n_perturb, o.mix, o.replace_ratio, o.seed)
        mixed = TextDataset(copies, np.zeros(len(copies), np.int64), f"{data.name}+strip", data.label_names)
        logits = self.backend.predict(self.model, mixed, batch_size=o.batch_size, max_length=self.max_length,
                                      desc="strip: perturbed copies").logits
        return -entropy(softmax(logits)).reshape(len(data), o.n_perturb).mean(1)

    def calibrate(self, clean: TextDataset, false_rejection_rate: float) -> dict[str, float]:
        """Set the threshold (and the sweep) from clean rows' scores; returns figures for the report."""
        scores = self.score(clean)
        self.threshold = float(np.quantile(scores, 1 - false_rejection_rate))
        self.thresholds = tuple(round(float(np.quantile(scores, 1 - r)), 6) for r in SWEEP_FRR)
        return {"threshold": round(self.threshold, 6), "calibration_rows": len(clean),
                "clean_entropy_mean": round(float(-scores.mean()), 6)}


@dataclass(frozen=True)
class Strip(Defense):
    """STRIP input detector.

    Attributes:
        n_perturb: perturbed copies per input.
        mix: ``replace`` (swap words for a clean row's words) or ``interleave`` (riffle both rows' words).
        replace_ratio: share of words swapped by ``replace``, in [0, 1].
        false_rejection_rate: share of clean held-out rows the threshold flags, in (0, 1).
        calibration_rows: held-out clean rows used to set the threshold.
        seed: drives the clean partners and the mixing.
        batch_size: rows per forward over the perturbed copies.
    """

    name = "strip"
    description = "STRIP: flags inputs whose perturbed copies the model classifies with low entropy (detector)"
    kind = "detection"
    n_perturb: int = 20
    mix: str = "replace"
    replace_ratio: float = 0.5
    false_rejection_rate: float = 0.01
    calibration_rows: int = 200
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        check_choice("defense 'strip' option mix", self.mix, MIXES)
        check_range("defense 'strip' option replace_ratio", self.replace_ratio, 0.0, 1.0)
        check_range("defense 'strip' option false_rejection_rate", self.false_rejection_rate, 0.0, 1.0, inclusive=False)
        for option in ("n_perturb", "calibration_rows", "batch_size"):
            if getattr(self, option) < 1:
                raise ConfigError(f"defense 'strip' option {option} must be >= 1, got {getattr(self, option)!r}")

    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        model, stats = tune_like_none(ctx, desc="strip: user LoRA")
        detector = EntropyDetector(ctx.backend, model, ctx.clean_train.texts, self, ctx.train.max_length * 2)
        stats["strip"] = detector.calibrate(self._held_out(ctx), self.false_rejection_rate)
        return DefenseOutcome(model, stats, detector=detector)

    def _held_out(self, ctx: DefenseContext) -> TextDataset:
        """Clean rows the threshold is set on: the dev split, else the training rows (logged)."""
        if ctx.clean_dev is not None and len(ctx.clean_dev):
            return ctx.clean_dev.shuffled(self.seed).head(self.calibration_rows)
        ctx.log("strip: no clean dev rows; calibrating the threshold on the training rows")
        return ctx.clean_train.shuffled(self.seed).head(self.calibration_rows)
