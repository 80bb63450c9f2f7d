"""Errors raised by the unbackdoor core.

Every error names the thing that was wrong, the bad value and, where there is
a closed set, the valid choices, so a user can fix the input without reading
a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class UnbackdoorError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class ConfigError(UnbackdoorError, ValueError):
    """A user-supplied option has a bad value."""


class UnknownNameError(ConfigError, KeyError):
    """A name (backend, attack, defense, dataset, model...) is not registered."""

    def __init__(self, thing: str, value: object, choices: Iterable[str]) -> None:
        self.thing, self.value, self.choices = thing, value, sorted(choices)
        super().__init__(
            f"unknown {thing} {value!r}; choose one of: {', '.join(self.choices) or '(none registered)'}"
        )

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class DataError(UnbackdoorError, ValueError):
    """A data file is missing or malformed."""


class PluginError(UnbackdoorError):
    """A plugin failed to load or raised while running."""

    def __init__(self, plugin: str, detail: str) -> None:
        self.plugin = plugin
        super().__init__(f"plugin {plugin!r} failed: {detail}")


class TrainingDivergedError(UnbackdoorError, FloatingPointError):
    """A training loss became NaN or infinite; the message names the run, the step and the loss terms."""


class BackendUnavailableError(UnbackdoorError):
    """The selected backend cannot be used (not installed or not implemented)."""


def check_choice(thing: str, value: str, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise :class:`UnknownNameError`."""
    choices = list(choices)
    if value not in choices:
        raise UnknownNameError(thing, value, choices)
    return value


def check_range(thing: str, value: float, low: float, high: float, *, inclusive: bool = True) -> float:
    """Return ``value`` if ``low <= value <= high`` (NaN is always rejected)."""
    ok = low <= value <= high if inclusive else low < value < high
    if not ok:  # NaN compares False, so it lands here too
        brackets = "[]" if inclusive else "()"
        raise ConfigError(f"{thing} must be in {brackets[0]}{low}, {high}{brackets[1]}, got {value!r}")
    return value
