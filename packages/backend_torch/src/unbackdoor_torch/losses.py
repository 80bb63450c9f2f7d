"""Torch implementations of the core loss specs (checked against unbackdoor.losses)."""

from __future__ import annotations

from functools import singledispatch

import torch
import torch.nn.functional as F

from unbackdoor.specs import CrossEntropy, LabelResetLoss, W2SLoss


def distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-example ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``."""
    t = temperature
    log_s = F.log_softmax(student_logits / t, dim=-1)
    log_t = F.log_softmax(teacher_logits / t, dim=-1)
    return t * t * F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)


def feature_alignment(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Per-example mean over the hidden dimension of the squared difference."""
    return (student_hidden - teacher_hidden).pow(2).mean(-1)


@singledispatch
def per_example_loss(spec: object, logits: torch.Tensor, hidden: torch.Tensor | None,
                     batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example loss ``[B]`` of ``spec``."""
    raise TypeError(f"the torch backend has no implementation of loss spec {type(spec).__name__}")


@per_example_loss.register
def _(spec: CrossEntropy, logits: torch.Tensor, hidden: torch.Tensor | None,
      batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(logits, batch["labels"], reduction="none")


@per_example_loss.register
def _(spec: LabelResetLoss, logits: torch.Tensor, hidden: torch.Tensor | None,
      batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(logits, batch["reset_labels"], reduction="none")


@per_example_loss.register
def _(spec: W2SLoss, logits: torch.Tensor, hidden: torch.Tensor | None,
      batch: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = spec.alpha * F.cross_entropy(logits, batch["labels"], reduction="none")
    if spec.beta:
        loss = loss + spec.beta * distillation(logits, batch["teacher_logits"], spec.temperature)
    if spec.gamma:
        loss = loss + spec.gamma * feature_alignment(hidden, batch["teacher_hidden"])  # type: ignore[arg-type]
    return loss


def needs_hidden(spec: object) -> bool:
    """Whether the loss reads the pooled hidden state."""
    return isinstance(spec, W2SLoss) and spec.gamma > 0
