"""``abl``: Anti-Backdoor Learning's isolate-then-retrain, for the data-poisoning setting (poisoned user rows)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unbackdoor.arrays import cross_entropy
from unbackdoor.data import TextDataset
from unbackdoor.defense import Defense, DefenseContext, DefenseOutcome
from unbackdoor.errors import ConfigError
from unbackdoor.metrics import auroc, detection_scores
from unbackdoor.specs import CrossEntropy

from .loss import LocalGradientAscent


@dataclass(frozen=True)
class AntiBackdoorLearning(Defense):
    """Isolate the user's rows the model learns fastest, then fine-tune on the rest.

    1. Isolation: a LoRA model trained on the user's rows with :class:`LocalGradientAscent` (every row's
       loss held near ``gamma``) for the user's epochs.
    2. The ``isolation_rate`` share of rows with the LOWEST loss under that model is flagged (ABL: a
       backdoor's poisoned rows are learned faster than clean ones).
    3. A fresh LoRA model is fine-tuned with cross-entropy on the rows not flagged.

    Attributes:
        gamma: the isolation loss's level (LocalGradientAscent's ``gamma``).
        isolation_rate: the share of rows flagged, in (0, 1).
    """

    name = "abl"
    description = "example plugin: isolate the lowest-loss rows under local gradient ascent, retrain without them"
    settings = ("data",)
    gamma: float = 0.5
    isolation_rate: float = 0.1

    def __post_init__(self) -> None:
        LocalGradientAscent(self.gamma)  # its own check of gamma
        if not 0 < self.isolation_rate < 1:
            raise ConfigError(f"defense 'abl': isolation_rate must be in (0, 1), got {self.isolation_rate!r}")

    def isolate(self, ctx: DefenseContext) -> tuple[np.ndarray, np.ndarray]:
        """``(flagged [N] bool, loss [N])``: the rows' losses under the isolation model, lowest flagged."""
        model = ctx.backend.add_lora(ctx.backend.load_classifier(ctx.victim_path, ctx.num_labels, seed=ctx.train.seed),
                                     ctx.lora, seed=ctx.train.seed)
        ctx.backend.train(model, ctx.clean_train, LocalGradientAscent(self.gamma), ctx.train, desc="abl: isolation")
        logits = ctx.backend.predict(model, ctx.clean_train, max_length=ctx.train.max_length).logits
        loss = cross_entropy(np.asarray(logits, np.float64), ctx.clean_train.labels)
        flagged = np.zeros(len(loss), bool)
        flagged[np.argsort(loss, kind="stable")[:max(1, round(self.isolation_rate * len(loss)))]] = True
        return flagged, loss

    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        flagged, loss = self.isolate(ctx)
        kept: TextDataset = ctx.clean_train.subset(np.flatnonzero(~flagged).tolist(), f"{ctx.clean_train.name}[abl]")
        model = ctx.backend.add_lora(ctx.backend.load_classifier(ctx.victim_path, ctx.num_labels, seed=ctx.train.seed),
                                     ctx.lora, seed=ctx.train.seed)
        stats = ctx.backend.train(model, kept, CrossEntropy(), ctx.train, desc="abl: retrain")
        poisoned = np.asarray(ctx.clean_train.poisoned, bool)
        isolation = {"flagged_rows": int(flagged.sum()), **detection_scores(flagged, poisoned)}
        if poisoned.any() and not poisoned.all():
            isolation["auroc"] = auroc(-loss, poisoned)  # a lower loss is more suspicious
        return DefenseOutcome(model, {"isolation": isolation, "train": stats.summary()})
