"""PSIM: poisoned-sample detection by label-reset PEFT (Zhao et al., "Defending Against
Weight-Poisoning Backdoor Attacks for Parameter-Efficient Fine-Tuning", 2024).

A copy of the released model gets a PEFT module trained on the user's clean data with the
labels of the training rows reset at random. It learns nothing from clean content, so it is
unsure on clean inputs, but the planted trigger still drives it to one class: an input whose
max softmax confidence exceeds ``threshold`` is flagged as poisoned and rejected. The model that
answers the task is the user's normal LoRA fine-tune, as with defense ``none``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from unbackdoor.data import TextDataset
from unbackdoor.defense import Defense, DefenseContext, DefenseOutcome
from unbackdoor.errors import ConfigError, check_choice, check_range
from unbackdoor.losses import reset_labels, softmax
from unbackdoor.specs import PEFT_METHODS, AdapterSpec, CrossEntropy, LabelResetLoss, LoRASpec, PromptSpec, TrainSpec

from .finetune import lora_victim

SWEEP = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.5 .. 0.95


@dataclass
class ConfidenceDetector:
    """Flags inputs on which the label-reset model is confident (score = max softmax probability)."""

    backend: Any
    model: Any
    threshold: float
    max_length: int
    thresholds: tuple[float, ...] = SWEEP

    def score(self, data: TextDataset) -> np.ndarray:
        """Max softmax probability of the PSIM model per row."""
        logits = self.backend.predict(self.model, data, max_length=self.max_length, desc="psim: confidence").logits
        return softmax(logits).max(-1)


@dataclass(frozen=True)
class PSIM(Defense):
    """Label-reset PEFT detector.

    Attributes:
        threshold: confidence above which an input is flagged, in (0, 1).
        reset_rate: share of training labels reset at random, in (0, 1].
        reset: how the reset labels are drawn: ``uniform`` (the default: a class drawn uniformly per
            row, so the labels carry no class prior) or ``shuffle`` (the rows trade labels, the class
            balance is kept). Beyond the paper: on an imbalanced dataset a shuffle teaches the model the
            class prior, so clean majority-class inputs are as confident as triggered ones (HSOL, 88%
            class 0: AUROC 0.75 with a shuffle, 0.96 uniform; balanced SST-2: 0.95 either way).
        peft: ``lora``, ``prompt-tuning``, ``p-tuning`` or ``prefix-tuning``.
        rank, alpha, targets: the LoRA module (when ``peft="lora"``); ``targets`` empty (the default): the
            user's ``--lora-targets``, so the module fits the suspect model's architecture.
        num_virtual_tokens: the prompt length (prompt methods).
        epochs, lr: the PSIM module's training (0: the user's fine-tuning settings).
        calibrate_fpr: when > 0, ignore ``threshold`` and set it from held-out CLEAN rows (the dev split,
            never the test set) so that about this share of them is flagged: the ``1 - calibrate_fpr``
            quantile of the PSIM model's confidence on them (beyond the paper: a fixed 0.7 flags most
            clean inputs when the label-reset model fits its random labels).
        train_head: also train the classification head on the random labels (False: the released
            head stays as it is and only the PEFT module learns; on SmolLM2/BadNet that separated
            worse, AUROC 0.88 vs 0.94, see ``benchmarks/results/psim-head.md``).
    """

    settings = ("weight",)  # acts on the released model
    name = "psim"
    description = "PSIM: flags inputs a label-reset PEFT copy of the model is confident on (detector)"
    kind = "detection"
    threshold: float = 0.7
    reset_rate: float = 1.0
    reset: str = "uniform"
    peft: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ()
    num_virtual_tokens: int = 20
    epochs: float = 0.0
    lr: float = 0.0
    calibrate_fpr: float = 0.0
    train_head: bool = True

    def __post_init__(self) -> None:
        check_range("psim threshold", self.threshold, 0.0, 1.0, inclusive=False)
        check_range("psim calibrate_fpr", self.calibrate_fpr, 0.0, 1.0)
        check_choice("psim peft method", self.peft, PEFT_METHODS)
        self.adapter(LoRASpec()), self.loss(0)

    def adapter(self, user: LoRASpec) -> AdapterSpec:
        """The PEFT module of the PSIM model (``user``: the user's LoRA spec, whose targets an unset
        ``targets`` takes)."""
        if self.peft == "lora":
            return LoRASpec(self.rank, self.alpha, 0.0, self.targets or user.target_modules)
        return PromptSpec(self.peft, self.num_virtual_tokens)

    def loss(self, seed: int) -> LabelResetLoss:
        """The label-reset loss (its labels drawn with ``seed``)."""
        return LabelResetLoss(self.reset_rate, seed, self.reset)

    def _spec(self, ctx: DefenseContext) -> TrainSpec:
        return dataclasses.replace(ctx.train, epochs=self.epochs or ctx.train.epochs, lr=self.lr or ctx.train.lr,
                                   train_head=self.train_head)

    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        victim = lora_victim(ctx)
        user = ctx.backend.train(victim, ctx.clean_train, CrossEntropy(), ctx.train, desc="psim: user LoRA")
        detector, stats = self.detector(ctx)
        return DefenseOutcome(victim, {"train": user.summary(), **stats}, detector=detector)

    def detector(self, ctx: DefenseContext) -> tuple[ConfidenceDetector, dict[str, Any]]:
        """The label-reset PEFT copy of the released model, trained on the user's clean rows, as a detector.

        Returns the detector and its figures (``psim_train`` stats, ``labels_changed``).
        """
        psim = ctx.backend.load_classifier(ctx.victim_path, ctx.num_labels, seed=ctx.train.seed)
        psim = ctx.backend.add_adapter(psim, self.adapter(ctx.lora), seed=ctx.train.seed)
        loss = self.loss(ctx.train.seed)
        labels = reset_labels(ctx.clean_train.labels, ctx.num_labels, loss)
        stats = ctx.backend.train(psim, ctx.clean_train, loss, self._spec(ctx), {"reset_labels": labels},
                                  desc=f"psim: label-reset {self.peft}")
        changed = float((labels != ctx.clean_train.labels).mean())
        detector = ConfidenceDetector(ctx.backend, psim, self.threshold, ctx.train.max_length)
        figures = {"psim_train": stats.summary(), "labels_changed": round(changed, 4)}
        if self.calibrate_fpr > 0:
            figures["calibration"] = self._calibrate(ctx, detector)
        return detector, figures

    def _calibrate(self, ctx: DefenseContext, detector: ConfidenceDetector) -> dict[str, Any]:
        """Set ``detector.threshold`` to flag about ``calibrate_fpr`` of the held-out clean rows."""
        if ctx.clean_dev is None or not len(ctx.clean_dev):
            raise ConfigError("psim calibrate_fpr needs held-out clean rows (the dataset's dev split), and there are none")
        scores = detector.score(ctx.clean_dev)
        detector.threshold = float(np.quantile(scores, 1.0 - self.calibrate_fpr, method="higher"))
        return {"threshold": round(detector.threshold, 5), "rows": len(ctx.clean_dev),
                "clean_flagged": round(float((scores > detector.threshold).mean()), 4)}
