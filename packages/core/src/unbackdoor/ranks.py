"""The processes of a data-parallel run (``torchrun``): which rank this is, and waiting for the others.

Under ``torchrun --nproc-per-node N -m unbackdoor run ...`` every process runs the whole experiment.
Every rank trains every stage, call for call (a data-parallel step needs all of them), and computes
every evaluation the same way; rank 0 alone writes (cache entries, ``run.json``, results, plots) while
the others wait at a barrier and then read what it wrote.

The core imports no framework: a backend that can coordinate processes exposes ``rank``,
``world_size`` and ``barrier()`` (:class:`Ranks`; the torch backend through ``torch.distributed``).
The launcher's environment (``RANK``, ``WORLD_SIZE``) says whether there are several processes before
any backend exists, so a backend that cannot coordinate them is refused with a clear error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from .errors import ConfigError

RANK_ENV = "RANK"
WORLD_ENV = "WORLD_SIZE"

T = TypeVar("T")


@runtime_checkable
class Ranks(Protocol):
    """The processes that run one experiment together, as a backend sees them."""

    @property
    def rank(self) -> int:
        """This process's index, 0 to ``world_size - 1``; rank 0 writes."""

    @property
    def world_size(self) -> int:
        """How many processes run the experiment (1: an ordinary run)."""

    def barrier(self) -> None:
        """Return once every rank has called it."""


@dataclass(frozen=True)
class OneProcess:
    """An ordinary run: one rank, nobody to wait for."""

    rank: int = 0
    world_size: int = 1

    def barrier(self) -> None:
        """Nothing to wait for."""


ONE_PROCESS = OneProcess()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer (a launcher such as "
                          "torchrun sets it)") from None


def launched_rank() -> int:
    """``$RANK`` as a launcher (torchrun) sets it; 0 in an ordinary run."""
    return _env_int(RANK_ENV, 0)


def launched_world() -> int:
    """``$WORLD_SIZE`` as a launcher (torchrun) sets it; 1 in an ordinary run."""
    return _env_int(WORLD_ENV, 1)


def ranks_of(backend: object, name: str) -> Ranks:
    """The ranks of backend ``name``: its own (``rank``, ``world_size``, ``barrier``) when it has them, else one.

    A ConfigError when a launcher started several processes (``WORLD_SIZE`` > 1) and the backend cannot
    coordinate them (each process would train alone and write the same files), or sees another number.
    """
    world = launched_world()
    if isinstance(backend, Ranks):
        if world > 1 and backend.world_size != world:
            raise ConfigError(f"{WORLD_ENV}={world} (a launcher started {world} processes) but backend {name!r} "
                              f"sees {backend.world_size}; it did not join the launcher's process group")
        return backend
    if world > 1:
        raise ConfigError(f"backend {name!r} cannot run under a launcher's {world} processes ({WORLD_ENV}={world}): "
                          "it does not coordinate ranks (use --backend torch with torchrun; the jax backend "
                          "spreads each batch over every device one process sees, so run it without torchrun)")
    return ONE_PROCESS


def agree(ranks: Ranks, look: Callable[[], T]) -> T:
    """``look()`` on every rank at a moment when no rank writes (between two barriers).

    Every rank then sees the same cache state and takes the same branch: a hit on one rank and a miss
    on another would put the ranks' training calls out of step.
    """
    ranks.barrier()
    seen = look()
    ranks.barrier()
    return seen


def check_batch_sizes(sizes: Mapping[str, int], world: int) -> None:
    """A ConfigError naming the first of ``sizes`` (option name -> global batch size) that the ``world``
    ranks cannot share equally (each rank trains on ``batch / world`` rows of every batch)."""
    for option, size in sizes.items():
        if size % world:
            raise ConfigError(f"{option} {size} must be divisible by the {world} data-parallel ranks "
                              f"({WORLD_ENV}={world}): each rank trains on an equal share of every batch; "
                              f"choose e.g. {max(world, size - size % world)}")
