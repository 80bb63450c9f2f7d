"""Evaluation: CA, ASR, PACC, the triggered confusion and, for detectors, detection quality and a threshold sweep.

The runner (:mod:`unbackdoor.runner`) trains; an :class:`Evaluator` measures a model on the run's clean
test rows and the attack's triggered copies of them, through the backend's ``predict`` (and a defense's
detector or input transform, when its outcome has one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from .attack import non_target
from .backend import Backend
from .data import TextDataset
from .defense import DefenseOutcome
from .losses import softmax
from .metrics import accuracy, attack_success_rate, auroc, detection_scores, poisoned_accuracy, triggered_confusion
from .plots import pca_2d


@dataclass
class Judged:
    """Predictions on one evaluation set, with the detector's verdicts when there is one."""

    predictions: np.ndarray
    confidence: np.ndarray
    scores: np.ndarray | None = None
    flagged: np.ndarray | None = None
    hidden: np.ndarray | None = None

    def at(self, threshold: float) -> Judged:
        """The same verdicts with another detection threshold."""
        return dataclasses.replace(self, flagged=self.scores > threshold)  # type: ignore[operator]

    @property
    def kept_predictions(self) -> np.ndarray:
        """Predictions with rejected (flagged) inputs set to -1, a class nobody has."""
        return self.predictions if self.flagged is None else np.where(self.flagged, -1, self.predictions)


def _detection(scores: list[np.ndarray | None], flagged: list[np.ndarray | None]) -> dict[str, float]:
    """Detection quality: clean test rows are negatives, every triggered set's rows positives; with the counts
    precision (``flagged``) and recall (``positives``) are measured on."""
    truth = np.concatenate([np.full(len(s), i > 0) for i, s in enumerate(scores)])  # type: ignore[arg-type]
    result = detection_scores(np.concatenate(flagged), truth)  # type: ignore[arg-type]
    result["auroc"] = auroc(np.concatenate(scores), truth)  # type: ignore[arg-type]
    counts = {"flagged": int(np.concatenate(flagged).sum()), "positives": int(truth.sum())}  # type: ignore[arg-type]
    return {**{k: round(v, 4) for k, v in result.items()}, **counts}


def _per_trigger(counts: dict[str, int]) -> int | dict[str, int]:
    """Row counts by trigger, or the one number when there is a single trigger."""
    return next(iter(counts.values())) if len(counts) == 1 else counts


def _hidden_pca(clean: np.ndarray | None, triggered: np.ndarray | None) -> dict[str, list[list[float]]]:
    """Pooled hidden states of clean and (first trigger's) triggered test rows, projected together to 2-D."""
    if clean is None or triggered is None:
        return {}
    points = pca_2d(np.concatenate([clean, triggered]))
    rounded = [[round(float(x), 4), round(float(y), 4)] for x, y in points]
    return {"clean": rounded[: len(clean)], "triggered": rounded[len(clean):]}


def _floats(*arrays: np.ndarray | None) -> list[float]:
    """Arrays as one rounded list (for results.json)."""
    return [round(float(x), 5) for a in arrays if a is not None for x in a]


@dataclass
class Evaluator:
    """Measures models on one run's test rows (:meth:`evaluate`).

    Attributes:
        backend: predicts.
        test: the clean test rows (true labels).
        triggered: the attack's triggered copies of the test rows, per trigger (true labels).
        target: the attack's target class.
        batch_size, max_length: the predictions' batch rows and token cap.
    """

    backend: Backend
    test: TextDataset
    triggered: dict[str, TextDataset]
    target: int
    batch_size: int
    max_length: int

    def evaluate(self, model: Any, desc: str, outcome: DefenseOutcome | None = None) -> dict[str, Any]:
        """CA on clean test rows; ASR on triggered non-target copies (per trigger when there are several).

        PACC (accuracy of triggered rows of ALL classes against their true labels; the worst trigger) and
        the triggered confusion per trigger (``[true][predicted]`` counts) make trigger shifting visible.

        With a detector, flagged inputs are rejected: a flagged clean input counts as an error (CA) and a
        flagged triggered input as a failed attack (ASR); the model's own figures stay as CA_model/ASR_model
        and detection precision/recall/F1/AUROC are added. With a transform, inputs are rewritten first.
        """
        clean = self._judge(model, self.test, f"{desc}: clean test", outcome)
        metrics: dict[str, Any] = {"CA": round(accuracy(clean.kept_predictions, self.test.labels), 2)}
        asr, scores, flagged, confidence, pacc, confusion = {}, [clean.scores], [clean.flagged], [], {}, {}
        triggered_judged: list[tuple[TextDataset, Judged]] = []
        for trigger, triggered in self.triggered.items():
            asr_set = non_target(triggered, self.target)
            judged = self._judge(model, asr_set, f"{desc}: {trigger} test", outcome)
            triggered_judged.append((asr_set, judged))
            confidence.append(judged.confidence)
            asr[trigger] = round(attack_success_rate(judged.kept_predictions, asr_set.labels, self.target), 2)
            pacc[trigger], confusion[trigger] = self._pacc(model, triggered, judged, f"{desc}: {trigger} test", outcome)
            scores.append(judged.scores)
            flagged.append(judged.flagged)
            if judged.scores is not None:
                metrics.setdefault("ASR_model_by_trigger", {})[trigger] = round(
                    attack_success_rate(judged.predictions, asr_set.labels, self.target), 2)
        metrics["ASR"] = max(asr.values())
        if len(asr) > 1:
            metrics["ASR_by_trigger"] = asr
        metrics["PACC"] = min(pacc.values())
        if len(pacc) > 1:
            metrics["PACC_by_trigger"] = pacc
        metrics["triggered_confusion"] = confusion
        metrics["hidden_pca"] = _hidden_pca(clean.hidden, triggered_judged[0][1].hidden)
        if clean.scores is not None:
            metrics["CA_model"] = round(accuracy(clean.predictions, self.test.labels), 2)
            metrics["ASR_model"] = max(metrics.pop("ASR_model_by_trigger").values())
            metrics["detection"] = {**_detection(scores, flagged), "threshold": outcome.detector.threshold}  # type: ignore[union-attr]
            metrics["detector_scores"] = {"clean": _floats(clean.scores), "triggered": _floats(*scores[1:])}
            metrics["model_confidence"] = {"clean": _floats(clean.confidence), "triggered": _floats(*confidence)}
            sweep = getattr(outcome.detector, "thresholds", ()) if outcome else ()
            if sweep:
                metrics["threshold_sweep"] = self._sweep(sweep, clean, triggered_judged)
        return metrics

    def _pacc(self, model: Any, triggered: TextDataset, non_target_judged: Judged, desc: str,
              outcome: DefenseOutcome | None) -> tuple[float, list[list[int]]]:
        """PACC and the ``[C, C]`` confusion (true x predicted) of the triggered rows of ALL classes.

        Both describe the model's own predictions (a detector's rejections are not applied; a transform
        is); the non-target rows reuse ``non_target_judged``, only the target-class rows are predicted here.
        """
        target = self.target
        rest = triggered.subset(np.flatnonzero(triggered.labels == target))
        pred = non_target_judged.predictions
        if len(rest):
            plain = None if outcome is None else dataclasses.replace(outcome, detector=None)
            pred = np.concatenate([pred, self._judge(model, rest, desc, plain).predictions])
        labels = np.concatenate([non_target(triggered, target).labels, rest.labels])
        return (round(poisoned_accuracy(pred, labels), 2),
                triggered_confusion(pred, labels, self.test.num_labels).tolist())

    def _sweep(self, thresholds: tuple[float, ...], clean: Judged, triggered: list[tuple[TextDataset, Judged]]
               ) -> list[dict[str, float]]:
        """Detection and end-to-end figures at each threshold, from the scores already computed."""
        target, rows = self.target, []
        for t in thresholds:
            at = [j.at(t) for _, j in triggered]
            flagged = [clean.scores > t, *[j.flagged for j in at]]  # type: ignore[operator]
            truth = np.concatenate([np.full(len(f), i > 0) for i, f in enumerate(flagged)])
            asr = max(attack_success_rate(j.kept_predictions, d.labels, target) for (d, _), j in zip(triggered, at,
                                                                                                       strict=True))
            rows.append({"threshold": t, **detection_scores(np.concatenate(flagged), truth),
                         "CA": round(accuracy(clean.at(t).kept_predictions, self.test.labels), 2),
                         "ASR": round(asr, 2)})
        return rows

    def _judge(self, model: Any, data: TextDataset, desc: str, outcome: DefenseOutcome | None) -> Judged:
        if outcome is not None and outcome.transform is not None:
            data = dataclasses.replace(data, texts=tuple(outcome.transform(data.texts)))
        out = self.backend.predict(model, data, batch_size=self.batch_size, max_length=self.max_length, hidden=True,
                                   desc=desc)
        pred, confidence = out.logits.argmax(-1), softmax(out.logits).max(-1)
        detector = outcome.detector if outcome is not None else None
        if detector is None:
            return Judged(pred, confidence, hidden=out.hidden)
        scores = np.asarray(detector.score(data), np.float64)
        return Judged(pred, confidence, scores, scores > detector.threshold, out.hidden)

    def asr_rows(self) -> int | dict[str, int]:
        """How many triggered rows each ASR is measured on (one number for a single trigger)."""
        return _per_trigger({trigger: len(non_target(data, self.target)) for trigger, data in self.triggered.items()})

    def pacc_rows(self) -> int | dict[str, int]:
        """How many triggered rows (every class) each PACC is measured on (one number for a single trigger)."""
        return _per_trigger({trigger: len(data) for trigger, data in self.triggered.items()})
