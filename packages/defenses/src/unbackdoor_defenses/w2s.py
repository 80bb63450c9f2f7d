"""W2SDefense: weak-to-strong unlearning by distillation from a small clean teacher.

The teacher (encoder -> projection g -> classifier) is fully fine-tuned on
clean data (the user's, or the trusted rows in the data-poisoning setting) and
cached; its logits and projected states are computed once per row and cached;
the backdoored (or poisoned-data) student is then trained with LoRA on
``alpha*CE + beta*KD + gamma*alignment`` (see :class:`unbackdoor.specs.W2SLoss`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from unbackdoor.data import TextDataset
from unbackdoor.defense import Defense, DefenseContext, DefenseOutcome
from unbackdoor.errors import ConfigError, check_choice
from unbackdoor.layout import PROJECTION_ACTIVATIONS
from unbackdoor.metrics import accuracy
from unbackdoor.specs import CrossEntropy, TrainSpec, W2SLoss

from .finetune import UserPEFT


@dataclass(frozen=True)
class W2SDefense(UserPEFT, Defense):
    """Weak-to-strong unlearning (W2SDefense).

    Attributes:
        loss: the student's objective ``alpha*CE + beta*KD + gamma*alignment`` (:class:`unbackdoor.specs.W2SLoss`;
            its options as ``loss.beta`` and so on, or as before without ``loss.``: ``beta``): ``alpha``, ``beta``
            and ``gamma`` weigh the cross-entropy on the labels (a), the distillation T^2 * KL(teacher ||
            student) (b) and the feature alignment (c); ``temperature`` is T; ``alignment`` is ``pooled`` (the
            paper's text: each row's last-token state toward its teacher state), ``tokens`` (every real token of
            a row toward its teacher state) or ``released`` (the authors' released script: every position of
            the batch toward the batch's last row's teacher state); ``reduce`` takes the squared distance over
            the hidden dimension, ``mean`` or ``sum`` (``auto``: ``sum`` for ``released``, as the script, else
            ``mean``).
        teacher_activation: after the teacher's projection g: ``none``, ``relu`` (the released teacher) or
            ``tanh``; the teacher's classifier and the alignment read its output.
        teacher_epochs, teacher_lr, teacher_batch_size: the teacher's full fine-tune (epochs, learning rate,
            batch size).
    """

    name = "w2s"
    uses_teacher = True
    description = "W2SDefense: LoRA student distilled from a small clean teacher (CE + KD + feature alignment)"
    #: the spellings before the loss became one option group (``w2s.beta`` is ``w2s.loss.beta``)
    option_aliases: ClassVar[dict[str, str]] = {
        name: f"loss.{name}" for name in ("alpha", "beta", "gamma", "temperature", "alignment", "reduce")}
    loss: W2SLoss = W2SLoss(reduce="auto")
    teacher_activation: str = "none"
    teacher_epochs: float = 3.0
    teacher_lr: float = 5e-5
    teacher_batch_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("w2s teacher_activation", self.teacher_activation, PROJECTION_ACTIVATIONS)

    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        if ctx.teacher_path is None:
            raise ConfigError("defense 'w2s' needs a teacher model (--teacher, e.g. minilm-l6)")
        student = self.user_model(ctx)
        width = ctx.backend.hidden_size(student)
        teacher_dir, teacher_stats = self._teacher(ctx, width)
        aux, teacher_train_acc = self._teacher_outputs(ctx, teacher_dir)
        stats = ctx.backend.train(student, ctx.clean_train, self.loss, self.user_spec(ctx), aux, desc="w2s: student")
        return DefenseOutcome(student, {"train": stats.summary(), "teacher": teacher_stats,
                                        "teacher_train_accuracy": teacher_train_acc})

    def _teacher_spec(self, ctx: DefenseContext) -> TrainSpec:
        return dataclasses.replace(ctx.train, epochs=self.teacher_epochs, lr=self.teacher_lr,
                                   batch_size=self.teacher_batch_size)

    def _teacher_key(self, ctx: DefenseContext, width: int) -> dict[str, Any]:
        rows = _teacher_rows(ctx)
        activation = {} if self.teacher_activation == "none" else {"activation": self.teacher_activation}
        return {**ctx.cache_key, "teacher": str(ctx.teacher_path), "width": width, **activation,
                "spec": dataclasses.asdict(self._teacher_spec(ctx)), "rows": len(rows), "data": rows.name}

    def _teacher(self, ctx: DefenseContext, width: int) -> tuple[Path, dict[str, Any]]:
        """Fine-tune (or reuse from the cache) teacher = encoder -> g -> classifier."""
        stats: dict[str, Any] = {}

        def build(tmp: Path) -> None:
            head = {} if self.teacher_activation == "none" else {"projection_activation": self.teacher_activation}
            teacher = ctx.backend.load_classifier(ctx.teacher_path, ctx.num_labels, projection_dim=width,
                                                  seed=ctx.train.seed, **head)
            result = ctx.backend.train(teacher, _teacher_rows(ctx), CrossEntropy(), self._teacher_spec(ctx),
                                       desc="w2s: teacher")
            stats.update(result.summary())
            if ctx.clean_dev is not None and len(ctx.clean_dev):
                pred = ctx.backend.predict(teacher, ctx.clean_dev, max_length=ctx.train.max_length,
                                           desc="w2s: teacher dev").labels
                stats["dev_accuracy"] = accuracy(pred, ctx.clean_dev.labels)
            ctx.backend.save(teacher, tmp)
            (tmp / "stats.json").write_text(json.dumps(stats))

        key = self._teacher_key(ctx, width)
        path = ctx.cache.get_or_build("teacher", key, build)
        return path, stats or json.loads((path / "stats.json").read_text())

    def _teacher_outputs(self, ctx: DefenseContext, teacher_dir: Path) -> tuple[dict[str, np.ndarray], float]:
        """The frozen teacher's logits and projected states on the training rows, computed once."""
        teacher = ctx.backend.load_classifier(teacher_dir, ctx.num_labels, seed=ctx.train.seed)
        pred = ctx.backend.predict(teacher, ctx.clean_train, max_length=ctx.train.max_length, hidden=True,
                                   desc="w2s: teacher outputs")
        aux = {"teacher_logits": pred.logits, "teacher_hidden": pred.hidden}
        return aux, accuracy(pred.labels, ctx.clean_train.labels)  # type: ignore[dict-item]


def _teacher_rows(ctx: DefenseContext) -> TextDataset:
    """The clean rows the teacher learns from: the trusted set in the data-poisoning setting, else the user's."""
    return ctx.teacher_train if ctx.teacher_train is not None else ctx.clean_train
