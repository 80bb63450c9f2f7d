"""``none``: the user's plain LoRA fine-tuning of the released model (the paper's "LoRA" row)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unbackdoor.defense import Defense, DefenseContext, DefenseOutcome
from unbackdoor.specs import CrossEntropy


def lora_victim(ctx: DefenseContext) -> Any:
    """The released model with the user's fresh LoRA adapter."""
    model = ctx.backend.load_classifier(ctx.victim_path, ctx.num_labels, seed=ctx.train.seed)
    return ctx.backend.add_lora(model, ctx.lora, seed=ctx.train.seed)


@dataclass(frozen=True)
class NoDefense(Defense):
    """LoRA fine-tuning with cross-entropy on clean data, nothing else."""

    name = "none"
    description = "no defense: plain LoRA fine-tuning on the user's clean data (the 'LoRA' baseline)"

    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        model = lora_victim(ctx)
        stats = ctx.backend.train(model, ctx.clean_train, CrossEntropy(), ctx.train, desc="none: LoRA")
        return DefenseOutcome(model, {"train": stats.summary()})
