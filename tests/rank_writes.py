"""``python -m unbackdoor ARGS...`` (what ``torchrun -m unbackdoor`` runs), recording this process's writes.

Usage: ``[torchrun ...] rank_writes.py LOG_DIR ROOTS ARGS...`` with ROOTS comma-separated directories.
An audit hook (:func:`sys.addaudithook`) sees every file opened for writing, directory made, rename
(``os.replace`` too) and removal; those under ROOTS are written at exit to ``LOG_DIR/rank<RANK>.json``
as ``[event, path]`` pairs in order. Files written by native code (safetensors) land in directories
made through Python, so a write there shows as that directory's ``os.mkdir`` and ``os.rename``.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
#: audit event -> the positions of its path arguments
PATH_ARGS = {"os.mkdir": (0,), "os.rename": (0, 1), "os.remove": (0,), "os.rmdir": (0,), "shutil.rmtree": (0,)}


def _written(event: str, args: tuple) -> list[str]:
    """The paths an audit event writes (empty for reads and other events)."""
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS)
        return [path] if writing and isinstance(path, str | bytes | os.PathLike) else []
    return [args[i] for i in PATH_ARGS.get(event, ()) if isinstance(args[i], str | bytes | os.PathLike)]


def main(log_dir: str, roots: str, argv: list[str]) -> None:
    """Hook the writes under ``roots``, dump them at exit, run the CLI with ``argv``."""
    bases = [os.path.realpath(r) for r in roots.split(",")]
    seen: list[list[str]] = []

    def hook(event: str, args: tuple) -> None:
        for path in _written(event, args):
            full = os.path.realpath(os.fsdecode(path))
            if any(full == b or full.startswith(b + os.sep) for b in bases):
                seen.append([event, full])

    def dump() -> None:
        file = Path(log_dir) / f"rank{os.environ.get('RANK', '0')}.json"
        file.write_text(json.dumps(seen))

    atexit.register(dump)
    sys.addaudithook(hook)
    sys.argv = ["unbackdoor", *argv]
    runpy.run_module("unbackdoor", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
