"""Metrics: clean accuracy, attack success rate, unlearning figures and detection quality (percentages unless noted).

Unlearning (RGA's paper): CACC is the clean accuracy (CA); LFR, the label flip rate, is the share of
triggered NON-target inputs predicted as the target (the ASR); PACC is the accuracy on triggered inputs
of ALL classes against their TRUE labels; delta-PACC is ``|PACC - PACC(retrain)|``. A defense that only
moves the trigger's effect to another class ("trigger shifting") lowers LFR but not PACC's gap.
"""

from __future__ import annotations

import numpy as np


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Percentage of ``predicted`` equal to ``labels`` (CA on a clean test set); both ``[N]``."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.shape != labels.shape:
        raise ValueError(f"predictions {predicted.shape} and labels {labels.shape} differ in shape")
    return float((predicted == labels).mean() * 100) if len(labels) else float("nan")


def attack_success_rate(predicted: np.ndarray, true_labels: np.ndarray, target: int) -> float:
    """ASR: percentage of triggered NON-target rows predicted as ``target``.

    Args:
        predicted: ``[N]`` predictions on triggered inputs.
        true_labels: ``[N]`` the rows' true labels; rows already of class ``target`` are ignored.
        target: the backdoor's target class.
    """
    predicted, true_labels = np.asarray(predicted), np.asarray(true_labels)
    keep = true_labels != target
    return float((predicted[keep] == target).mean() * 100) if keep.any() else float("nan")


def label_flip_rate(predicted: np.ndarray, true_labels: np.ndarray, target: int) -> float:
    """LFR: the :func:`attack_success_rate` under the name the unlearning papers use."""
    return attack_success_rate(predicted, true_labels, target)


def poisoned_accuracy(predicted: np.ndarray, true_labels: np.ndarray) -> float:
    """PACC: percentage of triggered inputs of ALL classes predicted as their TRUE label; both ``[N]``."""
    return accuracy(predicted, true_labels)


def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% at ``z=1.96``) of a percentage ``rate`` measured on ``n`` rows, in %.

    The count of successes is recovered as ``round(rate * n / 100)`` (rates are stored rounded to 0.01).
    """
    if n < 1:
        return float("nan"), float("nan")
    successes = round(rate * n / 100)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the edges (no float residue)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return float(100 * low), float(100 * high)


def delta_pacc(pacc: float, retrain_pacc: float) -> float:
    """delta-PACC: ``|PACC - PACC(retrain)|`` in points (0: as good as retraining without the poisoned rows)."""
    return abs(float(pacc) - float(retrain_pacc))


def triggered_confusion(predicted: np.ndarray, true_labels: np.ndarray, num_labels: int) -> np.ndarray:
    """Counts ``[C, C]`` of triggered inputs: row = true class, column = predicted class.

    Trigger shifting shows as mass leaving the diagonal for a column other than the target's.
    Predictions outside ``0..C-1`` (a detector's rejection, -1) are not counted.
    """
    predicted, true_labels = np.asarray(predicted, np.int64), np.asarray(true_labels, np.int64)
    if predicted.shape != true_labels.shape:
        raise ValueError(f"predictions {predicted.shape} and labels {true_labels.shape} differ in shape")
    keep = (predicted >= 0) & (predicted < num_labels)
    out = np.zeros((num_labels, num_labels), np.int64)
    np.add.at(out, (true_labels[keep], predicted[keep]), 1)
    return out


def detection_scores(flagged: np.ndarray, poisoned: np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 (in [0, 1]) of ``flagged`` against the truth ``poisoned``; both bool ``[N]``."""
    flagged, poisoned = np.asarray(flagged, bool), np.asarray(poisoned, bool)
    tp = float((flagged & poisoned).sum())
    precision = tp / flagged.sum() if flagged.any() else 0.0
    recall = tp / poisoned.sum() if poisoned.any() else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}


def auroc(scores: np.ndarray, poisoned: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the positives ``poisoned`` (ties count one half).

    Computed as the Mann-Whitney U statistic from average ranks, O(N log N).
    """
    scores, poisoned = np.asarray(scores, np.float64), np.asarray(poisoned, bool)
    n_pos, n_neg = int(poisoned.sum()), int((~poisoned).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]  # 1-based ranks, averaged over ties
    return float((ranks[poisoned].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mean_token_nll(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """NumPy reference of :meth:`unbackdoor.backend.Backend.lm_nll` on one padded batch.

    Args:
        logits: ``[B, L, V]`` causal-LM logits; position ``t`` predicts ``ids[:, t + 1]``.
        ids: ``[B, L]`` token ids (start token first), right-padded.
        mask: ``[B, L]`` 1 for real tokens, 0 for padding.

    Returns:
        ``[B]`` mean NLL (natural log) over each row's predicted real tokens; NaN for rows with none.
    """
    logits = np.asarray(logits, np.float64)[:, :-1]
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, np.asarray(ids)[:, 1:, None], -1)[..., 0]
    weight = np.asarray(mask, np.float64)[:, 1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (nll * weight).sum(-1) / weight.sum(-1)
