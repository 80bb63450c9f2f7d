"""Checking the paths a user hands the tool, and keeping every write inside its two directories.

The tool writes to exactly two places, both chosen by the user: the run's output directory (``out``:
``results.json``, ``results.md``, ``run.json``, ``plots/``) and the cache directory (``cache_dir``: stage
artefacts and converted models). Every other path in a config (model, teacher, dataset, data dir, the
options of attacks and defenses) is only ever read. :func:`inside` is the check the cache applies to
every artefact path, so a stage name or key cannot climb out of the cache with ``..`` or a symlink.
"""

from __future__ import annotations

import errno
from pathlib import Path

from .errors import ConfigError


def user_path(thing: str, value: object) -> Path:
    """``value`` as a ``~``-expanded path, or a :class:`ConfigError` naming ``thing`` (empty, NUL byte, too long)."""
    if not isinstance(value, str | Path):
        raise ConfigError(f"{thing} must be a path string, got {value!r}")
    text = str(value)
    if not text.strip():
        raise ConfigError(f"{thing} is empty; give a path")
    if "\0" in text:
        raise ConfigError(f"{thing} {_short(text)!r} contains a NUL byte")
    path = Path(text).expanduser()
    exists(thing, path)  # raises on a name the OS refuses (too long...)
    return path


def exists(thing: str, path: Path) -> bool:
    """``path.exists()``, with a :class:`ConfigError` naming ``thing`` where the OS refuses the name."""
    try:
        return path.exists()
    except ValueError as exc:  # embedded NUL
        raise ConfigError(f"{thing} {_short(str(path))!r} is not a valid path ({exc})") from None
    except OSError as exc:
        reason = "name too long" if exc.errno == errno.ENAMETOOLONG else (exc.strerror or str(exc))
        raise ConfigError(f"{thing} {_short(str(path))!r} is not a usable path ({reason})") from None


def output_dir(thing: str, value: object) -> Path:
    """A directory the tool may write into: resolved, and not an existing file."""
    path = user_path(thing, value).resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{thing} {str(path)!r} exists and is not a directory")
    return path


def inside(root: Path, path: Path, what: str) -> Path:
    """``path`` resolved, checked to lie under ``root`` (resolved); a :class:`ConfigError` otherwise."""
    base, full = root.resolve(), path.resolve()
    if full != base and base not in full.parents:
        raise ConfigError(f"{what} {str(path)!r} resolves to {str(full)!r}, outside {str(base)!r}")
    return full


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"
