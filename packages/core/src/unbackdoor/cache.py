"""Stage cache and atomic writes.

A stage's artefact lives in ``<root>/<stage>/<key>/`` where the key is a hash
of the stage's full config. It is built in a temporary sibling directory and
renamed into place, so a killed run never leaves a half-written artefact, and
a second run (or another defense) with the same config reuses it.

Under a launcher (``torchrun``, :mod:`unbackdoor.ranks`) only rank 0 writes entries: every rank
decides hit or miss from the same view of the cache, builds a missing entry together (its training
steps need every rank) and returns once rank 0's entry is in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .paths import inside
from .ranks import ONE_PROCESS, Ranks, agree

CACHE_ENV = "UNBACKDOOR_CACHE"
#: a stage name: one path component, never "." or ".."
STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


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
    """Directory-per-stage artefact cache keyed by config hash; ``ranks``: the processes of a data-parallel
    run (rank 0 writes, every rank builds and reads)."""

    def __init__(self, root: str | Path, ranks: Ranks = ONE_PROCESS) -> None:
        self.root = Path(root)
        self.ranks = ranks

    def path(self, stage: str, config: Any) -> Path:
        """Where the artefact of ``stage`` with ``config`` lives (built or not), checked to lie inside the root.

        ``stage`` is one plain name (``victim``, ``teacher``...): no separators, no ``..``, so a plugin's
        stage name cannot make the cache write (or delete a stale directory) outside its root.
        """
        if not isinstance(stage, str) or not STAGE_NAME.fullmatch(stage):
            raise ConfigError(f"cache stage name {stage!r} must match {STAGE_NAME.pattern} (letters, digits, . _ -)")
        return inside(self.root, self.root / stage / config_hash(config), f"cache entry of stage {stage!r}")

    def get_or_build(self, stage: str, config: Any, build: Callable[[Path], None], *,
                     every_rank: bool = True) -> Path:
        """Return the artefact directory, calling ``build(tmp_dir)`` first if it is missing.

        With several ranks and ``every_rank`` (the default: ``build`` may train, and training needs every
        rank) each rank runs ``build``: rank 0 in the temporary sibling it renames into place, the others
        in a scratch directory outside the cache, deleted at once (a backend's ``save`` writes nothing
        there: only rank 0 writes models). ``every_rank=False``, for a ``build`` that makes no collective
        call (no training: merging weights, writing a result), runs it on rank 0 while the others wait.
        """
        final = self.path(stage, config)
        if agree(self.ranks, lambda: (final / "_config.json").is_file()):
            return final
        if self.ranks.rank == 0:
            self._build(final, config, build)
        elif every_rank:
            with tempfile.TemporaryDirectory(prefix=f"unbackdoor-rank{self.ranks.rank}-") as scratch:
                build(Path(scratch))
        self.ranks.barrier()  # rank 0's entry is in place before any rank reads it
        return final

    def _build(self, final: Path, config: Any, build: Callable[[Path], None]) -> None:
        """``build`` into a temporary sibling of ``final``, then rename it into place."""
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

    def load_json(self, stage: str, config: Any) -> Any | None:
        """A cached JSON result, or None (the same answer on every rank)."""
        file = self.path(stage, config) / "result.json"
        return agree(self.ranks, lambda: json.loads(file.read_text()) if file.is_file() else None)

    def save_json(self, stage: str, config: Any, data: Any) -> None:
        """Cache a JSON result for ``stage`` and ``config``."""
        self.get_or_build(stage, config, lambda tmp: atomic_write_json(tmp / "result.json", data), every_rank=False)
