"""A loss on given outputs and its gradients (:meth:`unbackdoor.backend.LossGradBackend.loss_grads`): what
:func:`unbackdoor.testing.check_loss` compares with the loss's NumPy float64 evaluation."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from unbackdoor.specs import LossSpec

from .losses import batch_objective
from .train import device_batch


def loss_grads(loss: LossSpec, logits: np.ndarray, hidden: np.ndarray | None,
               batch: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray, np.ndarray | None]:
    """The training step's objective (:func:`batch_objective`, no model) and its gradients w.r.t. the outputs,
    under ``jax.jit`` as in training (a loss that does not trace fails here too); full fp32 matmuls."""
    arrays = device_batch(batch)

    def objective(z: jax.Array, h: jax.Array | None) -> jax.Array:
        return batch_objective(loss, None, z, h, arrays)

    argnums = (0,) if hidden is None else (0, 1)
    h = None if hidden is None else jnp.asarray(hidden, jnp.float32)
    with jax.default_matmul_precision("highest"):
        value, grads = jax.jit(jax.value_and_grad(objective, argnums))(jnp.asarray(logits, jnp.float32), h)
    out = [np.asarray(g, np.float32) for g in grads]
    return float(value), out[0], out[1] if hidden is not None else None
