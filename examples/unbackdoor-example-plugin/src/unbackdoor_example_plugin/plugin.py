"""The entry point (``[project.entry-points.unbackdoor] example = "unbackdoor_example_plugin.plugin"``)."""

from __future__ import annotations

from unbackdoor.attack import Attack
from unbackdoor.defense import Defense
from unbackdoor.hookspecs import hookimpl
from unbackdoor.lossdef import LossInfo

from .abl import AntiBackdoorLearning
from .attack import CfSuffix
from .defense import RareWordFilter
from .loss import LocalGradientAscent


@hookimpl
def unbackdoor_attacks() -> list[Attack]:
    """The ``cf-suffix`` attack."""
    return [CfSuffix()]


@hookimpl
def unbackdoor_defenses() -> list[Defense]:
    """The ``rare-word-filter`` and ``abl`` defenses."""
    return [RareWordFilter(), AntiBackdoorLearning()]


@hookimpl
def unbackdoor_losses() -> list[LossInfo]:
    """``local-gradient-ascent`` (ABL's isolation loss), which ``abl`` trains with on either backend."""
    return [LossInfo("local-gradient-ascent", "ABL: sign(CE - gamma) * CE per row", LocalGradientAscent)]
