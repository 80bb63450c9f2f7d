"""NumPy reference implementations of every loss: the parity oracle.

Pure functions, per-example outputs, float64 inside, shapes in the docstrings
(optax's style). Backends must agree with these to the tolerances stated in
the tests. Gradients are given in closed form for the parity tests.
"""

from __future__ import annotations

import numpy as np

from .specs import CrossEntropy, LabelResetLoss, LossSpec, W2SLoss


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable ``log softmax`` along ``axis``."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


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
    logp = log_softmax(logits)
    return -np.take_along_axis(logp, np.asarray(labels)[:, None], axis=-1)[:, 0]


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """Per-example ``KL(softmax(p) || softmax(q))``; both ``[B, C]``, returns ``[B]``."""
    logp, logq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(logp) * (logp - logq)).sum(-1)


def distillation(student_logits: np.ndarray, teacher_logits: np.ndarray, temperature: float) -> np.ndarray:
    """Per-example ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``; ``[B, C]`` in, ``[B]`` out."""
    t = float(temperature)
    return t * t * kl_divergence(np.asarray(teacher_logits) / t, np.asarray(student_logits) / t)


def feature_alignment(student_hidden: np.ndarray, teacher_hidden: np.ndarray) -> np.ndarray:
    """Per-example mean squared distance over the hidden dimension; ``[B, D]`` in, ``[B]`` out."""
    diff = np.asarray(student_hidden, np.float64) - np.asarray(teacher_hidden, np.float64)
    return (diff * diff).mean(-1)


def w2s_loss(
    spec: W2SLoss,
    student_logits: np.ndarray,
    labels: np.ndarray,
    teacher_logits: np.ndarray,
    student_hidden: np.ndarray,
    teacher_hidden: np.ndarray,
) -> np.ndarray:
    """Per-example W2SDefense loss.

    Args:
        spec: the weights and temperature.
        student_logits: ``[B, C]``.
        labels: ``[B]``.
        teacher_logits: ``[B, C]`` from the frozen teacher.
        student_hidden: ``[B, D]`` the student's last-token final hidden state.
        teacher_hidden: ``[B, D]`` the teacher's pooled state after the projection g.

    Returns:
        ``[B]`` = ``alpha*CE + beta*T^2*KL + gamma*mean_d (h_s - h_t)^2``.
    """
    return (
        spec.alpha * cross_entropy(student_logits, labels)
        + spec.beta * distillation(student_logits, teacher_logits, spec.temperature)
        + spec.gamma * feature_alignment(student_hidden, teacher_hidden)
    )


def reference_loss(spec: LossSpec, outputs: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> float:
    """Batch-mean loss of ``spec`` given model ``outputs`` (logits, hidden) and ``batch`` arrays."""
    if isinstance(spec, CrossEntropy):
        return float(cross_entropy(outputs["logits"], batch["labels"]).mean())
    if isinstance(spec, LabelResetLoss):
        return float(cross_entropy(outputs["logits"], batch["reset_labels"]).mean())
    if isinstance(spec, W2SLoss):
        return float(w2s_loss(spec, outputs["logits"], batch["labels"], batch["teacher_logits"],
                              outputs["hidden"], batch["teacher_hidden"]).mean())
    raise TypeError(f"no reference implementation for loss spec {type(spec).__name__}")


def w2s_grads(
    spec: W2SLoss,
    student_logits: np.ndarray,
    labels: np.ndarray,
    teacher_logits: np.ndarray,
    student_hidden: np.ndarray,
    teacher_hidden: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form gradients of the batch-MEAN W2S loss w.r.t. student logits and hidden.

    Returns:
        ``(d/d logits [B, C], d/d hidden [B, D])``.
    """
    b, c = student_logits.shape
    t = spec.temperature
    onehot = np.eye(c)[np.asarray(labels)]
    d_ce = softmax(student_logits) - onehot
    d_kd = t * (softmax(np.asarray(student_logits) / t) - softmax(np.asarray(teacher_logits) / t))
    d_logits = (spec.alpha * d_ce + spec.beta * d_kd) / b
    diff = np.asarray(student_hidden, np.float64) - np.asarray(teacher_hidden, np.float64)
    d_hidden = spec.gamma * 2.0 * diff / (diff.shape[-1] * b)
    return d_logits, d_hidden


def reset_labels(labels: np.ndarray, num_labels: int, spec: LabelResetLoss) -> np.ndarray:
    """PSIM's random labels: ``round(rate * N)`` seeded rows get a shuffled copy of their labels.

    Shuffling keeps the class balance, so the reset set carries no signal about the content.
    When the shuffle would leave every chosen label as it was (for instance, all chosen rows
    share one class), those rows instead get a uniformly drawn DIFFERENT class: a reset never
    leaves all chosen labels intact.

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
    new[rows] = rng.permutation(labels[rows])
    if np.array_equal(new[rows], labels[rows]):
        new[rows] = (labels[rows] + rng.integers(1, num_labels, len(rows))) % num_labels
    return new
