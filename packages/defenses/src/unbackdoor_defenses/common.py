"""Helpers shared by the baseline defenses: the user's LoRA fine-tune and cached model directories."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unbackdoor.attack import fields_of
from unbackdoor.cache import atomic_write_json
from unbackdoor.defense import Defense, DefenseContext
from unbackdoor.errors import BackendUnavailableError
from unbackdoor.specs import CrossEntropy

from .finetune import lora_victim

STATS_FILE = "defense_stats.json"


def tune_like_none(ctx: DefenseContext, path: Path | None = None, desc: str = "LoRA") -> tuple[Any, dict[str, Any]]:
    """The model at ``path`` (default: the victim) with the user's LoRA, trained with CE on the clean rows."""
    here = ctx if path is None else dataclasses.replace(ctx, victim_path=path)
    model = lora_victim(here)
    stats = ctx.backend.train(model, ctx.clean_train, CrossEntropy(), ctx.train, desc=desc)
    return model, {"train": stats.summary()}


def load_or_tune(ctx: DefenseContext, path: Path, finetune: bool, desc: str) -> tuple[Any, dict[str, Any]]:
    """``path`` fine-tuned like ``none`` when ``finetune``, else loaded as it is."""
    if finetune:
        return tune_like_none(ctx, path, desc)
    return ctx.backend.load_classifier(path, ctx.num_labels, seed=ctx.train.seed), {}


def derived_dir(ctx: DefenseContext, defense: Defense, stage: str, build: Callable[[Path], dict[str, Any]],
                **extra: Any) -> tuple[Path, dict[str, Any]]:
    """A model directory made from the victim by ``build(tmp_dir) -> stats``, cached per victim, options and data.

    Returns the directory and ``build``'s stats (kept in ``STATS_FILE`` for cache hits). Under torchrun
    ``build`` runs on rank 0 alone (the others wait and read its directory), so it must not train.
    """
    key = {**ctx.cache_key, "victim": str(ctx.victim_path), "defense": defense.name, "options": fields_of(defense),
           "rows": len(ctx.clean_train), **extra}

    def write(tmp: Path) -> None:
        atomic_write_json(tmp / STATS_FILE, build(tmp))

    path = ctx.cache.get_or_build(stage, key, write, every_rank=False)
    return path, json.loads((path / STATS_FILE).read_text())


def require_method(ctx: DefenseContext, defense: str, method: str) -> None:
    """A clear error when the selected backend lacks a :class:`~unbackdoor.backend.Backend` method a defense needs."""
    if not callable(getattr(ctx.backend, method, None)):
        raise BackendUnavailableError(f"defense {defense!r} needs Backend.{method}, which backend "
                                      f"{getattr(ctx.backend, 'name', '?')!r} does not implement; try --backend torch")
