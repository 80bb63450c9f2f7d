"""``local-gradient-ascent``: the loss of Anti-Backdoor Learning's isolation phase (Li et al., NeurIPS 2021).

Written once against the array API (:mod:`unbackdoor.lossdef`): the torch and jax backends train with this
file as it is, and :func:`unbackdoor.testing.check_loss` checks it on both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from unbackdoor.arrays import Array, cross_entropy, stop_gradient
from unbackdoor.errors import ConfigError
from unbackdoor.lossdef import Term


@dataclass(frozen=True)
class LocalGradientAscent:
    """Per row ``sign(CE_i - gamma) * CE_i``: descent while a row's loss is above ``gamma``, ascent below it.

    Every row's loss is held near ``gamma``, so the model cannot overfit the rows it learns fastest; a
    backdoor's poisoned rows (the trigger is an easy shortcut) still fall lower than the clean ones, and
    their low loss after this phase isolates them. The sign is a constant of the step (its gradient is 0
    almost everywhere; ``stop_gradient`` says so on every backend).

    Attributes:
        gamma: the loss level each row is held at (> 0).
    """

    gamma: float = 0.5
    aux_keys: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise ConfigError(f"loss 'local-gradient-ascent': gamma must be a finite number > 0, got {self.gamma!r}")

    def terms(self, xp: Any, logits: Array, hidden: Array | None, batch: Any) -> dict[str, Term]:
        """``sign(cross_entropy - gamma)*cross_entropy [B]`` (see :class:`unbackdoor.lossdef.ArrayLoss`)."""
        ce = cross_entropy(logits, batch["labels"])
        return {"sign(cross_entropy-gamma)*cross_entropy": Term(xp.sign(stop_gradient(ce) - self.gamma) * ce)}
