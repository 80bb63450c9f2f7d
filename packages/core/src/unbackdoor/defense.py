"""The defense contract.

A defense is a frozen dataclass whose fields are its options. Removal
defenses return a model to evaluate; detection defenses (later) also return
per-input scores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from .backend import Backend
from .cache import StageCache
from .data import TextDataset
from .options import configure
from .specs import LoRASpec, TrainSpec


@dataclass
class DefenseContext:
    """What the runner hands a defense.

    Attributes:
        backend: the selected backend.
        victim_path: the (possibly poisoned) released classifier, a HF-format directory.
        teacher_path: the small clean model a defense may distil from.
        clean_train: the user's clean training rows.
        clean_dev: held-out clean rows a defense may validate on (never the test set).
        num_labels: classes in the task.
        lora: the user's LoRA adapter spec.
        train: the user's fine-tuning spec (epochs, lr, batch, ...).
        cache: stage cache, so artefacts (a teacher) are built once per config.
        cache_key: config facts the cache keys of this run's artefacts must include.
        log: where progress lines go.
        student_path: the clean BASE student (HF directory) the victim was fine-tuned from, for
            defenses that train a clean reference model (``merge``); None when the runner does not say.
        victim_train: the data-poisoning setting: the attacker's training rows the victim was fine-tuned
            on, with ``poisoned`` marking the poisoned rows (unlearning defenses assume they are known, as
            RGA does); None when the runner does not say.
        attacker_spec: how the victim was fine-tuned on ``victim_train`` (``retrain`` repeats it on the clean rows).
    """

    backend: Backend
    victim_path: Path
    teacher_path: Path | None
    clean_train: TextDataset
    clean_dev: TextDataset | None
    num_labels: int
    lora: LoRASpec
    train: TrainSpec
    cache: StageCache
    cache_key: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = print
    student_path: Path | None = None
    #: clean rows a teacher learns from (data-poisoning setting: the defender's trusted set); None: ``clean_train``
    teacher_train: TextDataset | None = None
    victim_train: TextDataset | None = None
    attacker_spec: TrainSpec | None = None


@dataclass
class DefenseOutcome:
    """A defense's result: the model to evaluate and figures for the report.

    Attributes:
        model: the (possibly repaired) model that classifies the inputs.
        stats: figures for the report (training stats...).
        detector: for detection defenses, scores inputs; flagged inputs are rejected.
        transform: for input-purifying defenses (ONION, paraphrasing), rewrites inputs before the model.
    """

    model: Any
    stats: dict[str, Any] = field(default_factory=dict)
    detector: Detector | None = None
    transform: Callable[[Sequence[str]], list[str]] | None = None


class Detector(Protocol):
    """Scores inputs: higher means more likely poisoned; ``score > threshold`` is flagged."""

    threshold: float

    def score(self, data: TextDataset) -> np.ndarray:
        """One suspicion score per row, ``[N]`` float."""


@dataclass(frozen=True)
class Defense(ABC):
    """A backdoor defense."""

    name: ClassVar[str]
    description: ClassVar[str]
    kind: ClassVar[str] = "removal"
    #: the poisoning settings (``--setting``) the defense applies in: ``weight`` (a poisoned released model,
    #: clean user rows) and ``data`` (the clean base student, poisoned user rows); a defense that acts on
    #: the released model's weights says ``("weight",)`` and the runner refuses it with ``--setting data``
    settings: ClassVar[tuple[str, ...]] = ("weight", "data")
    #: the defense distils from ``ctx.teacher_path``: the runner checks and resolves the teacher (``--teacher``)
    #: only for such defenses, so a run without one needs no teacher package (the others get ``None``)
    uses_teacher: ClassVar[bool] = False

    def configure(self, **options: Any) -> Defense:
        """A copy with ``options`` applied; unknown options raise a clear error."""
        return configure(self, f"defense {self.name!r}", options)

    @abstractmethod
    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        """Run the defense on ``ctx.victim_path`` and return the defended model."""
