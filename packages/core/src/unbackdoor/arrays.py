"""Loss building blocks written once against the Python array API standard.

Every function takes arrays of one library (NumPy, torch, jax; found with
``array_api_compat.array_namespace``) and returns that library's arrays, so
the same code is the NumPy float64 reference, runs on torch tensors with
autograd and is traced by ``jax.jit``. Shapes are in the docstrings (optax's
style); nothing here imports a framework (:func:`stop_gradient` reaches
torch through the tensor's own method and jax through ``sys.modules``, which
holds it whenever a jax array exists).
"""

from __future__ import annotations

import sys
from typing import Any

from array_api_compat import array_namespace, is_jax_array, is_torch_array

#: an array of any array-API library (``numpy.ndarray``, ``torch.Tensor``, ``jax.Array``)
Array = Any


def namespace(*arrays: Array) -> Any:
    """The array-API namespace of ``arrays`` (``array_api_compat.numpy``, ``.torch`` or ``jax.numpy``)."""
    return array_namespace(*(a for a in arrays if a is not None))


def stop_gradient(x: Array) -> Array:
    """``x`` as a constant of differentiation: torch's ``detach``, ``jax.lax.stop_gradient``, NumPy unchanged."""
    if is_torch_array(x):
        return x.detach()
    if is_jax_array(x):  # traced values too; jax is imported, or there would be no jax array
        return sys.modules["jax"].lax.stop_gradient(x)
    return x


def log_softmax(logits: Array, axis: int = -1) -> Array:
    """Numerically stable ``log softmax`` along ``axis`` (the standard has none)."""
    xp = namespace(logits)
    z = logits - xp.max(logits, axis=axis, keepdims=True)
    return z - xp.log(xp.sum(xp.exp(z), axis=axis, keepdims=True))


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Per-example ``-log softmax(logits)[label]``: ``[B, C]`` logits, ``[B]`` integer labels -> ``[B]``."""
    xp = namespace(logits)
    return -xp.take_along_axis(log_softmax(logits), labels[:, None], axis=-1)[:, 0]


def log_sigmoid(x: Array) -> Array:
    """Elementwise ``log sigmoid(x) = -log(1 + exp(-x))``, stable for large ``|x|``."""
    xp = namespace(x)
    return -xp.logaddexp(xp.zeros_like(x), -x)


def kl_divergence(p_logits: Array, q_logits: Array) -> Array:
    """Per-example ``KL(softmax(p) || softmax(q))``; both ``[B, C]``, returns ``[B]``."""
    xp = namespace(p_logits, q_logits)
    logp, logq = log_softmax(p_logits), log_softmax(q_logits)
    return xp.sum(xp.exp(logp) * (logp - logq), axis=-1)


def distillation(student_logits: Array, teacher_logits: Array, temperature: float) -> Array:
    """Per-example ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``; ``[B, C]`` in, ``[B]`` out."""
    t = float(temperature)
    return t * t * kl_divergence(teacher_logits / t, student_logits / t)


def squared_distance(diff: Array, reduce: str = "mean") -> Array:
    """``diff**2`` reduced over the last (hidden) axis: ``mean`` or ``sum``; ``[..., D]`` in, ``[...]`` out."""
    xp = namespace(diff)
    sq = xp.square(diff)
    return xp.sum(sq, axis=-1) if reduce == "sum" else xp.mean(sq, axis=-1)


def row_mean(values: Array, weight: Array | None = None) -> Array:
    """The mean of per-row ``values [B]``, each row weighted by ``weight [B]`` (0: a filler row) when given."""
    xp = namespace(values)
    if weight is None:
        return xp.mean(values)
    return xp.sum(values * weight) / xp.sum(weight)


def token_alignment(states: Array, attention_mask: Array, teacher_hidden: Array, reduce: str = "mean") -> Array:
    """Per row, the mean over its real tokens of each token state's squared distance to the row's teacher state.

    Args:
        states: ``[B, L, D]`` the student's final-layer state of every position.
        attention_mask: ``[B, L]`` 1 on real tokens, 0 on padding.
        teacher_hidden: ``[B, D]`` each row's projected teacher state.
        reduce: ``mean`` or ``sum`` over D.

    Returns:
        ``[B]``; a row without real tokens gives 0.
    """
    xp = namespace(states)
    mask = xp.astype(attention_mask, states.dtype)
    dist = squared_distance(states - teacher_hidden[:, None], reduce)
    return xp.sum(dist * mask, axis=1) / xp.clip(xp.sum(mask, axis=1), min=1.0)


def released_alignment(states: Array, teacher_hidden: Array, reduce: str = "sum", weight: Array | None = None,
                       position_weight: Array | None = None) -> Array:
    """The released W2SDefense script's alignment: the mean over every position of every row of the squared
    distance to ONE vector, the teacher state of the batch's last real row (a batch value, 0-d).

    Args:
        states: ``[B, L, D]`` the student's final-layer state of every position, as the batch is padded.
        teacher_hidden: ``[B, D]`` projected teacher states; only the last real row's is used.
        reduce: ``sum`` (the script's squared L2 distance) or ``mean`` over D.
        weight: ``[B]`` 0/1 row weights (0: filler rows after the real ones); None: every row is real.
        position_weight: ``[B, L]`` 0/1: which positions are the batch's own (a backend that widens a batch
            marks the extra columns 0); None: every position.
    """
    xp = namespace(states)
    if weight is None:
        vector = teacher_hidden[-1:]
    else:  # filler rows come after the real ones; an index array keeps this traceable under jit
        vector = xp.take(teacher_hidden, xp.reshape(xp.sum(weight > 0) - 1, (1,)), axis=0)
    dist = squared_distance(states - vector, reduce)
    w = position_weight
    if weight is not None:
        w = xp.broadcast_to(weight[:, None], dist.shape) if w is None else w * weight[:, None]
    return xp.mean(dist) if w is None else xp.sum(dist * w) / xp.sum(w)


def group_weights(is_poisoned: Array, dtype: Any, weight: Array | None = None) -> tuple[Array, Array]:
    """Per-row weights whose weighted sums are the mean over the batch's poisoned rows and over its clean rows.

    Args:
        is_poisoned: ``[B]`` 1 for rows to unlearn, 0 for rows to keep.
        dtype: the weights' floating dtype (the logits').
        weight: ``[B]`` 0/1 row weights (0: a filler row, counted in neither group); None: every row counts.

    Returns:
        ``(w_p, w_c)``, each ``[B]``: ``p / max(sum p, 1)`` with ``p = is_poisoned * weight``, the same for
        the clean rows; a group absent from the batch gets all-zero weights, so its mean is 0.
    """
    xp = namespace(is_poisoned)
    flag = xp.astype(is_poisoned, dtype)
    real = xp.ones_like(flag) if weight is None else xp.astype(weight, dtype)
    p, c = flag * real, (1.0 - flag) * real
    return p / xp.clip(xp.sum(p), min=1.0), c / xp.clip(xp.sum(c), min=1.0)


def group_mean(values: Array, w: Array) -> Array:
    """``sum_i w[i] * values[i]`` over the rows with ``w > 0`` only (``w``: one group's weights from
    :func:`group_weights`), so a NaN or an infinity in another group's rows stays out of this group's mean."""
    xp = namespace(values)
    return xp.sum(xp.where(w > 0, values, xp.zeros_like(values)) * w)


def adaptive_lambda(alpha: float, ref_logits: Array, logits: Array, w_p: Array, per_row: bool = False) -> Array:
    """RGA's ``lambda = exp(-alpha * sum_i w_p[i] * KL(softmax(ref_i) || softmax(z_i)))``, a constant of the
    step (it carries no gradient): 0-d, or with ``per_row`` ``[B]`` ``exp(-alpha * KL_i)``.

    Args:
        alpha: the decay rate (>= 0).
        ref_logits: ``[B, C]`` the poisoned model's logits before unlearning.
        logits: ``[B, C]`` the current model's logits.
        w_p: ``[B]`` the poisoned rows' weights (:func:`group_weights`); rows with weight 0 count as KL 0
            (their ``ref_logits`` may hold anything), so lambda is 1 without poisoned rows.
    """
    xp = namespace(logits)
    kl = kl_divergence(stop_gradient(ref_logits), stop_gradient(logits))
    kl = xp.where(w_p > 0, kl, xp.zeros_like(kl))
    return stop_gradient(xp.exp(-alpha * (kl if per_row else xp.sum(w_p * kl))))


def npo_loss(beta: float, ce: Array, ref_ce: Array) -> Array:
    """Per-row NPO loss ``-(2/beta) * log sigmoid(beta * (CE - CE_ref))``; ``[B]`` in and out."""
    return -(2.0 / beta) * log_sigmoid(beta * (ce - ref_ce))
