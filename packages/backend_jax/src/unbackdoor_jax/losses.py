"""The jax backend's losses: every written-once loss (:mod:`unbackdoor.lossdef`) traced with ``jax.numpy``.

Cross-entropy, label reset and W2S (and any third party's loss with ``terms``) have no jax code here:
:func:`batch_objective` evaluates their one definition on jax arrays inside the jitted step (the spec is a
static argument). The unlearning losses (RGA, GA, NPO) are still implemented here (checked against
:mod:`unbackdoor.losses`).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import singledispatch

import jax
import jax.numpy as jnp
from flax import nnx

from unbackdoor import lossdef
from unbackdoor.specs import AdaptiveGALoss, GALoss, NPOLoss

from .lora import delta_norm

Array = jax.Array


def cross_entropy(logits: Array, labels: Array) -> Array:
    """``[B, C]`` logits, ``[B]`` int labels -> ``[B]`` ``-log softmax(logits)[label]``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def per_example_loss(spec: lossdef.ArrayLoss, logits: Array, hidden: Array, batch: Mapping[str, Array]) -> Array:
    """Per-example loss ``[B]`` of a written-once ``spec``: the weighted sum of its per-row terms."""
    return lossdef.per_row(spec, logits, hidden, batch)


@singledispatch
def batch_objective(spec: object, model: nnx.Module, logits: Array, hidden: Array, batch: Mapping[str, Array]) -> Array:
    """The scalar objective one step minimises: a written-once loss's :func:`unbackdoor.lossdef.objective`
    (the ``weight``-weighted row mean: filler rows count nowhere).

    The unlearning losses (batch objectives over groups of rows that may read the model's parameters) register
    their own implementation.
    """
    if not lossdef.is_array_loss(spec):
        raise TypeError(f"the jax backend has no implementation of loss spec {type(spec).__name__}: "
                        "define its terms (see unbackdoor.lossdef)")
    return lossdef.objective(spec, logits, hidden, batch)  # type: ignore[arg-type]


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
