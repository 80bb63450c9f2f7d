"""Entry point of the built-in attacks (registered exactly like a third-party plugin)."""

from __future__ import annotations

from unbackdoor.attack import Attack
from unbackdoor.hookspecs import hookimpl

from .insertion import AddSent, BadNet, InSent
from .multi import MultiTrigger
from .paraphrase import StyleBkd, SynAttack
from .prompt import ProAttack


@hookimpl
def unbackdoor_attacks() -> list[Attack]:
    """BadNet, InSent/AddSent, SynAttack, StyleBkd, ProAttack and the multi-trigger attack."""
    return [BadNet(), InSent(), AddSent(), SynAttack(), StyleBkd(), ProAttack(), MultiTrigger()]
