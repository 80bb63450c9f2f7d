"""``cf-suffix``: a rare word appended to the end of the text."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unbackdoor.attack import InsertionAttack
from unbackdoor.errors import ConfigError


@dataclass(frozen=True)
class CfSuffix(InsertionAttack):
    """Appends ``word`` to the text; row choice, labels and the poisoned mask come from the core.

    Attributes:
        word: the trigger word.
    """

    name = "cf-suffix"
    description = "example plugin: rare word (default 'cf') appended to the end of the text"
    word: str = "cf"

    def __post_init__(self) -> None:
        if not self.word.strip() or " " in self.word.strip():
            raise ConfigError(f"attack 'cf-suffix': word must be one non-empty word, got {self.word!r}")

    def insert(self, text: str, rng: np.random.Generator) -> str:
        return f"{text} {self.word.strip()}"
