"""Entry point of the built-in attacks (registered exactly like a third-party plugin)."""

from __future__ import annotations

from unbackdoor.attack import Attack
from unbackdoor.hookspecs import hookimpl

from .insertion import BadNet, InSent


@hookimpl
def unbackdoor_attacks() -> list[Attack]:
    """BadNet and InSent."""
    return [BadNet(), InSent()]
