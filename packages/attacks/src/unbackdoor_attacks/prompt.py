"""ProAttack (Zhao et al. 2023): the prompt itself is the trigger, planted clean-label."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from unbackdoor.attack import InsertionAttack, PoisonConfig
from unbackdoor.data import TextDataset
from unbackdoor.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProAttack(InsertionAttack):
    """Prompt trigger: target-class rows get ``prompt`` in front; labels are never changed.

    ProAttack is clean-label by construction (the trigger is a natural prompt, the label is the
    row's own). Given ``clean_label=False`` it does NOT fail: it poisons clean-label anyway,
    logs a warning and says so in the dataset name (``...+proattack[clean-label forced]``).

    Attributes:
        prompt: the trigger prompt, inserted at the start of the text.
    """

    name = "proattack"
    description = "ProAttack: a prompt at the start of target-class rows is the trigger (always clean-label)"
    clean_label_only = True
    prompt: str = "What is the sentiment of the following sentence? <mask> : "

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ConfigError(f"proattack prompt must not be blank, got {self.prompt!r}")

    def insert(self, text: str, rng: np.random.Generator) -> str:
        return f"{self.prompt.strip()} {text}"

    def poison_train(self, train: TextDataset, cfg: PoisonConfig) -> TextDataset:
        if cfg.clean_label:
            return super().poison_train(train, cfg)
        log.warning("attack 'proattack' is clean-label only: poisoning target-class rows with labels kept "
                    "(clean_label=False ignored)")
        out = super().poison_train(train, dataclasses.replace(cfg, clean_label=True))
        return out.subset(np.arange(len(out)), f"{out.name}[clean-label forced]")
