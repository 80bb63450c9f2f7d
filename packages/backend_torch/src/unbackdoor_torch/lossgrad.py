"""A loss on given outputs and its gradients (:meth:`unbackdoor.backend.LossGradBackend.loss_grads`): what
:func:`unbackdoor.testing.check_loss` compares with the loss's NumPy float64 evaluation."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from unbackdoor.specs import LossSpec

from .losses import batch_objective
from .train import to_tensors


def loss_grads(loss: LossSpec, logits: np.ndarray, hidden: np.ndarray | None, batch: Mapping[str, np.ndarray],
               device: torch.device) -> tuple[float, np.ndarray, np.ndarray | None]:
    """The training step's objective (:func:`batch_objective`, no model) and its gradients w.r.t. the outputs."""
    outputs = to_tensors({"logits": np.asarray(logits, np.float32)} if hidden is None else
                         {"logits": np.asarray(logits, np.float32), "hidden": np.asarray(hidden, np.float32)}, device)
    inputs = [t.requires_grad_(True) for t in outputs.values()]
    value = batch_objective(loss, None, outputs["logits"], outputs.get("hidden"), to_tensors(batch, device))
    grads = torch.autograd.grad(value, inputs, allow_unused=True)  # a loss may not read the hidden states
    out = [np.zeros(x.shape, np.float32) if g is None else g.cpu().numpy() for g, x in zip(grads, inputs, strict=True)]
    return float(value.detach()), out[0], out[1] if hidden is not None else None
