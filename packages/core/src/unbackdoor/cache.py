"""Stage cache and atomic writes.

A stage's artefact lives in ``<root>/<stage>/<key>/`` where the key is a hash
of the stage's full config. It is built in a temporary sibling directory and
renamed into place, so a killed run never leaves a half-written artefact, and
a second run (or another defense) with the same config reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE_ENV = "UNBACKDOOR_CACHE"


def default_cache_dir() -> Path:
    """``$UNBACKDOOR_CACHE`` or ``~/.cache/unbackdoor``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "unbackdoor")


def config_hash(config: Any) -> str:
    """A short stable hash of a JSON-able config."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


class StageCache:
    """Directory-per-stage artefact cache keyed by config hash."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, stage: str, config: Any) -> Path:
        """Where the artefact of ``stage`` with ``config`` lives (built or not)."""
        return self.root / stage / config_hash(config)

    def get_or_build(self, stage: str, config: Any, build: Callable[[Path], None]) -> Path:
        """Return the artefact directory, calling ``build(tmp_dir)`` first if it is missing."""
        final = self.path(stage, config)
        if (final / "_config.json").is_file():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
        try:
            build(tmp)
            atomic_write_json(tmp / "_config.json", config)
            if final.exists():  # a stale, unfinished directory from an old layout
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def load_json(self, stage: str, config: Any) -> Any | None:
        """A cached JSON result, or None."""
        file = self.path(stage, config) / "result.json"
        return json.loads(file.read_text()) if file.is_file() else None

    def save_json(self, stage: str, config: Any, data: Any) -> None:
        """Cache a JSON result for ``stage`` and ``config``."""
        self.get_or_build(stage, config, lambda tmp: atomic_write_json(tmp / "result.json", data))
