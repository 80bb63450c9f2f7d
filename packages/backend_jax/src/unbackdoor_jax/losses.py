"""The jax backend's losses: every loss (:mod:`unbackdoor.lossdef`) traced with ``jax.numpy``.

No loss has jax code here: :func:`batch_objective` evaluates a spec's one definition (``terms``) on jax arrays
inside the jitted step (the spec is a static argument), after adding to the batch what the spec reads of the
model (:func:`unbackdoor.lossdef.model_inputs`: the parameter distance, :func:`unbackdoor_jax.lora.delta_norm`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx

from unbackdoor import lossdef

from .lora import delta_norm

Array = jax.Array


def per_example_loss(spec: lossdef.ArrayLoss, logits: Array, hidden: Array, batch: Mapping[str, Array]) -> Array:
    """Per-example loss ``[B]`` of a written-once ``spec``: the weighted sum of its per-row terms."""
    return lossdef.per_row(spec, logits, hidden, batch)


def loss_inputs(spec: object, model: nnx.Module | None, batch: Mapping[str, Array]) -> dict[str, Array]:
    """``batch`` plus what ``spec`` reads of ``model``: its backbone's distance (:func:`delta_norm`,
    differentiable) when the spec ``reads_parameter_distance``."""
    return {**batch, **lossdef.model_inputs(spec, lambda: delta_norm(model.backbone), batch)}  # type: ignore[union-attr]


def batch_objective(spec: object, model: nnx.Module | None, logits: Array, hidden: Array,
                    batch: Mapping[str, Array]) -> Array:
    """The scalar objective one step minimises: ``spec``'s :func:`unbackdoor.lossdef.objective` (filler rows,
    ``weight`` 0, count nowhere) on the batch with what it reads of ``model`` (:func:`loss_inputs`; ``model`` is
    read only then)."""
    if not lossdef.is_array_loss(spec):
        raise TypeError(f"the jax backend has no implementation of loss spec {type(spec).__name__}: "
                        "define its terms (see unbackdoor.lossdef)")
    return lossdef.objective(spec, logits, hidden, loss_inputs(spec, model, batch))  # type: ignore[arg-type]
