"""Multi-trigger attack: several rare words and/or sentences planted in one model."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from unbackdoor.attack import InsertionAttack, PoisonConfig, insert_words
from unbackdoor.data import TextDataset
from unbackdoor.errors import ConfigError

from .insertion import check_position


@dataclass(frozen=True)
class MultiTrigger(InsertionAttack):
    """Several triggers; each poisoned row carries one, assigned round-robin over a seeded order.

    Every trigger gets the same number of poisoned rows (give or take one). The runner evaluates
    each trigger on its own test set (:meth:`triggered_tests`) and reports ASR per trigger.

    Attributes:
        triggers: rare words and/or sentences (``"cf, I watched this 3D movie"`` on the command line).
        positions: ``random`` (default), ``start``, ``middle`` or ``end``.
    """

    name = "multi"
    description = "several triggers (words and/or sentences), one per poisoned row, ASR reported per trigger"
    triggers: tuple[str, ...] = ("cf", "I watched this 3D movie")
    positions: str = "random"

    def __post_init__(self) -> None:
        cleaned = [t.strip() for t in self.triggers]
        if not cleaned or not all(cleaned) or len(set(cleaned)) != len(cleaned):
            raise ConfigError(f"multi triggers must be distinct non-empty strings, got {self.triggers!r}")
        check_position(self.name, self.positions)

    def insert(self, text: str, rng: np.random.Generator) -> str:
        trigger = self.triggers[int(rng.integers(len(self.triggers)))]
        return insert_words(text, [trigger.strip()], rng, self.positions)

    def insert_many(self, texts: Sequence[str], rng: np.random.Generator) -> list[str]:
        """Trigger ``k % len(triggers)`` goes to the row at place ``k`` of a seeded permutation."""
        which = rng.permutation(len(texts)) % len(self.triggers)
        return [insert_words(t, [self.triggers[w].strip()], rng, self.positions) for t, w in zip(texts, which, strict=True)]

    def triggered_tests(self, test: TextDataset, cfg: PoisonConfig) -> dict[str, TextDataset]:
        """One triggered copy of ``test`` per trigger, keyed by the trigger."""
        out = {}
        for trigger in self.triggers:
            single = dataclasses.replace(self, triggers=(trigger,)).triggered_test(test, cfg)
            out[trigger.strip()] = single.subset(np.arange(len(single)), f"{test.name}+{self.name}[{trigger.strip()}]")
        return out
