"""Torch implementations of the core loss specs (checked against unbackdoor.losses)."""

from __future__ import annotations

from functools import singledispatch

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from unbackdoor.specs import AdaptiveGALoss, CrossEntropy, GALoss, LabelResetLoss, NPOLoss, W2SLoss


def distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-example ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``."""
    t = temperature
    log_s = F.log_softmax(student_logits / t, dim=-1)
    log_t = F.log_softmax(teacher_logits / t, dim=-1)
    return t * t * F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)


def squared_distance(diff: torch.Tensor, reduce: str) -> torch.Tensor:
    """``diff**2`` reduced (``mean`` or ``sum``) over the last, hidden, dimension."""
    sq = diff.pow(2)
    return sq.sum(-1) if reduce == "sum" else sq.mean(-1)


def alignment(spec: W2SLoss, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The W2S alignment: per row ``[B]`` (``pooled``, ``tokens``) or the batch's value (``released``).

    ``hidden`` is ``[B, D]`` (pooled) or ``[B, L, D]`` every position's state (see :class:`W2SLoss`).
    """
    teacher = batch["teacher_hidden"]
    if spec.alignment == "pooled":
        return squared_distance(hidden - teacher, spec.reduce)
    if spec.alignment == "tokens":
        mask = batch["attention_mask"].to(hidden.dtype)
        dist = squared_distance(hidden - teacher[:, None], spec.reduce)
        return (dist * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return squared_distance(hidden - teacher[-1], spec.reduce).mean()  # every position toward the last row's


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
    if spec.gamma and not spec.batch_term:
        loss = loss + spec.gamma * alignment(spec, hidden, batch)  # type: ignore[arg-type]
    return loss


@singledispatch
def batch_objective(spec: object, model: nn.Module, logits: torch.Tensor, hidden: torch.Tensor | None,
               batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The scalar objective one training step minimises: the batch mean of :func:`per_example_loss`.

    Batch objectives (the unlearning losses, whose terms are means over groups of rows and may read the
    model's parameters) register their own implementation.
    """
    return per_example_loss(spec, logits, hidden, batch).mean()


def group_weights(is_poisoned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_p, w_c)`` ``[B]``: weights of a mean over the poisoned rows and over the clean rows (0 if absent)."""
    p = is_poisoned.float()
    c = 1.0 - p
    return p / p.sum().clamp_min(1.0), c / c.sum().clamp_min(1.0)


#: attribute of a module holding ``[(parameter, base tensor)]``: the weights its distance is measured from
ANCHOR = "unbackdoor_anchor"


def lora_delta_norm(model: nn.Module) -> torch.Tensor:
    """The L2 distance the weights moved: ``sqrt(sum_layers ||scaling * B A||_F^2)`` over every peft LoRA
    layer, else ``||theta - theta_base||_2`` over the parameters an :data:`ANCHOR` pairs with base weights
    (full-parameter unlearning), else 0.

    Uses ``||B A||_F^2 = sum((B^T B) * (A A^T))`` (two ``r x r`` Gram matrices, no ``out x in`` product); the
    gradient at a zero norm (LoRA's init, B = 0) is taken as 0.
    """
    squares = []
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            for name in layer.lora_A:
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                squares.append(layer.scaling[name] ** 2 * ((b.T @ b) * (a @ a.T)).sum())
    if not squares:
        squares = [(w - w0).square().sum() for w, w0 in getattr(model, ANCHOR, ())]
    if not squares:
        return torch.zeros(())
    sq = torch.stack(squares).sum()
    return torch.where(sq > 0, sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt(), sq)


@batch_objective.register
def _(spec: W2SLoss, model: nn.Module, logits: torch.Tensor, hidden: torch.Tensor | None,
      batch: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = batch_objective.dispatch(object)(spec, model, logits, hidden, batch)  # the mean of the per-row losses
    return loss + spec.gamma * alignment(spec, hidden, batch) if spec.batch_term else loss  # type: ignore[arg-type]


@batch_objective.register
def _(spec: AdaptiveGALoss, model: nn.Module, logits: torch.Tensor, hidden: torch.Tensor | None,
      batch: dict[str, torch.Tensor]) -> torch.Tensor:
    w_p, w_c = group_weights(batch["is_poisoned"])
    ce = F.cross_entropy(logits, batch["labels"], reduction="none")
    with torch.no_grad():  # lambda is a constant of the step
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(batch["ref_logits"], -1), log_target=True,
                      reduction="none").sum(-1)
        lam = torch.exp(-spec.alpha * (kl if spec.lambda_per_row else (w_p * kl).sum()))
    loss = -(lam * w_p * ce).sum() + (w_c * ce).sum()
    return loss + spec.beta * lora_delta_norm(model).to(loss.device) if spec.beta else loss


@batch_objective.register
def _(spec: GALoss, model: nn.Module, logits: torch.Tensor, hidden: torch.Tensor | None,
      batch: dict[str, torch.Tensor]) -> torch.Tensor:
    w_p, w_c = group_weights(batch["is_poisoned"])
    ce = F.cross_entropy(logits, batch["labels"], reduction="none")
    return -(w_p * ce).sum() + spec.clean_weight * (w_c * ce).sum()


@batch_objective.register
def _(spec: NPOLoss, model: nn.Module, logits: torch.Tensor, hidden: torch.Tensor | None,
      batch: dict[str, torch.Tensor]) -> torch.Tensor:
    w_p, w_c = group_weights(batch["is_poisoned"])
    ce = F.cross_entropy(logits, batch["labels"], reduction="none")
    ref_ce = F.cross_entropy(batch["ref_logits"], batch["labels"], reduction="none")
    npo = -(2.0 / spec.beta) * F.logsigmoid(spec.beta * (ce - ref_ce))
    return (w_p * npo).sum() + spec.clean_weight * (w_c * ce).sum()
