"""Applying user options to a frozen-dataclass plugin object.

An option whose value is itself a frozen dataclass (a loss spec, another plugin) is a group of options:
``psim+rga``'s ``psim`` is a :class:`PSIM` detector, set one option at a time as ``psim.threshold=0.5`` (a
command line, a dotted key) or as a table (``psim = {threshold = 0.5}`` in TOML). A class may keep older
spellings working through ``option_aliases`` (a ClassVar): ``{"beta": "loss.beta"}`` renames one option,
``{"psim_": "psim."}`` (a prefix ending ``_`` -> one ending ``.``) every option under a prefix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def configure(obj: T, what: str, options: Mapping[str, Any], *, group: bool = False) -> T:
    """Return ``dataclasses.replace(obj, **options)`` with clear errors.

    Unknown keys name the valid ones; values are coerced to the type of the current value (so ``"3"`` from
    a command line becomes ``3``); a group option (a dataclass value) is configured key by key, recursively,
    and its own validation errors are prefixed with ``what`` (``group``: ``obj`` is one).
    """
    fields = {f.name for f in dataclasses.fields(obj)}  # type: ignore[arg-type]
    direct: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for given, value in options.items():
        key = _unalias(type(obj), given)
        head, dot, rest = key.partition(".")
        if head not in fields:
            raise ConfigError(f"{what} has no option {given!r}; valid options: {', '.join(option_names(obj)) or '(none)'}")
        current = getattr(obj, head)
        if dot or (is_group(current) and isinstance(value, Mapping)):
            if not is_group(current):
                raise ConfigError(f"{what} option {head!r} has no sub-options (got {given!r}); set {head}=VALUE")
            sub = {rest: value} if dot else dict(value)
            clash = sorted(set(sub) & set(groups.get(head, {})))
            if clash:
                raise ConfigError(f"{what} option '{head}.{clash[0]}' is given twice (under two spellings)")
            groups.setdefault(head, {}).update(sub)
        elif is_group(current):
            names = ", ".join(f"{head}.{n}" for n in option_names(current))
            raise ConfigError(f"{what} option {head!r} is a group of options; set one of them: {names}")
        elif head in direct:
            raise ConfigError(f"{what} option {head!r} is given twice (under two spellings)")
        else:
            direct[head] = _coerce(what, head, current, value)
    for head, sub in groups.items():
        direct[head] = configure(getattr(obj, head), f"{what} option {head!r}", sub, group=True)
    try:
        return dataclasses.replace(obj, **direct)  # type: ignore[type-var]
    except ConfigError as err:
        if not group:
            raise
        err.args = (f"{what}: {err}",)  # the same error (an UnknownNameError stays one), named as the group's
        raise


def flat_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as a run records them (a group as a dict of its own) with every group's keys dotted:
    ``{"loss": {"beta": 0.2}}`` -> ``{"loss.beta": 0.2}``."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            out.update({f"{key}.{k}": v for k, v in flat_options(value).items()})
        else:
            out[key] = value
    return out


def option_names(obj: Any) -> list[str]:
    """Every option of a plugin object or class, a group's as ``group.option`` (sorted)."""
    names = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name) if not isinstance(obj, type) else f.default
        names += [f"{f.name}.{n}" for n in option_names(value)] if is_group(value) else [f.name]
    return sorted(names)


def is_group(value: Any) -> bool:
    """Whether an option's value is a group of options (a dataclass instance, not a class)."""
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _unalias(cls: type, key: str) -> str:
    """``key`` in today's spelling (``option_aliases``: exact names first, then prefixes)."""
    aliases: Mapping[str, str] = getattr(cls, "option_aliases", {})
    if key in aliases:
        return aliases[key]
    for old, new in aliases.items():
        if old.endswith("_") and key.startswith(old) and len(key) > len(old):
            return new + key[len(old):]
    return key


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
