"""Progress bars for every long loop (tqdm; silent when ``UNBACKDOOR_QUIET`` is set, and on every rank but 0
under a launcher such as torchrun, so N processes draw one set of bars)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

from .ranks import launched_rank

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Wrap ``items`` in a progress bar on stderr."""
    disable = bool(os.environ.get("UNBACKDOOR_QUIET")) or launched_rank() != 0
    yield from tqdm(items, desc=desc, total=total, disable=disable, leave=False, file=sys.stderr,
                    dynamic_ncols=True, mininterval=1.0)
