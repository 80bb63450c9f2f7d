"""The torch backend's losses: every loss (:mod:`unbackdoor.lossdef`) evaluated on tensors, and the parameter
distance a loss may read.

No loss has torch code here: :func:`batch_objective` evaluates a spec's one definition (``terms``) on torch
tensors (autograd follows it), after adding to the batch what the spec reads of the model
(:func:`unbackdoor.lossdef.model_inputs`: the parameter distance, :func:`lora_delta_norm`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from unbackdoor import lossdef


def per_example_loss(spec: lossdef.ArrayLoss, logits: torch.Tensor, hidden: torch.Tensor | None,
                     batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example loss ``[B]`` of a written-once ``spec``: the weighted sum of its per-row terms."""
    return lossdef.per_row(spec, logits, hidden, batch)


def loss_inputs(spec: object, model: nn.Module | None, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` plus what ``spec`` reads of ``model``: its distance (:func:`lora_delta_norm`, differentiable,
    on the batch's device) when the spec ``reads_parameter_distance``."""
    device = batch["labels"].device
    return {**batch, **lossdef.model_inputs(spec, lambda: lora_delta_norm(model).to(device), batch)}  # type: ignore[arg-type]


def batch_objective(spec: object, model: nn.Module | None, logits: torch.Tensor, hidden: torch.Tensor | None,
                    batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The scalar one training step minimises: ``spec``'s :func:`unbackdoor.lossdef.objective` on the batch
    with what it reads of ``model`` (:func:`loss_inputs`; ``model`` is read only then)."""
    if not lossdef.is_array_loss(spec):
        raise TypeError(f"the torch backend has no implementation of loss spec {type(spec).__name__}: "
                        "define its terms (see unbackdoor.lossdef)")
    return lossdef.objective(spec, logits, hidden, loss_inputs(spec, model, batch))  # type: ignore[arg-type]


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
