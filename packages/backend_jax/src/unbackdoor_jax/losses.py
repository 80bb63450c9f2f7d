"""jax.numpy implementations of the core loss specs (checked against :mod:`unbackdoor.losses`).

Pure, per-example functions; shapes as in the NumPy reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import singledispatch

import jax
import jax.numpy as jnp
from flax import nnx

from unbackdoor.specs import AdaptiveGALoss, CrossEntropy, GALoss, LabelResetLoss, NPOLoss, W2SLoss

from .lora import delta_norm

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


def squared_distance(diff: Array, reduce: str) -> Array:
    """``diff**2`` reduced (``mean`` or ``sum``) over the last, hidden, axis."""
    sq = jnp.square(diff)
    return sq.sum(-1) if reduce == "sum" else sq.mean(-1)


def alignment(spec: W2SLoss, hidden: Array, batch: Mapping[str, Array]) -> Array:
    """The W2S alignment: per row ``[B]`` (``pooled``, ``tokens``) or the batch's value (``released``).

    ``hidden`` is ``[B, D]`` (pooled) or ``[B, L, D]`` every position's state. ``released`` counts the
    positions ``position_weight`` marks (the core's batch, not the backend's widening or filler rows) and
    takes the teacher state of the last real row.
    """
    teacher = batch["teacher_hidden"]
    if spec.alignment == "pooled":
        return squared_distance(hidden - teacher, spec.reduce)
    if spec.alignment == "tokens":
        mask = batch["attention_mask"].astype(hidden.dtype)
        dist = squared_distance(hidden - teacher[:, None], spec.reduce)
        return (dist * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
    last = (batch["weight"] > 0).sum().astype(jnp.int32) - 1  # filler rows come after the real ones
    dist = squared_distance(hidden - teacher[last], spec.reduce)
    w = batch["position_weight"]
    return (dist * w).sum() / w.sum()


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
    if spec.gamma and not spec.batch_term:
        loss = loss + spec.gamma * alignment(spec, hidden, batch)
    return loss


@singledispatch
def batch_objective(spec: object, model: nnx.Module, logits: Array, hidden: Array, batch: Mapping[str, Array]) -> Array:
    """The scalar objective one step minimises: the ``weight``-weighted batch mean of :func:`per_example_loss`.

    Filler rows (``weight`` 0) count nowhere. Batch objectives (the unlearning losses, whose terms are means
    over groups of rows and may read the model's parameters) register their own implementation.
    """
    per_row = per_example_loss(spec, logits, hidden, batch)
    return (per_row * batch["weight"]).sum() / batch["weight"].sum()


@batch_objective.register
def _(spec: W2SLoss, model: nnx.Module, logits: Array, hidden: Array, batch: Mapping[str, Array]) -> Array:
    loss = batch_objective.dispatch(object)(spec, model, logits, hidden, batch)  # the mean of the per-row losses
    return loss + spec.gamma * alignment(spec, hidden, batch) if spec.batch_term else loss


def group_weights(batch: Mapping[str, Array]) -> tuple[Array, Array]:
    """``(w_p, w_c)`` ``[B]``: weights of a mean over the poisoned rows and over the clean rows (0 if absent)."""
    p = batch["is_poisoned"] * batch["weight"]
    c = (1.0 - batch["is_poisoned"]) * batch["weight"]
    return p / jnp.maximum(p.sum(), 1.0), c / jnp.maximum(c.sum(), 1.0)


def kl_divergence(p_logits: Array, q_logits: Array) -> Array:
    """Per-example ``KL(softmax(p) || softmax(q))``; ``[B, C]`` in, ``[B]`` out."""
    log_p, log_q = jax.nn.log_softmax(p_logits, axis=-1), jax.nn.log_softmax(q_logits, axis=-1)
    return (jnp.exp(log_p) * (log_p - log_q)).sum(-1)


@batch_objective.register
def _(spec: AdaptiveGALoss, model: nnx.Module, logits: Array, hidden: Array, batch: Mapping[str, Array]) -> Array:
    w_p, w_c = group_weights(batch)
    ce = cross_entropy(logits, batch["labels"])
    kl = kl_divergence(batch["ref_logits"], jax.lax.stop_gradient(logits))
    spread = kl if spec.lambda_per_row else (w_p * kl).sum()  # per row, or the batch's poisoned-row mean
    lam = jax.lax.stop_gradient(jnp.exp(-spec.alpha * spread))  # a constant of the step
    loss = -(lam * w_p * ce).sum() + (w_c * ce).sum()
    return loss + spec.beta * delta_norm(model.backbone) if spec.beta else loss


@batch_objective.register
def _(spec: GALoss, model: nnx.Module, logits: Array, hidden: Array, batch: Mapping[str, Array]) -> Array:
    w_p, w_c = group_weights(batch)
    ce = cross_entropy(logits, batch["labels"])
    return -(w_p * ce).sum() + spec.clean_weight * (w_c * ce).sum()


@batch_objective.register
def _(spec: NPOLoss, model: nnx.Module, logits: Array, hidden: Array, batch: Mapping[str, Array]) -> Array:
    w_p, w_c = group_weights(batch)
    ce = cross_entropy(logits, batch["labels"])
    ref_ce = cross_entropy(batch["ref_logits"], batch["labels"])
    npo = -(2.0 / spec.beta) * jax.nn.log_sigmoid(spec.beta * (ce - ref_ce))
    return (w_p * npo).sum() + spec.clean_weight * (w_c * ce).sum()
