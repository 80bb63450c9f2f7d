"""``finetune``: full fine-tuning of the released model on the user's clean data (no adapter).

The classic fine-tuning baseline (e.g. Liu et al., "Fine-Pruning", RAID 2018, uses it as the
"fine-tuning" defense; Kurita et al., "Weight Poisoning Attacks on Pre-trained Models", ACL 2020,
measure how much of a backdoor survives it): every weight is trained with cross-entropy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from unbackdoor.defense import Defense, DefenseContext, DefenseOutcome
from unbackdoor.errors import ConfigError
from unbackdoor.specs import CrossEntropy, TrainSpec


@dataclass(frozen=True)
class FullFineTune(Defense):
    """Full-parameter fine-tuning with cross-entropy.

    Attributes:
        lr: peak learning rate (0: the user's LoRA rate, usually too high for full fine-tuning).
        epochs: passes over the clean rows (0: the user's setting).
    """

    settings = ("weight",)  # acts on the released model
    name = "finetune"
    description = "full fine-tuning (every weight, no LoRA) of the released model on the clean data"
    lr: float = 2e-5
    epochs: float = 0.0

    def __post_init__(self) -> None:
        for option in ("lr", "epochs"):
            value = getattr(self, option)
            if not value >= 0:
                raise ConfigError(f"defense 'finetune' option {option} must be >= 0 (0: the user's setting), got {value!r}")

    def spec(self, ctx: DefenseContext) -> TrainSpec:
        """The user's training spec with this defense's rate and epochs."""
        return dataclasses.replace(ctx.train, lr=self.lr or ctx.train.lr, epochs=self.epochs or ctx.train.epochs)

    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        model = ctx.backend.load_classifier(ctx.victim_path, ctx.num_labels, seed=ctx.train.seed)
        stats = ctx.backend.train(model, ctx.clean_train, CrossEntropy(), self.spec(ctx), desc="finetune: full")
        return DefenseOutcome(model, {"train": stats.summary()})
