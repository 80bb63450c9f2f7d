"""NumPy reference implementations of every loss: the parity oracle.

Pure functions, per-example outputs, float64 inside, shapes in the docstrings
(optax's style). Backends must agree with these to the tolerances stated in
the tests. No loss is written here: each loss's reference is its one
definition (the spec's ``terms``, :mod:`unbackdoor.lossdef`, built from
:mod:`unbackdoor.arrays`) evaluated on NumPy float64 arrays, which
:func:`reference_loss` and the functions below wrap. The independent checks
of those definitions are given in closed form: the per-row losses'
gradients (:func:`w2s_grads`) and the unlearning losses' (RGA, GA, NPO:
batch objectives, a mean over the batch's poisoned rows and one over its
clean rows) values and gradients, :func:`unlearning_loss` and
:func:`unlearning_grads`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import arrays
from .lossdef import PARAMETER_DISTANCE, ArrayLoss, Term, combine, is_array_loss, objective, per_row
from .specs import AdaptiveGALoss, GALoss, LabelResetLoss, LossSpec, UnlearningLoss, W2SLoss


def _f64(x: Any) -> np.ndarray:
    """``x`` as a NumPy array, floats as float64 (integers kept: they are labels or masks)."""
    a = np.asarray(x)
    return a.astype(np.float64) if a.dtype.kind == "f" else a


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable ``log softmax`` along ``axis``."""
    return arrays.log_softmax(np.asarray(logits, np.float64), axis)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """``softmax`` along ``axis``."""
    return np.exp(log_softmax(logits, axis))


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy.

    Args:
        logits: ``[B, C]`` unnormalised scores.
        labels: ``[B]`` integer classes.

    Returns:
        ``[B]`` losses ``-log softmax(logits)[label]``.
    """
    return arrays.cross_entropy(np.asarray(logits, np.float64), np.asarray(labels, np.int64))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """Per-example ``KL(softmax(p) || softmax(q))``; both ``[B, C]``, returns ``[B]``."""
    return arrays.kl_divergence(np.asarray(p_logits, np.float64), np.asarray(q_logits, np.float64))


def distillation(student_logits: np.ndarray, teacher_logits: np.ndarray, temperature: float) -> np.ndarray:
    """Per-example ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``; ``[B, C]`` in, ``[B]`` out."""
    return arrays.distillation(np.asarray(student_logits, np.float64), np.asarray(teacher_logits, np.float64),
                               temperature)


def squared_distance(diff: np.ndarray, reduce: str = "mean") -> np.ndarray:
    """``diff**2`` reduced over the last (hidden) axis: ``mean`` or ``sum``; ``[..., D]`` in, ``[...]`` out."""
    return arrays.squared_distance(np.asarray(diff, np.float64), reduce)


def feature_alignment(student_hidden: np.ndarray, teacher_hidden: np.ndarray, reduce: str = "mean") -> np.ndarray:
    """Per-example squared distance (``reduce`` over the hidden dimension); ``[B, D]`` in, ``[B]`` out."""
    return squared_distance(np.asarray(student_hidden, np.float64) - np.asarray(teacher_hidden, np.float64), reduce)


def token_alignment(states: np.ndarray, attention_mask: np.ndarray, teacher_hidden: np.ndarray,
                    reduce: str = "mean") -> np.ndarray:
    """W2S ``alignment="tokens"`` per row (:func:`unbackdoor.arrays.token_alignment`) in float64; ``[B]``."""
    return arrays.token_alignment(_f64(states), np.asarray(attention_mask), _f64(teacher_hidden), reduce)


def released_alignment(states: np.ndarray, teacher_hidden: np.ndarray, reduce: str = "sum",
                       weight: np.ndarray | None = None, position_weight: np.ndarray | None = None) -> float:
    """W2S ``alignment="released"`` (:func:`unbackdoor.arrays.released_alignment`) in float64: the batch value.

    The released script takes the teacher's ``[B, D]`` projected states, indexes them ``[-1]`` (the last row)
    and broadcasts that vector against the student's ``[B, L, D]`` final-layer states, padding positions
    included, as ``mean(pairwise_distance(...)**2)``. (``pairwise_distance`` adds 1e-6 to each difference;
    that is left out here.)
    """
    optional = [None if a is None else _f64(a) for a in (weight, position_weight)]
    return float(arrays.released_alignment(_f64(states), _f64(teacher_hidden), reduce, *optional))


def reference_terms(spec: ArrayLoss, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, Term]:
    """``spec``'s definition (its ``terms``) evaluated on NumPy float64: ``{name: Term}``."""
    logits, hidden = _f64(outputs["logits"]), outputs.get("hidden")
    hidden = None if hidden is None else _f64(hidden)
    return spec.terms(arrays.namespace(logits), logits, hidden, {k: _f64(v) for k, v in batch.items()})


def _w2s_batch(labels: Any, teacher_logits: Any, teacher_hidden: Any, **optional: Any) -> dict[str, np.ndarray]:
    given = {k: v for k, v in optional.items() if v is not None}
    return {k: _f64(v) for k, v in dict(labels=labels, teacher_logits=teacher_logits, teacher_hidden=teacher_hidden,
                                        **given).items()}


def w2s_objective(spec: W2SLoss, student_logits: np.ndarray, labels: np.ndarray, teacher_logits: np.ndarray,
                  student_hidden: np.ndarray, teacher_hidden: np.ndarray, attention_mask: np.ndarray | None = None,
                  weight: np.ndarray | None = None, position_weight: np.ndarray | None = None) -> float:
    """The batch value one W2S step minimises: the (``weight``-weighted) row mean of :func:`w2s_loss`, or
    for ``alignment="released"`` the row mean of ``alpha*CE + beta*KD`` plus ``gamma`` times the batch's
    :func:`released_alignment`.

    ``student_hidden`` is ``[B, D]`` (pooled) or ``[B, L, D]`` (``tokens``, ``released``; see
    :attr:`~unbackdoor.specs.W2SLoss.token_states`), with ``attention_mask [B, L]``.
    """
    batch = _w2s_batch(labels, teacher_logits, teacher_hidden, attention_mask=attention_mask, weight=weight,
                       position_weight=position_weight)
    return float(objective(spec, _f64(student_logits), _f64(student_hidden), batch))


def w2s_loss(
    spec: W2SLoss,
    student_logits: np.ndarray,
    labels: np.ndarray,
    teacher_logits: np.ndarray,
    student_hidden: np.ndarray,
    teacher_hidden: np.ndarray,
    attention_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Per-example W2SDefense loss (for ``alignment="released"`` without its batch term: see :func:`w2s_objective`).

    Args:
        spec: the weights, temperature, alignment and reduction.
        student_logits: ``[B, C]``.
        labels: ``[B]``.
        teacher_logits: ``[B, C]`` from the frozen teacher.
        student_hidden: ``[B, D]`` the student's last-token final hidden state (``pooled``), or ``[B, L, D]``
            every position's (``tokens``, with ``attention_mask [B, L]``).
        teacher_hidden: ``[B, D]`` the teacher's pooled state after the projection g.

    Returns:
        ``[B]`` = ``alpha*CE + beta*T^2*KL + gamma*A`` (``A``: :func:`feature_alignment` or :func:`token_alignment`).
    """
    if spec.gamma and spec.alignment == "tokens" and attention_mask is None:
        raise ValueError("the tokens alignment needs the attention mask")
    batch = _w2s_batch(labels, teacher_logits, teacher_hidden, attention_mask=attention_mask)
    return per_row(spec, _f64(student_logits), _f64(student_hidden), batch)


def reference_loss(spec: LossSpec, outputs: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> float:
    """Batch loss of ``spec`` given model ``outputs`` and ``batch`` arrays: its definition (``terms``, any third
    party's too) evaluated in float64.

    ``outputs`` holds ``logits``, ``hidden`` when the spec reads it, and ``delta_norm`` (``||theta -
    theta_base||_2``, e.g. :func:`lora_delta_norm`) for a spec that ``reads_parameter_distance``.
    """
    if not is_array_loss(spec):
        raise TypeError(f"no reference implementation for loss spec {type(spec).__name__}: define its terms")
    if "delta_norm" in outputs:
        batch = {**batch, PARAMETER_DISTANCE: np.asarray(outputs["delta_norm"], np.float64)}
    weight = batch.get("weight")
    return float(combine(reference_terms(spec, outputs, batch), None if weight is None else _f64(weight)))  # type: ignore[arg-type]


def w2s_grads(
    spec: W2SLoss,
    student_logits: np.ndarray,
    labels: np.ndarray,
    teacher_logits: np.ndarray,
    student_hidden: np.ndarray,
    teacher_hidden: np.ndarray,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form gradients of the batch W2S objective (:func:`w2s_objective`, every row real) w.r.t. the
    student's logits and hidden states.

    Returns:
        ``(d/d logits [B, C], d/d hidden)``, the latter shaped like ``student_hidden`` (``[B, D]`` or ``[B, L, D]``).
    """
    b, c = student_logits.shape
    t = spec.temperature
    onehot = np.eye(c)[np.asarray(labels)]
    d_ce = softmax(student_logits) - onehot
    d_kd = t * (softmax(np.asarray(student_logits) / t) - softmax(np.asarray(teacher_logits) / t))
    d_logits = (spec.alpha * d_ce + spec.beta * d_kd) / b
    h = np.asarray(student_hidden, np.float64)
    v = np.asarray(teacher_hidden, np.float64)
    per_element = 1.0 if spec.reduction == "sum" else 1.0 / h.shape[-1]  # d/d diff of the reduced square: 2 diff / D
    if spec.alignment == "pooled":
        return d_logits, spec.gamma * 2.0 * per_element * (h - v) / b
    if spec.alignment == "tokens":
        mask = np.asarray(attention_mask, np.float64)
        share = mask / np.maximum(mask.sum(1, keepdims=True), 1.0) / b  # [B, L]: each real token's weight
        return d_logits, spec.gamma * 2.0 * per_element * share[..., None] * (h - v[:, None])
    share = np.full(h.shape[:2], 1.0 / (h.shape[0] * h.shape[1]))  # released: every position, one vector
    return d_logits, spec.gamma * 2.0 * per_element * share[..., None] * (h - v[-1])


def reset_labels(labels: np.ndarray, num_labels: int, spec: LabelResetLoss) -> np.ndarray:
    """PSIM's random labels: ``round(rate * N)`` seeded rows get a shuffled copy of their labels
    (``spec.labels == "shuffle"``) or each a uniformly drawn class (``"uniform"``).

    Shuffling keeps the class balance, so the reset set carries no signal about the content (but
    keeps the class prior); uniform labels carry neither. When the draw would leave every chosen
    label as it was (for instance, all chosen rows share one class), those rows instead get a
    uniformly drawn DIFFERENT class: a reset never leaves all chosen labels intact.

    Args:
        labels: ``[N]`` true labels.
        num_labels: number of classes C (>= 2).
        spec: the reset rate and seed.

    Returns:
        ``[N]`` labels, equal to ``labels`` outside the reset rows.
    """
    labels = np.asarray(labels, np.int64)
    rng = np.random.default_rng(spec.seed)
    rows = np.sort(rng.choice(len(labels), size=max(1, round(spec.reset_rate * len(labels))), replace=False))
    new = labels.copy()
    new[rows] = rng.permutation(labels[rows]) if spec.labels == "shuffle" else rng.integers(0, num_labels, len(rows))
    if np.array_equal(new[rows], labels[rows]):
        new[rows] = (labels[rows] + rng.integers(1, num_labels, len(rows))) % num_labels
    return new


# ------------------------------------------------------------------------------------------ unlearning


def group_weights(is_poisoned: np.ndarray, weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-row weights that turn weighted sums into the mean over the poisoned rows and over the clean rows.

    Args:
        is_poisoned: ``[B]`` 1 for rows to unlearn, 0 for rows to keep.
        weight: ``[B]`` 0/1 row weights (0: a filler row that counts in neither group); None: all 1.

    Returns:
        ``(w_p, w_c)``, each ``[B]``: ``w_p = p / max(sum p, 1)`` with ``p = is_poisoned * weight``, the
        same for the clean rows; a group absent from the batch gets all-zero weights, so its term is 0.
    """
    flag = np.asarray(is_poisoned, np.float64)
    weight = np.ones_like(flag) if weight is None else np.asarray(weight, np.float64)
    p, c = flag * weight, (1.0 - flag) * weight
    return p / max(p.sum(), 1.0), c / max(c.sum(), 1.0)


def adaptive_lambda(alpha: float, ref_logits: np.ndarray, logits: np.ndarray, w_p: np.ndarray,
                    per_row: bool = False) -> float | np.ndarray:
    """RGA's ``lambda = exp(-alpha * sum_i w_p[i] * KL(softmax(ref_i) || softmax(z_i)))`` (1 without poisoned rows).

    Args:
        alpha: the decay rate (>= 0).
        ref_logits: ``[B, C]`` the poisoned model's logits before unlearning.
        logits: ``[B, C]`` the current model's logits.
        w_p: ``[B]`` the poisoned-row weights of :func:`group_weights` (a mean over the batch's poisoned rows).
        per_row: return ``[B]`` ``lambda_i = exp(-alpha * KL_i)`` instead (1 on rows that are not poisoned).
    """
    rows = np.asarray(w_p) > 0
    kl = np.zeros(len(rows))
    kl[rows] = kl_divergence(np.asarray(ref_logits)[rows], np.asarray(logits)[rows])
    if per_row:
        return np.exp(-alpha * kl)
    return float(np.exp(-alpha * (np.asarray(w_p) * kl).sum()))


def npo_term(beta: float, ce: np.ndarray, ref_ce: np.ndarray) -> np.ndarray:
    """Per-row NPO loss ``-(2/beta) * log sigmoid(beta * (CE - CE_ref))``; ``[B]`` in and out."""
    x = beta * (np.asarray(ce, np.float64) - np.asarray(ref_ce, np.float64))
    return (2.0 / beta) * np.logaddexp(0.0, -x)  # -log sigmoid(x) = log(1 + exp(-x)), stable


def unlearning_loss(spec: UnlearningLoss, logits: np.ndarray, labels: np.ndarray, is_poisoned: np.ndarray,
                    ref_logits: np.ndarray | None = None, delta_norm: float = 0.0,
                    weight: np.ndarray | None = None) -> float:
    """Batch value of an unlearning loss (RGA, GA or NPO), written apart from the spec's ``terms`` (which
    :func:`reference_loss` evaluates) as their independent check; see :class:`unbackdoor.specs.AdaptiveGALoss`.

    Args:
        spec: the loss and its weights.
        logits: ``[B, C]`` the current model's logits.
        labels: ``[B]`` the rows' labels (a poisoned row's label is the one the attack gave it).
        is_poisoned: ``[B]`` 1 for rows to unlearn, 0 for rows to keep.
        ref_logits: ``[B, C]`` the poisoned model's logits (RGA's lambda, NPO's reference CE).
        delta_norm: ``||theta - theta_base||_2`` (RGA only; see :func:`lora_delta_norm`).
        weight: ``[B]`` 0/1 row weights (filler rows 0); None: all rows count.

    Returns:
        The scalar loss; every mean is over its group's rows of the batch (:func:`group_weights`).
    """
    w_p, w_c = group_weights(is_poisoned, weight)
    ce = cross_entropy(logits, labels)
    kept = (w_c * ce).sum()
    if isinstance(spec, AdaptiveGALoss):
        lam = adaptive_lambda(spec.alpha, ref_logits, logits, w_p, spec.lambda_per_row)  # type: ignore[arg-type]
        return float(-(lam * w_p * ce).sum() + kept + spec.beta * delta_norm)
    if isinstance(spec, GALoss):
        return float(-(w_p * ce).sum() + spec.clean_weight * kept)
    ref_ce = cross_entropy(ref_logits, labels)  # type: ignore[arg-type]
    return float((w_p * npo_term(spec.beta, ce, ref_ce)).sum() + spec.clean_weight * kept)


def unlearning_grads(spec: UnlearningLoss, logits: np.ndarray, labels: np.ndarray, is_poisoned: np.ndarray,
                     ref_logits: np.ndarray | None = None, weight: np.ndarray | None = None) -> np.ndarray:
    """Closed-form ``d loss / d logits`` ``[B, C]`` of :func:`unlearning_loss`, RGA's lambda held CONSTANT.

    Every loss is ``sum_i g_i * CE_i``-shaped in the logits, so the gradient is ``g_i * (softmax(z_i) -
    onehot(y_i))`` with ``g_i = -lambda w_p + w_c`` (RGA; ``lambda_i`` per row with ``lambda_per_row``),
    ``-w_p + clean_weight w_c`` (GA) or ``-2 w_p sigmoid(-beta (CE - CE_ref)) + clean_weight w_c`` (NPO).
    """
    w_p, w_c = group_weights(is_poisoned, weight)
    logits = np.asarray(logits, np.float64)
    d_ce = softmax(logits) - np.eye(logits.shape[1])[np.asarray(labels)]
    if isinstance(spec, AdaptiveGALoss):
        g = -adaptive_lambda(spec.alpha, ref_logits, logits, w_p, spec.lambda_per_row) * w_p + w_c  # type: ignore[arg-type]
    elif isinstance(spec, GALoss):
        g = -w_p + spec.clean_weight * w_c
    else:
        x = spec.beta * (cross_entropy(logits, labels) - cross_entropy(ref_logits, labels))  # type: ignore[arg-type]
        g = -2.0 * w_p / (1.0 + np.exp(x)) + spec.clean_weight * w_c
    return g[:, None] * d_ce


LoRAFactors = Sequence[tuple[np.ndarray, np.ndarray, float]]


def lora_delta_norm(factors: LoRAFactors) -> float:
    """``||theta - theta_base||_2`` of a LoRA adapter: ``sqrt(sum_l ||scaling_l * B_l A_l||_F^2)``.

    Args:
        factors: one ``(A [r, in], B [out, r], scaling)`` per adapted layer (peft's shapes).
    """
    return float(np.sqrt(sum(np.square(s * (np.asarray(b, np.float64) @ np.asarray(a, np.float64))).sum()
                             for a, b, s in factors)))


def anchored_distance(weights: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> float:
    """``||theta - theta_base||_2`` of a fully trained model: over every named tensor of ``base`` (the clean
    base weights a backend's ``anchor`` recorded), with ``weights`` the model's tensors of the same names."""
    return float(np.sqrt(sum(np.square(np.asarray(weights[k], np.float64) - np.asarray(w0, np.float64)).sum()
                             for k, w0 in base.items())))


def lora_delta_norm_grads(factors: LoRAFactors) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(d/dA, d/dB)`` of :func:`lora_delta_norm` per layer; zero where the norm is 0 (B = 0 at LoRA's init).

    With ``D_l = s_l B_l A_l`` and ``N`` the norm: ``dN/dA_l = s_l B_l^T D_l / N`` and ``dN/dB_l = s_l D_l A_l^T / N``.
    """
    norm = lora_delta_norm(factors)
    out = []
    for a, b, s in factors:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        delta = s * (b @ a) / norm if norm > 0 else np.zeros((b.shape[0], a.shape[1]))
        out.append((s * b.T @ delta, s * delta @ a.T))
    return out


def named_lora_factors(arrays: Mapping[str, np.ndarray], scaling: float) -> LoRAFactors:
    """peft-named adapter arrays (``...lora_A.weight`` / ``...lora_B.weight``) as :data:`LoRAFactors`."""
    prefixes = sorted(k.removesuffix(".lora_A.weight") for k in arrays if k.endswith(".lora_A.weight"))
    return [(arrays[f"{p}.lora_A.weight"], arrays[f"{p}.lora_B.weight"], scaling) for p in prefixes]
