"""jax.numpy implementations of the core loss specs (checked against :mod:`unbackdoor.losses`).

Pure, per-example functions; shapes as in the NumPy reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import singledispatch

import jax
import jax.numpy as jnp

from unbackdoor.specs import CrossEntropy, LabelResetLoss, W2SLoss

Array = jax.Array


def cross_entropy(logits: Array, labels: Array) -> Array:
    """``[B, C]`` logits, ``[B]`` int labels -> ``[B]`` ``-log softmax(logits)[label]``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def distillation(student_logits: Array, teacher_logits: Array, temperature: float) -> Array:
    """Per-example ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``; ``[B, C]`` in, ``[B]`` out."""
    t = temperature
    log_s = jax.nn.log_softmax(student_logits / t, axis=-1)
    log_t = jax.nn.log_softmax(teacher_logits / t, axis=-1)
    return t * t * (jnp.exp(log_t) * (log_t - log_s)).sum(-1)


def feature_alignment(student_hidden: Array, teacher_hidden: Array) -> Array:
    """Per-example mean over the hidden dimension of the squared difference; ``[B, D]`` in, ``[B]`` out."""
    return jnp.square(student_hidden - teacher_hidden).mean(-1)


@singledispatch
def per_example_loss(spec: object, logits: Array, hidden: Array, batch: Mapping[str, Array]) -> Array:
    """Per-example loss ``[B]`` of ``spec`` from the model's ``logits``/``hidden`` and the batch arrays."""
    raise TypeError(f"the jax backend has no implementation of loss spec {type(spec).__name__}")


@per_example_loss.register
def _(spec: CrossEntropy, logits: Array, hidden: Array, batch: Mapping[str, Array]) -> Array:
    return cross_entropy(logits, batch["labels"])


@per_example_loss.register
def _(spec: LabelResetLoss, logits: Array, hidden: Array, batch: Mapping[str, Array]) -> Array:
    return cross_entropy(logits, batch["reset_labels"])


@per_example_loss.register
def _(spec: W2SLoss, logits: Array, hidden: Array, batch: Mapping[str, Array]) -> Array:
    loss = spec.alpha * cross_entropy(logits, batch["labels"])
    if spec.beta:  # skipping a zero-weight term also skips its gradient work
        loss = loss + spec.beta * distillation(logits, batch["teacher_logits"], spec.temperature)
    if spec.gamma:
        loss = loss + spec.gamma * feature_alignment(hidden, batch["teacher_hidden"])
    return loss
