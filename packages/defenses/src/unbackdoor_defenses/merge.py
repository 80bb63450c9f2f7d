"""``merge``: model merging (Arora et al., "Here's a Free Lunch: Sanitizing Backdoored Models with
Model Merge", Findings of ACL 2024).

The released model is averaged, weight by weight, with another model of the same architecture
fine-tuned on the same task; by default that model is trained here: the clean BASE student with
the user's LoRA on the clean rows (cached). The average is computed once in NumPy
(:mod:`unbackdoor.surgery`), so every backend evaluates the same weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unbackdoor.defense import Defense, DefenseContext, DefenseOutcome
from unbackdoor.errors import ConfigError, check_range
from unbackdoor.models import check_model_dir, resolve_model
from unbackdoor.surgery import merge_weights, read_classifier, write_classifier

from .common import derived_dir, load_or_tune, tune_like_none


@dataclass(frozen=True)
class Merge(Defense):
    """``weight * victim + (1 - weight) * other`` for every tensor, head included.

    Attributes:
        weight: the victim's share, in [0, 1] (1: the victim unchanged; 0: the other model).
        other: a classifier directory to merge with (same architecture and labels); empty: train
            one from the clean base student with the user's LoRA on the clean rows.
        finetune: then train the user's LoRA on the clean rows, like ``none``.
    """

    settings = ("weight",)  # acts on the released model
    name = "merge"
    description = "merge the released model's weights with a clean model fine-tuned on the same task"
    weight: float = 0.5
    other: str = ""
    finetune: bool = False

    def __post_init__(self) -> None:
        check_range("defense 'merge' option weight", self.weight, 0.0, 1.0)

    def reference(self, ctx: DefenseContext) -> Path:
        """The model merged with the victim: ``other``, else a cached clean LoRA fine-tune of the base student."""
        if self.other:
            return check_model_dir(Path(self.other).expanduser())
        student = student_path(ctx)
        clean = dataclasses.replace(ctx, victim_path=student)

        def build(tmp: Path) -> None:
            model, _ = tune_like_none(clean, desc="merge: clean reference LoRA")
            ctx.backend.save(model, tmp)

        key = {**ctx.cache_key, "student": str(student), "lora": dataclasses.asdict(ctx.lora),
               "spec": dataclasses.asdict(ctx.train), "rows": len(ctx.clean_train), "labels": ctx.num_labels}
        return ctx.cache.get_or_build("merge-reference", key, build)

    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        other = self.reference(ctx)

        def build(tmp: Path) -> dict[str, Any]:
            merged = merge_weights(read_classifier(ctx.victim_path), read_classifier(other), self.weight)
            write_classifier(merged, ctx.victim_path, tmp)
            return {"other": str(other)}

        path, made = derived_dir(ctx, self, "merged", build, reference=str(other))
        model, stats = load_or_tune(ctx, path, self.finetune, "merge: LoRA")
        return DefenseOutcome(model, {**stats, **made})


def student_path(ctx: DefenseContext) -> Path:
    """The clean base student: ``ctx.student_path``, else the run's ``model`` from the cache key."""
    if ctx.student_path is not None:
        return ctx.student_path
    name = ctx.cache_key.get("model")
    if not name:
        raise ConfigError("defense 'merge' needs the clean base student (DefenseContext.student_path) "
                          "or a model to merge with (merge.other=DIR)")
    return resolve_model(str(name), ctx.cache.root)
