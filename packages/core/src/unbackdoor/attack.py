"""The attack contract.

An attack is a frozen dataclass whose fields are its options. A plugin
returns instances from the ``unbackdoor_attacks`` hook; the runner calls
:meth:`Attack.configure` with the user's options to get a tuned copy.
"""

from __future__ import annotations

import dataclasses
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .data import TextDataset
from .errors import ConfigError, UnknownNameError, check_range
from .options import configure, is_group


@dataclass(frozen=True)
class PoisonConfig:
    """How much to poison and towards which class.

    Attributes:
        target: the label the backdoor should force.
        rate: share of the training rows to poison, in [0, 1].
        clean_label: poison only rows already labelled ``target`` (labels untouched).
        seed: drives row choice and trigger placement.
        dataset: the task's registry name or path (attacks built on aligned files look them up).
        data_dir: where registry names are resolved (None: the default data dir).
    """

    target: int = 1
    rate: float = 0.1
    clean_label: bool = False
    seed: int = 0
    dataset: str = ""
    data_dir: str | None = None

    def validate(self, num_labels: int) -> PoisonConfig:
        """Check ranges against a task with ``num_labels`` classes."""
        if not 0 <= self.target < num_labels:
            raise ConfigError(f"target label must be in 0..{num_labels - 1}, got {self.target!r}")
        check_range("poison rate", self.rate, 0.0, 1.0)
        return self


@dataclass(frozen=True)
class Attack(ABC):
    """A backdoor attack on a text classifier."""

    name: ClassVar[str]
    description: ClassVar[str]
    #: True for attacks that only ever poison target-class rows and keep labels (ProAttack):
    #: they treat ``PoisonConfig.clean_label=False`` as True (contract checks rely on this flag).
    clean_label_only: ClassVar[bool] = False

    def configure(self, **options: Any) -> Attack:
        """A copy with ``options`` applied; unknown options raise a clear error."""
        return configure(self, f"attack {self.name!r}", options)

    @abstractmethod
    def poison_train(self, train: TextDataset, cfg: PoisonConfig) -> TextDataset:
        """Return the poisoned training set, with ``poisoned`` marking changed rows."""

    @abstractmethod
    def triggered_test(self, test: TextDataset, cfg: PoisonConfig) -> TextDataset:
        """Return a triggered copy of test rows of ALL classes, keeping their TRUE labels."""

    def triggered_tests(self, test: TextDataset, cfg: PoisonConfig) -> dict[str, TextDataset]:
        """One triggered copy of ``test`` per trigger, by trigger name (multi-trigger attacks override this)."""
        return {self.name: self.triggered_test(test, cfg)}

    def asr_test(self, test: TextDataset, cfg: PoisonConfig) -> TextDataset:
        """Triggered copies of the non-target test rows (the ASR set)."""
        return non_target(self.triggered_test(test, cfg), cfg.target)


@dataclass(frozen=True)
class InsertionAttack(Attack):
    """An attack that writes a trigger into the text itself (BadNet, InSent...).

    Subclasses implement :meth:`insert`; row choice, label flipping and the
    poisoned mask are shared here.
    """

    @abstractmethod
    def insert(self, text: str, rng: np.random.Generator) -> str:
        """Return ``text`` with the trigger inserted (placement drawn from ``rng``)."""

    def insert_many(self, texts: Sequence[str], rng: np.random.Generator) -> list[str]:
        """Insert the trigger into each of ``texts`` in order (multi-trigger attacks override this)."""
        return [self.insert(t, rng) for t in texts]

    def poison_train(self, train: TextDataset, cfg: PoisonConfig) -> TextDataset:
        cfg.validate(train.num_labels)
        rng = np.random.default_rng(cfg.seed)
        rows = choose_poison_rows(train.labels, cfg, rng)
        texts, labels = list(train.texts), train.labels.copy()
        for i, text in zip(rows, self.insert_many([texts[i] for i in rows], rng), strict=True):
            texts[i] = text
            labels[i] = cfg.target
        mask = np.zeros(len(train), bool)
        mask[rows] = True
        return TextDataset(texts, labels, f"{train.name}+{self.name}", train.label_names, mask, train.rows)

    def triggered_test(self, test: TextDataset, cfg: PoisonConfig) -> TextDataset:
        cfg.validate(test.num_labels)
        rng = np.random.default_rng(cfg.seed + 1)
        texts = self.insert_many(test.texts, rng)
        return TextDataset(texts, test.labels, f"{test.name}+{self.name}", test.label_names,
                           np.ones(len(test), bool), test.rows)


def non_target(triggered: TextDataset, target: int) -> TextDataset:
    """The rows of ``triggered`` whose true label is not ``target``."""
    return triggered.subset(np.flatnonzero(triggered.labels != target), triggered.name)


def choose_poison_rows(labels: np.ndarray, cfg: PoisonConfig, rng: np.random.Generator,
                       eligible: np.ndarray | None = None, what: str = "rows") -> np.ndarray:
    """Pick ``round(rate * N)`` rows to poison, seeded.

    Dirty-label attacks draw from rows NOT labelled ``target`` (their label is
    flipped); clean-label attacks draw only from rows already labelled ``target``.
    ``eligible`` (bool ``[N]``) narrows the pool further, e.g. to rows that have
    a paraphrase; ``what`` describes those rows in the error message.
    """
    want = round(cfg.rate * len(labels))
    ok = (labels == cfg.target) if cfg.clean_label else (labels != cfg.target)
    pool = np.flatnonzero(ok if eligible is None else ok & np.asarray(eligible, bool))
    if want > len(pool):
        kind = "target-class" if cfg.clean_label else "non-target"
        raise ConfigError(
            f"poison rate {cfg.rate} asks for {want} rows but only {len(pool)} {kind} {what} exist"
        )
    return np.sort(rng.choice(pool, size=want, replace=False))


POSITIONS = ("random", "start", "middle", "end")


def insert_words(text: str, words: Sequence[str], rng: np.random.Generator, position: str = "random") -> str:
    """Insert each of ``words`` at a word position: an independent random one, or the start/middle/end."""
    tokens = text.split()
    for word in words:
        tokens.insert(_slot(len(tokens), position, rng), word)
    return " ".join(tokens)


def _slot(n: int, position: str, rng: np.random.Generator) -> int:
    """Where a word goes among ``n`` tokens (only ``random`` draws from ``rng``)."""
    if position == "random":
        return int(rng.integers(0, n + 1))
    slots = {"start": 0, "middle": n // 2, "end": n}
    if position not in slots:
        raise UnknownNameError("trigger position", position, POSITIONS)
    return slots[position]


_SPLIT_NAME = re.compile(r"^(?P<task>.+)/(?P<split>train|dev|test)(?:\[[^\]]*\])?(?:\+.*)?$")


def split_of(name: str) -> tuple[str, str]:
    """``(task, split)`` from a dataset name such as ``"sst2/train[attacker]+badnet"``; ``("", "")`` if unnamed.

    :func:`unbackdoor.data.load_dataset` names splits ``"<task>/<split>"``; subsets may add a
    ``[...]`` suffix and attacks a ``+<attack>`` suffix.
    """
    match = _SPLIT_NAME.match(name)
    return (match["task"], match["split"]) if match else ("", "")


def task_of(data: TextDataset, cfg: PoisonConfig) -> str:
    """The task a dataset belongs to: from its name (a registry key for loaded data), else ``cfg.dataset``."""
    return split_of(data.name)[0] or cfg.dataset


@dataclass(frozen=True)
class Paraphraser(ABC):
    """Rewrites sentences in a given style or syntax (the trigger of SynAttack / StyleBkd).

    A plugin returns instances from the ``unbackdoor_paraphrasers`` hook; paraphrase attacks
    use one when the data has no aligned paraphrase files (option ``paraphraser=NAME``).
    """

    name: ClassVar[str]
    description: ClassVar[str]

    def configure(self, **options: Any) -> Paraphraser:
        """A copy with ``options`` applied; unknown options raise a clear error."""
        return configure(self, f"paraphraser {self.name!r}", options)

    @abstractmethod
    def paraphrase(self, texts: list[str], style: str) -> list[str]:
        """One rewrite of each of ``texts`` in ``style`` (a style name or a syntactic template), in order."""


def fields_of(obj: object) -> dict[str, Any]:
    """An attack's or defense's options as a plain dict (for reports and cache keys); a group option (a
    dataclass value, such as ``psim+rga``'s ``psim``) as a dict of its own."""
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}  # type: ignore[arg-type]


def _plain(value: Any) -> Any:
    return fields_of(value) if is_group(value) else value
