"""Typed specs: what to train and with which loss.

Specs are small frozen dataclasses shared by every backend. A loss spec names
a loss and its hyper-parameters, and carries its math, written once against
an array-API namespace (``terms``; the contract is :mod:`unbackdoor.lossdef`):
the NumPy reference and both backends evaluate it. The unlearning losses
(RGA, GA, NPO) also keep closed forms in :mod:`unbackdoor.losses`, the
independent check of their definitions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from . import arrays
from .arrays import Array
from .errors import ConfigError, check_choice, check_range
from .lossdef import PARAMETER_DISTANCE, Term

PRECISIONS = ("fp32", "bf16")
#: what ``--precision`` takes: a precision, or ``auto`` (the backend's choice for its device, resolved before any stage)
CONFIG_PRECISIONS = (*PRECISIONS, "auto")
#: how PSIM's reset labels are drawn (:class:`LabelResetLoss`)
RESET_LABELS = ("shuffle", "uniform")
#: the LoRA target that adapts every linear layer of the backbone (peft's)
ALL_LINEAR = "all-linear"
#: the experiment's LoRA target that stands for the model family's attention projections (below)
AUTO_TARGETS = "auto"
#: what ``auto`` means, tried in order (peft's defaults per family): the query and value projections of
#: the families the backends load, Llama / Mistral / Qwen2 and BERT / RoBERTa
FAMILY_TARGETS = (("q_proj", "v_proj"), ("query", "value"))


@dataclass(frozen=True)
class LoRASpec:
    """A LoRA adapter (peft's conventions: ``scaling = alpha / rank``).

    Attributes:
        rank: the adapter rank r.
        alpha: the scaling numerator.
        dropout: dropout on the adapter input.
        target_modules: names of the linear layers to adapt (``"all-linear"`` allowed).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {self.rank!r}")
        check_range("LoRA dropout", self.dropout, 0.0, 1.0)
        if not self.target_modules:
            raise ConfigError("LoRA target_modules is empty; name at least one layer, e.g. q_proj,v_proj")

    def adapts(self, layer: str) -> bool:
        """Whether the linear layer at dotted path ``layer`` is adapted (peft's rule: a target names the
        layer itself or a dotted suffix of its path)."""
        targets = self.target_modules
        return targets == (ALL_LINEAR,) or any(layer == t or layer.endswith("." + t) for t in targets)

    def chosen(self, layers: Iterable[str], what: str = "LoRA target_modules") -> list[str]:
        """The paths among ``layers`` (a model's linear layers) this adapter adapts, sorted.

        Raises:
            ConfigError: naming ``what``, the targets and the layer names to choose from, when none matches.
        """
        layers = list(layers)
        chosen = sorted(name for name in layers if self.adapts(name))
        if not chosen:
            names = sorted({name.rsplit(".", 1)[-1] for name in layers})
            raise ConfigError(f"{what} {list(self.target_modules)} match no linear layer; "
                              f"choose from {names} or {ALL_LINEAR!r}")
        return chosen


def resolve_targets(targets: tuple[str, ...], layers: Iterable[str], what: str = "lora_targets") -> tuple[str, ...]:
    """``targets`` for a model whose linear layers are ``layers``, with ``("auto",)`` made concrete.

    ``auto`` becomes the first of :data:`FAMILY_TARGETS` whose every name matches a layer.

    Raises:
        ConfigError: naming ``what``, the targets and the layer names to choose from, when they match nothing
            (or ``auto`` knows none of the model's layers).
    """
    layers = list(layers)
    if targets != (AUTO_TARGETS,):
        LoRASpec(target_modules=targets).chosen(layers, what)
        return targets
    for family in FAMILY_TARGETS:
        if all(any(LoRASpec(target_modules=(name,)).adapts(layer) for layer in layers) for name in family):
            return family
    names = sorted({layer.rsplit(".", 1)[-1] for layer in layers})
    raise ConfigError(f"{what} {AUTO_TARGETS!r} knows none of this model's attention layers (it tries "
                      f"{[','.join(f) for f in FAMILY_TARGETS]}); name them: choose from {names} or {ALL_LINEAR!r}")


@dataclass(frozen=True)
class PromptSpec:
    """A prompt-learning adapter (peft's conventions).

    Attributes:
        method: ``"prompt-tuning"`` (soft prompt, Lester et al.), ``"p-tuning"`` (prompt encoder, Liu et al.)
            or ``"prefix-tuning"`` (P-tuning v2 / prefix tuning: trained keys and values in every layer).
        num_virtual_tokens: length of the learned prompt.
        encoder_hidden_size: hidden size of the p-tuning prompt encoder.
    """

    method: str = "prompt-tuning"
    num_virtual_tokens: int = 20
    encoder_hidden_size: int = 128

    def __post_init__(self) -> None:
        check_choice("prompt-learning method", self.method, PROMPT_METHODS)
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens!r}")


PROMPT_METHODS = ("prompt-tuning", "p-tuning", "prefix-tuning")
PEFT_METHODS = ("lora", *PROMPT_METHODS)
AdapterSpec = LoRASpec | PromptSpec


@dataclass(frozen=True)
class TrainSpec:
    """One training run: optimiser AdamW with linear warm-up then linear decay.

    Attributes:
        epochs: passes over the data.
        lr: peak learning rate.
        batch_size: rows per optimiser step.
        max_length: tokens kept per row (longer rows are truncated).
        weight_decay: AdamW decoupled weight decay.
        warmup_ratio: share of steps spent warming up.
        seed: shuffling and initialisation seed.
        max_steps: stop after this many steps (None: all epochs).
        train_head: also train the classification head (projection and classifier); False keeps
            the model's head as it is and trains only the adapter (or the backbone, without one).
    """

    epochs: float = 1.0
    lr: float = 2e-4
    batch_size: int = 16
    max_length: int = 64
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    seed: int = 0
    max_steps: int | None = None
    train_head: bool = True

    def __post_init__(self) -> None:
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ConfigError(f"epochs must be > 0, got {self.epochs!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"learning rate must be > 0, got {self.lr!r}")
        for name in ("batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        check_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0)


@dataclass(frozen=True)
class CrossEntropy:
    """Plain cross-entropy on the labels: ``mean_i CE(z_i, y_i)``."""

    aux_keys: ClassVar[tuple[str, ...]] = ()

    def terms(self, xp: Any, logits: Array, hidden: Array | None, batch: Mapping[str, Array]) -> dict[str, Term]:
        """``cross_entropy [B]`` (see :class:`unbackdoor.lossdef.ArrayLoss`)."""
        return {"cross_entropy": Term(arrays.cross_entropy(logits, batch["labels"]))}


@dataclass(frozen=True)
class W2SLoss:
    """W2SDefense: ``alpha*CE + beta*T^2*KL(p_t^T || p_s^T) + gamma*A``.

    The batch needs the teacher's logits and projected hidden state per row
    (auxiliary arrays ``teacher_logits [N, C]`` and ``teacher_hidden [N, D]``).
    The alignment ``A`` (NumPy references in :mod:`unbackdoor.losses`) is one of:

    - ``pooled`` (the paper's text): each row's pooled student state (the last real token of a decoder)
      toward that row's projected teacher state; a per-row term.
    - ``tokens``: every real (non-pad) token state of each row toward that row's teacher state, averaged
      over the row's real tokens; a per-row term.
    - ``released`` (the authors' released script, ``word/unlearning.py``): every position of every row
      of the batch as padded (pad positions included) toward ONE vector, the teacher state of the
      batch's last row, averaged over ``B x L``; a batch term.

    The squared distance of two states is reduced over the hidden dimension by ``reduce``: ``mean``
    (per element, scale-free in the width) or ``sum`` (the released script's squared L2 distance, which
    grows with the width).

    Attributes:
        alpha: weight of the cross-entropy on the labels.
        beta: weight of the distillation term.
        gamma: weight of the feature-alignment term.
        temperature: softening temperature T of the distillation.
        alignment: ``pooled``, ``tokens`` or ``released`` (above).
        reduce: ``mean`` or ``sum`` over the hidden dimension, or ``auto``: ``sum`` for ``released`` (as the
            script), else ``mean`` (:attr:`reduction` is the one it resolves to).
    """

    alpha: float = 1.0
    beta: float = 0.2
    gamma: float = 0.2
    temperature: float = 2.0
    alignment: str = "pooled"
    reduce: str = "mean"
    aux_keys: ClassVar[tuple[str, ...]] = ("teacher_logits", "teacher_hidden")

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"W2S {name} must be a finite number >= 0, got {value!r}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"W2S temperature must be > 0, got {self.temperature!r}")
        check_choice("W2S alignment", self.alignment, ALIGNMENTS)
        check_choice("W2S reduce", self.reduce, ("auto", *HIDDEN_REDUCTIONS))

    @property
    def reduction(self) -> str:
        """``reduce`` resolved: ``mean`` or ``sum`` (``auto``: ``sum`` for ``released``, else ``mean``)."""
        if self.reduce != "auto":
            return self.reduce
        return "sum" if self.alignment == "released" else "mean"

    @property
    def token_states(self) -> bool:
        """Whether the loss reads every token's final state ``[B, L, D]`` (else the pooled state ``[B, D]``)."""
        return self.gamma > 0 and self.alignment != "pooled"

    @property
    def batch_term(self) -> bool:
        """Whether the alignment is one batch value (``released``) rather than a mean of per-row values."""
        return self.gamma > 0 and self.alignment == "released"

    def terms(self, xp: Any, logits: Array, hidden: Array | None, batch: Mapping[str, Array]) -> dict[str, Term]:
        """``cross_entropy``, ``distillation`` (when beta > 0) and ``alignment`` (when gamma > 0): per row
        ``[B]``, the ``released`` alignment a batch value (see :class:`unbackdoor.lossdef.ArrayLoss`)."""
        terms = {"cross_entropy": Term(arrays.cross_entropy(logits, batch["labels"]), self.alpha)}
        if self.beta:  # skipping a zero-weight term also skips its gradient work
            terms["distillation"] = Term(arrays.distillation(logits, batch["teacher_logits"], self.temperature),
                                         self.beta)
        if self.gamma:
            terms["alignment"] = Term(self.alignment_term(hidden, batch), self.gamma)
        return terms

    def alignment_term(self, hidden: Array | None, batch: Mapping[str, Array]) -> Array:
        """The unweighted alignment: ``[B]`` (``pooled``, ``tokens``) or the batch value (``released``)."""
        if hidden is None:
            raise ConfigError(f"W2S alignment {self.alignment!r} needs the student's hidden states; got none")
        teacher = batch["teacher_hidden"]
        if self.alignment == "pooled":
            return arrays.squared_distance(hidden - teacher, self.reduction)
        if self.alignment == "tokens":
            return arrays.token_alignment(hidden, batch["attention_mask"], teacher, self.reduction)
        return arrays.released_alignment(hidden, teacher, self.reduction, batch.get("weight"),
                                         batch.get("position_weight"))


#: W2S feature alignments (:class:`W2SLoss`)
ALIGNMENTS = ("pooled", "tokens", "released")
#: how a squared distance of two hidden states is reduced over the hidden dimension
HIDDEN_REDUCTIONS = ("mean", "sum")


def reads_token_states(spec: object) -> bool:
    """Whether a loss spec reads every token's final hidden state (backends then return ``[B, L, D]``)."""
    return bool(getattr(spec, "token_states", False))


@dataclass(frozen=True)
class LabelResetLoss:
    """PSIM: cross-entropy against labels reset at random (per-row array ``reset_labels [N]``).

    The reset labels are drawn once, seeded, by :func:`unbackdoor.losses.reset_labels`; a model
    trained on them learns nothing from clean content, so only a backdoor trigger stays confident.

    Attributes:
        reset_rate: share of training rows whose label is reset, in (0, 1].
        seed: drives which rows are reset and their new labels.
        labels: ``shuffle`` (the reset rows trade labels: the class balance is kept) or ``uniform`` (each
            draws a class uniformly: on an imbalanced dataset the model then learns no class prior, which a
            shuffle teaches it, so every input is as confident as the majority class).
    """

    reset_rate: float = 1.0
    seed: int = 0
    labels: str = "shuffle"
    aux_keys: ClassVar[tuple[str, ...]] = ("reset_labels",)

    def __post_init__(self) -> None:
        check_range("label reset rate", self.reset_rate, 0.0, 1.0)
        check_choice("label reset labels", self.labels, RESET_LABELS)
        if self.reset_rate == 0:
            raise ConfigError("label reset rate must be > 0 (0 would train on the true labels)")

    def terms(self, xp: Any, logits: Array, hidden: Array | None, batch: Mapping[str, Array]) -> dict[str, Term]:
        """``cross_entropy(reset_labels) [B]`` (see :class:`unbackdoor.lossdef.ArrayLoss`)."""
        return {"cross_entropy(reset_labels)": Term(arrays.cross_entropy(logits, batch["reset_labels"]))}


def _check_weight(what: str, name: str, value: float, *, positive: bool = False) -> None:
    """A ConfigError unless ``value`` is finite and >= 0 (> 0 when ``positive``)."""
    ok = isinstance(value, int | float) and math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        raise ConfigError(f"{what} {name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")


@dataclass(frozen=True)
class AdaptiveGALoss:
    """RGA: ``-lambda * mean_p CE + mean_c CE + beta * ||theta - theta_base||_2``.

    Unlearning losses are BATCH objectives, not means of per-row losses: a batch mixes poisoned rows
    (per-row flag ``is_poisoned [N]``, 1.0 or 0.0) and clean rows; each group's cross-entropy is averaged
    over that group's rows in the batch, and a term is zero when its group is absent from the batch
    (see :func:`unbackdoor.losses.unlearning_loss`). Rows with ``weight`` 0 (a backend's filler rows) count
    in neither group.

    ``lambda = exp(-alpha * mean_p KL(softmax(z_ref) || softmax(z)))`` is computed per batch over its
    poisoned rows and carries NO gradient (a constant of the step); ``z_ref`` are the logits of the
    poisoned model before unlearning, cached once per row (auxiliary array ``ref_logits [N, C]``; rows
    that are not poisoned may hold anything). With ``lambda_per_row`` (beyond the paper) each poisoned row
    gets its own ``lambda_i = exp(-alpha * KL_i)`` and the ascent term is ``-mean_p(lambda_i * CE_i)``: a
    row that has already moved away from the poisoned model (or a clean row wrongly in the forget set,
    which moves fast) stops being ascended without stopping the ascent on the others. The distance is
    the L2 norm of the LoRA adapter's merged
    update, ``sqrt(sum_layers ||scaling * B A||_F^2)`` (the adapted model minus the model the adapter was
    added to; the head is not penalised); for a fully trained model that a backend's ``anchor`` tied to
    base weights (full-parameter unlearning), ``||theta - theta_base||_2`` over every backbone parameter;
    else 0. A backend passes it as ``batch["parameter_distance"]`` (:attr:`reads_parameter_distance`).

    Attributes:
        alpha: how fast lambda falls as the model moves away from the poisoned model on the poisoned rows.
        beta: weight of the parameter distance (the paper: 1e-2 for encoders, 1e-4 for LLMs).
        lambda_per_row: one lambda per poisoned row instead of one per batch.
    """

    alpha: float = 2.0
    beta: float = 1e-4
    lambda_per_row: bool = False
    aux_keys: ClassVar[tuple[str, ...]] = ("is_poisoned", "ref_logits")

    def __post_init__(self) -> None:
        for name in ("alpha", "beta"):
            _check_weight("RGA", name, getattr(self, name))

    @property
    def reads_parameter_distance(self) -> bool:
        """Whether the loss reads ``||theta - theta_base||_2`` (:data:`unbackdoor.lossdef.PARAMETER_DISTANCE`)."""
        return self.beta != 0

    def terms(self, xp: Any, logits: Array, hidden: Array | None, batch: Mapping[str, Array]) -> dict[str, Term]:
        """Batch values (0-d): ``-lambda*cross_entropy[poisoned]``, ``cross_entropy[clean]`` and, when beta > 0,
        ``parameter_distance`` (see :class:`unbackdoor.lossdef.ArrayLoss`)."""
        w_p, w_c, ce = _grouped_cross_entropy(logits, batch)
        lam = arrays.adaptive_lambda(self.alpha, batch["ref_logits"], logits, w_p, self.lambda_per_row)
        terms = {"-lambda*cross_entropy[poisoned]": Term(-arrays.group_mean(lam * ce, w_p)),
                 "cross_entropy[clean]": Term(arrays.group_mean(ce, w_c))}
        if self.beta:
            terms["parameter_distance"] = Term(_parameter_distance(batch), self.beta)
        return terms


@dataclass(frozen=True)
class GALoss:
    """Vanilla gradient ascent: ``-mean_p CE + clean_weight * mean_c CE`` (per-row flag ``is_poisoned``).

    Attributes:
        clean_weight: weight of the cross-entropy on the clean rows (0: pure gradient ascent).
    """

    clean_weight: float = 0.0
    aux_keys: ClassVar[tuple[str, ...]] = ("is_poisoned",)

    def __post_init__(self) -> None:
        _check_weight("GA", "clean_weight", self.clean_weight)

    def terms(self, xp: Any, logits: Array, hidden: Array | None, batch: Mapping[str, Array]) -> dict[str, Term]:
        """Batch values (0-d): ``-cross_entropy[poisoned]`` and, when clean_weight > 0, ``cross_entropy[clean]``
        (see :class:`unbackdoor.lossdef.ArrayLoss`)."""
        w_p, w_c, ce = _grouped_cross_entropy(logits, batch)
        return _with_clean({"-cross_entropy[poisoned]": Term(-arrays.group_mean(ce, w_p))}, w_c, ce, self.clean_weight)


@dataclass(frozen=True)
class NPOLoss:
    """NPO: ``-(2/beta) * mean_p log sigmoid(beta * (CE - CE_ref)) + clean_weight * mean_c CE``.

    ``CE_ref`` is the poisoned model's cross-entropy on the row, from the cached ``ref_logits [N, C]``
    (Zhang et al., "Negative Preference Optimization", 2024, with ``log pi = -CE``).

    Attributes:
        beta: the inverse temperature, > 0 (small beta approaches gradient ascent).
        clean_weight: weight of the cross-entropy on the clean rows.
    """

    beta: float = 0.1
    clean_weight: float = 1.0
    aux_keys: ClassVar[tuple[str, ...]] = ("is_poisoned", "ref_logits")

    def __post_init__(self) -> None:
        _check_weight("NPO", "beta", self.beta, positive=True)
        _check_weight("NPO", "clean_weight", self.clean_weight)

    def terms(self, xp: Any, logits: Array, hidden: Array | None, batch: Mapping[str, Array]) -> dict[str, Term]:
        """Batch values (0-d): ``npo[poisoned]`` and, when clean_weight > 0, ``cross_entropy[clean]`` (see
        :class:`unbackdoor.lossdef.ArrayLoss`)."""
        w_p, w_c, ce = _grouped_cross_entropy(logits, batch)
        npo = arrays.npo_loss(self.beta, ce, arrays.cross_entropy(batch["ref_logits"], batch["labels"]))
        return _with_clean({"npo[poisoned]": Term(arrays.group_mean(npo, w_p))}, w_c, ce, self.clean_weight)


def _grouped_cross_entropy(logits: Array, batch: Mapping[str, Array]) -> tuple[Array, Array, Array]:
    """``(w_p, w_c, CE)``, each ``[B]``: the poisoned and clean rows' group-mean weights
    (:func:`unbackdoor.arrays.group_weights`; filler rows in neither) and the per-row cross-entropy."""
    w_p, w_c = arrays.group_weights(batch["is_poisoned"], logits.dtype, batch.get("weight"))
    return w_p, w_c, arrays.cross_entropy(logits, batch["labels"])


def _with_clean(terms: dict[str, Term], w_c: Array, ce: Array, clean_weight: float) -> dict[str, Term]:
    """``terms`` plus the clean rows' mean cross-entropy weighted ``clean_weight`` (left out at 0: no work)."""
    if clean_weight:
        terms["cross_entropy[clean]"] = Term(arrays.group_mean(ce, w_c), clean_weight)
    return terms


def _parameter_distance(batch: Mapping[str, Array]) -> Array:
    """The 0-d ``||theta - theta_base||_2`` a backend passed (a ConfigError naming the key when it did not)."""
    if PARAMETER_DISTANCE not in batch:
        raise ConfigError(f"RGA with beta > 0 reads the parameter distance, but the batch has no "
                          f"{PARAMETER_DISTANCE!r} (a backend adds it for a spec that reads_parameter_distance)")
    return batch[PARAMETER_DISTANCE]


UnlearningLoss = AdaptiveGALoss | GALoss | NPOLoss
LossSpec = CrossEntropy | W2SLoss | LabelResetLoss | AdaptiveGALoss | GALoss | NPOLoss
