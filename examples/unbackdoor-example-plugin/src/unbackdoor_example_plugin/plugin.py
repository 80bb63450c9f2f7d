"""The entry point (``[project.entry-points.unbackdoor] example = "unbackdoor_example_plugin.plugin"``)."""

from __future__ import annotations

from unbackdoor.attack import Attack
from unbackdoor.defense import Defense
from unbackdoor.hookspecs import hookimpl

from .attack import CfSuffix
from .defense import RareWordFilter


@hookimpl
def unbackdoor_attacks() -> list[Attack]:
    """The ``cf-suffix`` attack."""
    return [CfSuffix()]


@hookimpl
def unbackdoor_defenses() -> list[Defense]:
    """The ``rare-word-filter`` defense."""
    return [RareWordFilter()]
