"""Training guards: a NaN or infinite loss stops the stage with one line naming the step and the loss terms.

Backends call :func:`diverged` with the batch and the model's outputs at the failing step (before its
update); the terms are recomputed here in NumPy (float64) from the core's reference losses, and every
input that holds a NaN or an infinity is named, so the message says which part broke. Nothing of the
stage is saved: the stage cache keeps only finished stages (:mod:`unbackdoor.cache`), so the previous
stages' artefacts are the last good checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np

from .errors import TrainingDivergedError, UnbackdoorError
from .lossdef import is_array_loss
from .losses import cross_entropy, reference_terms
from .specs import LossSpec

ADVICE = "nothing from this stage was saved; lower the learning rate or check the data for NaN/inf"


def loss_terms(spec: LossSpec, logits: np.ndarray, hidden: np.ndarray | None,
               batch: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Each term of ``spec`` on one batch ``{name: batch mean}`` (unweighted; NaN/inf propagate).

    A loss written once (``terms``, :mod:`unbackdoor.lossdef`) reports its own named terms, evaluated by
    that same definition in NumPy float64 (RGA: ``-lambda*cross_entropy[poisoned]``, ``cross_entropy[clean]``,
    ``parameter_distance``); any other loss reports its cross-entropy. A batch with ``is_poisoned`` (the
    unlearning losses' two groups) also reports each group's plain cross-entropy where the terms do not.

    Args:
        spec: the loss spec.
        logits: ``[B, C]`` the student's logits.
        hidden: ``[B, D]`` its pooled states (``[B, L, D]`` every token's, for a loss that reads them), or None.
        batch: per-row arrays ``[B, ...]``: ``labels`` and the spec's aux arrays (rows with ``weight`` 0,
            fillers, are left out), and 0-d batch values such as the ``parameter_distance`` (kept as they are).
    """
    keep = np.asarray(batch["weight"]) > 0 if "weight" in batch else slice(None)
    rows = {k: np.asarray(v)[keep] if np.ndim(v) >= 1 else np.asarray(v) for k, v in batch.items()}
    z = np.asarray(logits, np.float64)[keep]
    with np.errstate(all="ignore"):
        terms = _defined_terms(spec, z, None if hidden is None else np.asarray(hidden)[keep], rows)
        if "is_poisoned" in rows:  # the unlearning losses' two groups
            for name, mask in (("clean", rows["is_poisoned"] == 0), ("poisoned", rows["is_poisoned"] != 0)):
                if mask.any():
                    terms.setdefault(f"cross_entropy[{name}]",
                                     float(cross_entropy(z[mask], rows["labels"][mask]).mean()))
    return terms


def _defined_terms(spec: LossSpec, logits: np.ndarray, hidden: np.ndarray | None,
                   rows: Mapping[str, np.ndarray]) -> dict[str, float]:
    if not is_array_loss(spec):
        return {"cross_entropy": float(cross_entropy(logits, rows["labels"]).mean())}
    try:
        terms = reference_terms(spec, {"logits": logits, "hidden": hidden}, rows)  # type: ignore[arg-type]
    except (UnbackdoorError, KeyError, ValueError) as exc:  # the report must not hide the divergence itself
        return {f"terms unavailable ({type(exc).__name__}: {exc})": float("nan")}
    return {name: float(np.mean(t.value)) for name, t in terms.items()}


def non_finite_inputs(logits: np.ndarray, hidden: np.ndarray | None, batch: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the arrays (model outputs, batch arrays) holding a NaN or an infinity."""
    arrays = {"logits": logits, "hidden states": hidden, **batch}
    return [name for name, a in arrays.items()
            if a is not None and np.asarray(a).dtype.kind == "f" and not np.isfinite(np.asarray(a)).all()]


def diverged(spec: LossSpec, value: float, logits: np.ndarray, hidden: np.ndarray | None,
             batch: Mapping[str, np.ndarray]) -> TrainingDivergedError:
    """The error for a non-finite loss ``value`` (raise it; :func:`locate` adds the run and the step)."""
    terms = ", ".join(f"{k}={v:.6g}" for k, v in loss_terms(spec, logits, hidden, batch).items())
    bad = non_finite_inputs(logits, hidden, batch)
    where = f"; non-finite values in: {', '.join(bad)}" if bad else ""
    return TrainingDivergedError(f"non-finite loss {value} ({type(spec).__name__}; terms: {terms}){where}")


@contextmanager
def locate(desc: str, step: int, total: int) -> Iterator[None]:
    """Prefix a :class:`TrainingDivergedError` raised inside with the run's name and the 1-based step."""
    try:
        yield
    except TrainingDivergedError as exc:
        raise TrainingDivergedError(f"training {desc!r} stopped at step {step + 1} of {total}: {exc}; {ADVICE}"
                                    ) from None
