"""Entry point of the built-in defenses (registered exactly like a third-party plugin)."""

from __future__ import annotations

from unbackdoor.defense import Defense
from unbackdoor.hookspecs import hookimpl

from .finetune import NoDefense
from .psim import PSIM
from .w2s import W2SDefense


@hookimpl
def unbackdoor_defenses() -> list[Defense]:
    """``none``, ``w2s`` and ``psim``."""
    return [NoDefense(), W2SDefense(), PSIM()]
