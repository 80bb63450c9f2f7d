"""``python -m unbackdoor``: the ``unbackdoor`` command, e.g. ``torchrun --nproc-per-node 2 -m unbackdoor run ...``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
