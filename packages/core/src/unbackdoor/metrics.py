"""Metrics: clean accuracy and attack success rate (in percent)."""

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
