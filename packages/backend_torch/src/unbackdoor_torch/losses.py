"""The torch backend's losses: every written-once loss (:mod:`unbackdoor.lossdef`) evaluated on tensors.

Cross-entropy, label reset and W2S (and any third party's loss with ``terms``) have no torch code here:
:func:`batch_objective` evaluates their one definition on torch tensors (autograd follows it). The unlearning
losses (RGA, GA, NPO) are still implemented here (checked against :mod:`unbackdoor.losses`).
"""

from __future__ import annotations

from functools import singledispatch

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from unbackdoor import lossdef
from unbackdoor.specs import AdaptiveGALoss, GALoss, NPOLoss


def per_example_loss(spec: lossdef.ArrayLoss, logits: torch.Tensor, hidden: torch.Tensor | None,
                     batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example loss ``[B]`` of a written-once ``spec``: the weighted sum of its per-row terms."""
    return lossdef.per_row(spec, logits, hidden, batch)


@singledispatch
def batch_objective(spec: object, model: nn.Module, logits: torch.Tensor, hidden: torch.Tensor | None,
                    batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The scalar objective one training step minimises: a written-once loss's :func:`unbackdoor.lossdef.objective`.

    The unlearning losses (batch objectives over groups of rows that may read the model's parameters) register
    their own implementation.
    """
    if not lossdef.is_array_loss(spec):
        raise TypeError(f"the torch backend has no implementation of loss spec {type(spec).__name__}: "
                        "define its terms (see unbackdoor.lossdef)")
    return lossdef.objective(spec, logits, hidden, batch)  # type: ignore[arg-type]


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
