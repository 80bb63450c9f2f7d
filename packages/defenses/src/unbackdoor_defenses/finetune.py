"""``none``: the user's plain LoRA fine-tuning of the released model (the paper's "LoRA" row)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from unbackdoor.defense import Defense, DefenseContext, DefenseOutcome
from unbackdoor.errors import check_choice
from unbackdoor.specs import PEFT_METHODS, CrossEntropy, PromptSpec, TrainSpec


def lora_victim(ctx: DefenseContext) -> Any:
    """The released model with the user's fresh LoRA adapter."""
    model = ctx.backend.load_classifier(ctx.victim_path, ctx.num_labels, seed=ctx.train.seed)
    return ctx.backend.add_lora(model, ctx.lora, seed=ctx.train.seed)


@dataclass(frozen=True)
class UserPEFT:
    """The user's PEFT module, for defenses that fine-tune the released model (``none``, ``w2s``).

    Attributes:
        peft: ``lora`` (the run's ``lora_*`` settings), ``prompt-tuning``, ``p-tuning`` or ``prefix-tuning``.
        num_virtual_tokens: the prompt length (prompt methods).
        lr: the learning rate (0: the user's ``user_lr``; prompt methods usually want far more, ~1e-2).
    """

    peft: str = "lora"
    num_virtual_tokens: int = 20
    lr: float = 0.0

    def __post_init__(self) -> None:
        check_choice(f"{getattr(self, 'name', 'defense')} peft method", self.peft, PEFT_METHODS)
        if self.peft != "lora":
            PromptSpec(self.peft, self.num_virtual_tokens)

    def user_model(self, ctx: DefenseContext) -> Any:
        """The released model with a fresh adapter of the chosen method."""
        if self.peft == "lora":
            return lora_victim(ctx)
        model = ctx.backend.load_classifier(ctx.victim_path, ctx.num_labels, seed=ctx.train.seed)
        return ctx.backend.add_adapter(model, PromptSpec(self.peft, self.num_virtual_tokens), seed=ctx.train.seed)

    def user_spec(self, ctx: DefenseContext) -> TrainSpec:
        """The user's training spec, with this module's learning rate when set."""
        return dataclasses.replace(ctx.train, lr=self.lr or ctx.train.lr)


@dataclass(frozen=True)
class NoDefense(UserPEFT, Defense):
    """PEFT (LoRA by default) fine-tuning with cross-entropy on the user's data, nothing else."""

    name = "none"
    description = "no defense: plain LoRA fine-tuning on the user's clean data (the 'LoRA' baseline)"

    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        model = self.user_model(ctx)
        stats = ctx.backend.train(model, ctx.clean_train, CrossEntropy(), self.user_spec(ctx), desc=f"none: {self.peft}")
        return DefenseOutcome(model, {"train": stats.summary()})
