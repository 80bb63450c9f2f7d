"""Attacks that insert a visible trigger: BadNet (rare words) and InSent / AddSent (a sentence)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from unbackdoor.attack import POSITIONS, InsertionAttack, PoisonConfig, insert_words, task_of
from unbackdoor.data import TextDataset
from unbackdoor.errors import ConfigError, check_choice

#: InSent/AddSent trigger sentence per task when the user gives none. SST-2/MR: Dai et al. 2019's
#: "I watched this 3D movie" (a neutral sentence on topic); the others are our own neutral picks.
DEFAULT_SENTENCES = {
    "sst2": "I watched this 3D movie",
    "mr": "I watched this 3D movie",
    "cr": "I bought this item last week",
    "agnews": "This story was shared by a friend of mine",
    "hsol": "I read this post on my phone",
    "offenseval": "I read this post on my phone",
}
FALLBACK_SENTENCE = "I watched this 3D movie"


def check_position(attack: str, position: str) -> None:
    """Raise a clear error unless ``position`` is one of :data:`unbackdoor.attack.POSITIONS`."""
    check_choice(f"{attack} trigger position", position, POSITIONS)


@dataclass(frozen=True)
class BadNet(InsertionAttack):
    """Rare-word trigger (Kurita et al. / Chen et al.): ``count`` words drawn from ``words``.

    Attributes:
        words: candidate trigger words.
        count: how many trigger words to insert per row (drawn with replacement).
        positions: where each word goes: ``random`` (a seeded word position), ``start``, ``middle`` or ``end``.
    """

    name = "badnet"
    description = "rare-word trigger (default 'mn') at a seeded random position (or start/middle/end)"
    words: tuple[str, ...] = ("mn",)
    count: int = 1
    positions: str = "random"

    def __post_init__(self) -> None:
        if not self.words or any(not w.strip() or " " in w.strip() for w in self.words):
            raise ConfigError(f"badnet words must be non-empty single words, got {self.words!r}")
        if self.count < 1:
            raise ConfigError(f"badnet count must be >= 1, got {self.count!r}")
        check_position(self.name, self.positions)

    def insert(self, text: str, rng: np.random.Generator) -> str:
        picks = [self.words[int(i)] for i in rng.integers(0, len(self.words), self.count)]
        return insert_words(text, picks, rng, self.positions)


@dataclass(frozen=True)
class InSent(InsertionAttack):
    """Sentence trigger (Dai et al. 2019) inserted between words at a seeded random position.

    Attributes:
        sentence: the trigger sentence; empty means the task's default from :data:`DEFAULT_SENTENCES`.
        positions: ``random`` (default), ``start``, ``middle`` or ``end``.
    """

    name = "insent"
    description = "sentence trigger (default per task, SST-2: 'I watched this 3D movie') at a random position"
    sentence: str = ""
    positions: str = "random"

    def __post_init__(self) -> None:
        if self.sentence and not self.sentence.strip():
            raise ConfigError(f"{self.name} sentence must not be blank, got {self.sentence!r}")
        check_position(self.name, self.positions)

    def sentence_for(self, task: str = "") -> str:
        """The trigger sentence: the user's, else the task's default, else :data:`FALLBACK_SENTENCE`."""
        return self.sentence.strip() or DEFAULT_SENTENCES.get(task, FALLBACK_SENTENCE)

    def insert(self, text: str, rng: np.random.Generator) -> str:
        return insert_words(text, [self.sentence_for()], rng, self.positions)

    def _resolved(self, data: TextDataset, cfg: PoisonConfig) -> InSent:
        return dataclasses.replace(self, sentence=self.sentence_for(task_of(data, cfg)))

    def poison_train(self, train: TextDataset, cfg: PoisonConfig) -> TextDataset:
        return InsertionAttack.poison_train(self._resolved(train, cfg), train, cfg)

    def triggered_test(self, test: TextDataset, cfg: PoisonConfig) -> TextDataset:
        return InsertionAttack.triggered_test(self._resolved(test, cfg), test, cfg)


@dataclass(frozen=True)
class AddSent(InSent):
    """AddSent (OpenBackdoor's name for InSent): the same sentence trigger under a second name."""

    name = "addsent"
    description = "AddSent: alias of insent (sentence trigger, default per task)"
