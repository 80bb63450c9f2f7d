"""Applying user options to a frozen-dataclass plugin object."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def configure(obj: T, what: str, options: dict[str, Any]) -> T:
    """Return ``dataclasses.replace(obj, **options)`` with clear errors.

    Unknown keys name the valid ones; values are coerced to the type of the
    current value (so ``"3"`` from a command line becomes ``3``).
    """
    fields = {f.name: f for f in dataclasses.fields(obj)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ConfigError(f"{what} has no option {unknown[0]!r}; valid options: {', '.join(sorted(fields)) or '(none)'}")
    coerced = {k: _coerce(what, k, getattr(obj, k), v) for k, v in options.items()}
    return dataclasses.replace(obj, **coerced)  # type: ignore[type-var]


def _coerce(what: str, key: str, current: Any, value: Any) -> Any:
    """Convert ``value`` to the type of ``current`` (the option's default)."""
    try:
        if current is None:
            return value
        if isinstance(current, bool):
            return _to_bool(value)
        if isinstance(current, tuple):
            if isinstance(value, str):  # "a, b" -> ("a", "b"); "" -> () so emptiness is caught
                return tuple(part.strip() for part in value.split(",") if part.strip())
            return tuple(value)
        if isinstance(value, bool) or value is None:  # str(None) would pass as the text "None"
            raise ValueError(value)
        if isinstance(current, int) and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)  # int(16.5) would silently truncate
        return type(current)(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{what} option {key!r} expects a {type(current).__name__}, got {value!r}"
        ) from None


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "1", "yes", "on"}:
        return True
    if text in {"false", "0", "no", "off"}:
        return False
    raise ValueError(value)
