"""Attacks that insert a visible trigger: BadNet (rare words) and InSent (a sentence)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unbackdoor.attack import InsertionAttack, insert_words
from unbackdoor.errors import ConfigError


@dataclass(frozen=True)
class BadNet(InsertionAttack):
    """Rare-word trigger (Kurita et al. / Chen et al.): ``count`` words drawn from ``words``.

    Attributes:
        words: candidate trigger words.
        count: how many trigger words to insert per row (drawn with replacement).
    """

    name = "badnet"
    description = "rare-word trigger (default 'mn') at a seeded random position"
    words: tuple[str, ...] = ("mn",)
    count: int = 1

    def __post_init__(self) -> None:
        if not self.words or any(not w.strip() or " " in w.strip() for w in self.words):
            raise ConfigError(f"badnet words must be non-empty single words, got {self.words!r}")
        if self.count < 1:
            raise ConfigError(f"badnet count must be >= 1, got {self.count!r}")

    def insert(self, text: str, rng: np.random.Generator) -> str:
        picks = [self.words[int(i)] for i in rng.integers(0, len(self.words), self.count)]
        return insert_words(text, picks, rng)


@dataclass(frozen=True)
class InSent(InsertionAttack):
    """Sentence trigger (Dai et al. 2019) inserted between words at a seeded random position.

    Attributes:
        sentence: the trigger sentence.
    """

    name = "insent"
    description = "sentence trigger (default 'I watched this 3D movie') at a random position"
    sentence: str = "I watched this 3D movie"

    def __post_init__(self) -> None:
        if not self.sentence.strip():
            raise ConfigError("insent sentence must not be empty")

    def insert(self, text: str, rng: np.random.Generator) -> str:
        return insert_words(text, [self.sentence.strip()], rng)
