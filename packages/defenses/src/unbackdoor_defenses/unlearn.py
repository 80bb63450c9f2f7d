"""Backdoor unlearning in the data-poisoning setting: RGA and its GA, NPO and ReTrain baselines.

RGA (seed: "Robust Gradient Ascent for Backdoor Unlearning"): the victim was fine-tuned on a training
set whose poisoned rows are known (``DefenseContext.victim_train`` and its ``poisoned`` mask). Plain
gradient ascent (GA) on those rows does not remove the trigger, it moves its effect to another class
("trigger shifting"); RGA scales the ascent by ``lambda = exp(-alpha * KL(f_ref || f))`` (no gradient),
keeps cross-entropy on clean rows and penalises the distance moved (see
:class:`unbackdoor.specs.AdaptiveGALoss`). NPO (Zhang et al., 2024) bounds the ascent with a reference
model instead. ReTrain, the gold standard, fine-tunes the clean base student like the victim on the
training rows minus the poisoned ones.

The unlearning defenses train the user's LoRA adapter (``--lora-*``; option ``adapter=full``: every
parameter, as the RGA paper) on the released model over the
poisoned rows plus ``clean_per_poisoned`` clean rows per poisoned row (seeded), in mixed batches, for
``epochs`` epochs (default 10; the paper: 30). On SmolLM2-135M, 3 epochs left RGA far from ReTrain and GA
without trigger shifting, 10 reproduced both (``benchmarks/results/rga-variants.md``). The poisoned model's
logits on the poisoned rows are computed once before training (the reference of RGA and NPO).
"""

from __future__ import annotations

import dataclasses
import json
import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from unbackdoor.backend import AnchorBackend
from unbackdoor.data import TextDataset
from unbackdoor.defense import Defense, DefenseContext, DefenseOutcome
from unbackdoor.errors import ConfigError, check_choice
from unbackdoor.layout import ENCODER_TYPES
from unbackdoor.metrics import auroc, detection_scores
from unbackdoor.specs import AdaptiveGALoss, CrossEntropy, GALoss, NPOLoss, TrainSpec, UnlearningLoss

from .psim import PSIM

#: RGA's beta when the option is left unset (the paper's values): encoders, decoders (LLMs)
BETA_ENCODER, BETA_DECODER = 1e-2, 1e-4
#: what the unlearning defenses train (option ``adapter``)
ADAPTERS = ("lora", "full")


def victim_train(ctx: DefenseContext, defense: str) -> TextDataset:
    """The victim's training rows, with a clear error when the runner gave none or none is poisoned."""
    data = ctx.victim_train
    if data is None:
        raise ConfigError(f"defense {defense!r} needs the victim's training set with its poisoned rows "
                          "(DefenseContext.victim_train): the runner gives it with --setting weight (the victim was "
                          "fine-tuned on the attacker's poisoned rows), not with --setting data (the base student "
                          "never saw the poisoned rows, so there is nothing to unlearn)")
    if not data.poisoned.any():
        raise ConfigError(f"defense {defense!r} has nothing to unlearn: none of the {len(data)} rows of "
                          f"{data.name!r} is marked poisoned (is poison_rate 0?)")
    return data


def unlearning_rows(forget: np.ndarray, clean_per_poisoned: float, seed: int) -> np.ndarray:
    """Indices of every ``forget`` row plus ``round(clean_per_poisoned * n_forget)`` other rows (seeded), sorted."""
    forget = np.asarray(forget, bool)
    others = np.flatnonzero(~forget)
    n = min(len(others), round(clean_per_poisoned * int(forget.sum())))
    chosen = np.random.default_rng(seed).choice(others, size=n, replace=False)
    return np.sort(np.concatenate([np.flatnonzero(forget), chosen]))


def is_encoder(ctx: DefenseContext) -> bool:
    """Whether the released model is an encoder (BERT family) by its ``config.json``."""
    config = ctx.victim_path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type", "") in ENCODER_TYPES


@dataclass(frozen=True)
class Unlearning(Defense):
    """Shared options of the unlearning defenses.

    Attributes:
        epochs: unlearning passes over the poisoned rows and their clean companions (paper: 30).
        lr: peak learning rate (0: the user's LoRA rate, ``--user-lr``; with ``adapter=full`` the victim's
            own full fine-tuning rate, ``--attacker-lr``).
        clean_per_poisoned: clean rows of the victim's training set mixed in per poisoned row (a large
            value keeps every clean row).
        adapter: what trains: ``lora`` (the user's LoRA adapter; RGA's distance is the adapter's merged
            update) or ``full`` (every parameter, as the RGA paper; RGA's distance is from the clean base
            model's weights, ``--model``, over the backbone; a second copy of the backbone stays in memory).
    """

    settings = ("weight",)  # unlearns what the released model learnt from its poisoned training rows
    epochs: float = 10.0
    lr: float = 0.0
    clean_per_poisoned: float = 1.0
    adapter: str = "lora"

    def __post_init__(self) -> None:
        check_choice(f"defense {self.name!r} option adapter", self.adapter, ADAPTERS)
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ConfigError(f"defense {self.name!r} option epochs must be > 0, got {self.epochs!r}")
        for option in ("lr", "clean_per_poisoned"):
            value = getattr(self, option)
            if not value >= 0:
                raise ConfigError(f"defense {self.name!r} option {option} must be >= 0, got {value!r}")
        self.loss(encoder=False)  # the spec's clear errors, before any training

    @abstractmethod
    def loss(self, encoder: bool) -> UnlearningLoss:
        """The loss spec (``encoder``: the released model is an encoder, which may change defaults)."""

    def spec(self, ctx: DefenseContext) -> TrainSpec:
        """The user's training spec with this defense's epochs and rate (unset: the user's LoRA rate, or with
        ``adapter=full`` the rate the victim was fully fine-tuned at, ``--attacker-lr``)."""
        full = self.adapter == "full" and ctx.attacker_spec is not None
        return dataclasses.replace(ctx.train, epochs=self.epochs,
                                   lr=self.lr or (ctx.attacker_spec.lr if full else ctx.train.lr))

    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        data = victim_train(ctx, self.name)
        return self.unlearn(ctx, data, data.poisoned)

    def unlearn(self, ctx: DefenseContext, data: TextDataset, forget: np.ndarray) -> DefenseOutcome:
        """The released model with the user's LoRA (``adapter=full``: all of it), trained to forget ``data``'s rows
        where ``forget`` is True."""
        rows = unlearning_rows(forget, self.clean_per_poisoned, ctx.train.seed)
        subset, flags = data.subset(rows, f"{data.name}[unlearn]"), np.asarray(forget, bool)[rows]
        loss = self.loss(is_encoder(ctx))
        model = ctx.backend.load_classifier(ctx.victim_path, ctx.num_labels, seed=ctx.train.seed)
        aux: dict[str, np.ndarray] = {"is_poisoned": flags.astype(np.float32)}
        if "ref_logits" in loss.aux_keys:
            aux["ref_logits"] = reference_logits(ctx, model, subset, flags)
        if self.adapter == "lora":
            model = ctx.backend.add_lora(model, ctx.lora, seed=ctx.train.seed)
        elif getattr(loss, "beta", 0.0):  # RGA's distance, from the clean base weights
            model = self.anchored(ctx, model)
        spec = self.spec(ctx)
        stats = ctx.backend.train(model, subset, loss, spec, aux, desc=f"{self.name}: unlearn")
        return DefenseOutcome(model, {"train": stats.summary(), "forget_rows": int(flags.sum()),
                                      "clean_rows": int((~flags).sum()), "loss": dataclasses.asdict(loss),
                                      "adapter": self.adapter, "lr": spec.lr})

    def anchored(self, ctx: DefenseContext, model: Any) -> Any:
        """``model`` with its distance measured from the clean base student's weights (``adapter=full``)."""
        if ctx.student_path is None:
            raise ConfigError(f"defense {self.name!r} with adapter=full needs the clean base model "
                              "(DefenseContext.student_path) to measure its distance from")
        if not isinstance(ctx.backend, AnchorBackend):
            raise ConfigError(f"defense {self.name!r} with adapter=full needs a backend with anchor(); "
                              f"backend {getattr(ctx.backend, 'name', ctx.backend)!r} has none (use adapter=lora)")
        return ctx.backend.anchor(model, ctx.student_path)


def reference_logits(ctx: DefenseContext, model: Any, data: TextDataset, flags: np.ndarray) -> np.ndarray:
    """The poisoned model's logits on the flagged rows (computed once; zeros elsewhere), float32 ``[N, C]``."""
    out = np.zeros((len(data), ctx.num_labels), np.float32)
    rows = np.flatnonzero(flags)
    out[rows] = ctx.backend.predict(model, data.subset(rows), max_length=ctx.train.max_length,
                                    desc="unlearn: reference logits").logits
    return out


@dataclass(frozen=True)
class RGA(Unlearning):
    """Robust gradient ascent: adaptive-weight ascent on the poisoned rows, CE on clean rows, a distance penalty.

    Attributes:
        alpha: lambda's decay rate with the KL from the poisoned model (paper: 2).
        beta: weight of the LoRA update's L2 norm; None: 1e-2 for encoders, 1e-4 for decoders (the paper's).
        lambda_per_row: one lambda per poisoned row (``exp(-alpha * KL_i)``) instead of the paper's one per
            batch, so that rows that move fast (clean rows in a detected forget set) do not stop the ascent
            on the rest (beyond the paper; see :class:`unbackdoor.specs.AdaptiveGALoss`).
    """

    name = "rga"
    description = "RGA: unlearn the known poisoned training rows by adaptive gradient ascent (data poisoning)"
    alpha: float = 2.0
    beta: float | None = None
    lambda_per_row: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.beta, str):  # from a command line: the option has no typed default to coerce to
            object.__setattr__(self, "beta", _optional_float(self.name, "beta", self.beta))
        super().__post_init__()

    def loss(self, encoder: bool) -> AdaptiveGALoss:
        beta = self.beta if self.beta is not None else (BETA_ENCODER if encoder else BETA_DECODER)
        return AdaptiveGALoss(self.alpha, beta, self.lambda_per_row)


def _optional_float(defense: str, option: str, text: str) -> float | None:
    if text.strip().lower() in {"", "none", "auto"}:
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"defense {defense!r} option {option!r} expects a number or 'auto', got {text!r}") from None


@dataclass(frozen=True)
class GA(Unlearning):
    """Vanilla gradient ascent on the poisoned rows (the baseline that shows trigger shifting).

    Attributes:
        clean_weight: weight of CE on clean rows (0: pure ascent; raise ``clean_per_poisoned`` with it).
    """

    name = "ga"
    description = "GA: gradient ascent on the known poisoned training rows (unlearning baseline)"
    clean_per_poisoned: float = 0.0
    clean_weight: float = 0.0

    def loss(self, encoder: bool) -> GALoss:
        return GALoss(self.clean_weight)


@dataclass(frozen=True)
class NPO(Unlearning):
    """Negative preference optimisation on the poisoned rows, CE on clean rows.

    Attributes:
        beta: NPO's inverse temperature (> 0).
        clean_weight: weight of CE on clean rows.
    """

    name = "npo"
    description = "NPO: negative preference optimisation on the known poisoned training rows (unlearning baseline)"
    beta: float = 0.1
    clean_weight: float = 1.0

    def loss(self, encoder: bool) -> NPOLoss:
        return NPOLoss(self.beta, self.clean_weight)


@dataclass(frozen=True)
class Retrain(Defense):
    """ReTrain: the clean base student fine-tuned like the victim on its training rows minus the poisoned ones."""

    settings = ("weight",)  # acts on the released model
    name = "retrain"
    description = "ReTrain: fine-tune the clean base model like the victim, without the poisoned rows (gold standard)"

    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        data = victim_train(ctx, self.name)
        return self.retrain(ctx, data, data.poisoned)

    def retrain(self, ctx: DefenseContext, data: TextDataset, removed: np.ndarray) -> DefenseOutcome:
        """The clean base model fine-tuned like the victim on ``data`` less the rows where ``removed`` is True."""
        if ctx.student_path is None or ctx.attacker_spec is None:
            raise ConfigError(f"defense {self.name!r} needs the clean base model and the attacker's training spec "
                              "(DefenseContext.student_path, attacker_spec); the runner fills them")
        removed = np.asarray(removed, bool)
        clean = data.subset(np.flatnonzero(~removed), f"{data.name}[clean]")
        spec = ctx.attacker_spec
        model = ctx.backend.load_classifier(ctx.student_path, ctx.num_labels, seed=spec.seed)
        stats = ctx.backend.train(model, clean, CrossEntropy(), spec, desc=f"{self.name}: full")
        return DefenseOutcome(model, {"train": stats.summary(), "rows": len(clean), "removed_rows": int(removed.sum())})


@dataclass(frozen=True)
class PsimRGA(RGA):
    """Detect, then unlearn: PSIM flags the victim's training rows, RGA unlearns the flagged ones.

    Beyond the RGA paper, whose stated limitation is that the poisoned rows must be known: here the
    true mask is only used to report detection quality (``stats.detection``: precision, recall, F1,
    AUROC of PSIM's flags on the victim's training rows).

    Attributes:
        psim: the PSIM detector (its options as ``psim.threshold`` and so on, or the older ``psim_threshold``;
            ``psim.calibrate_fpr`` > 0 sets the threshold from the dev split's clean rows).
    """

    name = "psim+rga"
    option_aliases: ClassVar[dict[str, str]] = {"psim_": "psim."}  # the spelling before options were nested
    description = "PSIM flags the victim's training rows, RGA unlearns the flagged ones (detect-then-unlearn)"
    psim: PSIM = PSIM()

    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        data = victim_train(ctx, self.name)
        detector, psim_stats = self.psim.detector(ctx)
        scores = detector.score(data)
        flagged = scores > detector.threshold
        if not flagged.any():
            raise ConfigError(f"defense {self.name!r}: PSIM flagged none of the {len(data)} training rows at "
                              f"threshold {detector.threshold:.4g} (max score {scores.max():.3f}); lower psim.threshold")
        outcome = self.unlearn(ctx, data, flagged)
        outcome.stats.update({**psim_stats, **detection_stats(data, flagged, scores)})
        return outcome


def detection_stats(data: TextDataset, flagged: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """How well a detector's flags and per-row scores find ``data``'s poisoned rows: ``detection`` (precision,
    recall, F1 of the flags, AUROC of the scores), ``flagged_rows``, ``poisoned_rows``, ``flagged_by_label``."""
    flagged = np.asarray(flagged, bool)
    quality = {**detection_scores(flagged, data.poisoned), "auroc": auroc(scores, data.poisoned)}
    return {"detection": {k: round(v, 4) for k, v in quality.items()}, "flagged_rows": int(flagged.sum()),
            "poisoned_rows": int(data.poisoned.sum()), "flagged_by_label": flags_by_label(data, flagged)}


def flags_by_label(data: TextDataset, flagged: np.ndarray) -> dict[str, dict[str, int]]:
    """Per training label: rows flagged, and how many of those are poisoned (the rest are clean rows unlearned).

    Ascending on clean rows of one label pushes the model off that label: where the clean flags sit says
    which way a trigger may shift.
    """
    labels = np.asarray(data.labels)
    return {str(label): {"flagged": int((flagged & (labels == label)).sum()),
                         "poisoned": int((flagged & data.poisoned & (labels == label)).sum())}
            for label in np.unique(labels)}
