"""The auditor contract: is a released sequence classifier backdoored, and by what?

An auditor is a frozen dataclass whose fields are its options (like a defense). It gets an
:class:`AuditContext` (the backend, the classifier's directory, clean rows of its task, an optional
clean reference model) and returns an :class:`AuditResult`: a verdict, a score, the suspected target
class and ranked trigger candidates. :func:`unbackdoor.auditing.audit` checks the inputs and writes
the report.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .backend import Backend
from .data import TextDataset
from .options import configure

#: the verdicts an auditor may return
VERDICTS = ("backdoored", "clean")


@dataclass
class AuditContext:
    """What the audit hands an auditor.

    Attributes:
        backend: the selected backend.
        model_path: the audited classifier, a directory saved in :mod:`unbackdoor.layout`.
        clean: clean rows of the model's task (checked: the model's label count, enough rows per class).
        num_labels: classes of the model's head.
        reference_path: a clean classifier of the same task and tokenizer that screens out universal
            adversarial words (None: no screening).
        seed: seed of every random choice (row splits, trigger initialisation).
        log: where progress lines go.
    """

    backend: Backend
    model_path: Path
    clean: TextDataset
    num_labels: int
    reference_path: Path | None = None
    seed: int = 0
    log: Callable[[str], None] = print


@dataclass(frozen=True)
class TriggerCandidate:
    """One recovered trigger.

    Attributes:
        text: the trigger as text (the tokens decoded).
        tokens: the token strings (the tokenizer's own spelling).
        ids: the token ids.
        target: the class the trigger pushes rows to.
        flip_rate: share of held-out clean rows of the other classes (not already predicted ``target``)
            that the model predicts as ``target`` once the trigger is inserted.
        reference_flip_rate: the same on the reference model (None: no reference).
        score: what candidates are ranked by: ``flip_rate``, minus ``reference_flip_rate`` when there is one.
    """

    text: str
    tokens: tuple[str, ...]
    ids: tuple[int, ...]
    target: int
    flip_rate: float
    reference_flip_rate: float | None
    score: float


@dataclass(frozen=True)
class AuditResult:
    """An auditor's answer.

    Attributes:
        verdict: ``backdoored`` or ``clean`` (:data:`VERDICTS`).
        score: the evidence, higher means more likely backdoored (the auditor documents its scale).
        threshold: ``score > threshold`` gives ``backdoored``.
        target: the suspected target class (the best candidate's), None when there is no candidate.
        candidates: ranked best first, across every target class.
        stats: auditor-specific figures (per-target scores, seconds...).
    """

    verdict: str
    score: float
    threshold: float
    target: int | None
    candidates: tuple[TriggerCandidate, ...]
    stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (candidates as dicts, tuples as lists)."""
        out = asdict(self)
        out["candidates"] = [asdict(c) | {"tokens": list(c.tokens), "ids": list(c.ids)} for c in self.candidates]
        return out


@dataclass(frozen=True)
class Auditor(ABC):
    """A backdoor auditor."""

    name: ClassVar[str]
    description: ClassVar[str]
    #: optional :class:`~unbackdoor.backend.Backend` methods the auditor calls; the audit refuses a backend
    #: without them before any compute, naming the backend and the ones that have them
    backend_methods: ClassVar[tuple[str, ...]] = ()

    def configure(self, **options: Any) -> Auditor:
        """A copy with ``options`` applied; unknown options raise a clear error."""
        return configure(self, f"auditor {self.name!r}", options)

    def min_rows_per_class(self) -> int:
        """The fewest clean rows of each class the auditor needs (checked before any compute)."""
        return 1

    @abstractmethod
    def audit(self, ctx: AuditContext) -> AuditResult:
        """Audit ``ctx.model_path`` on ``ctx.clean``."""
