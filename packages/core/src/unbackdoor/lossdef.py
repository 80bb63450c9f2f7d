"""The loss contract: a loss is a spec class whose ``terms`` method is written once, for every backend.

A loss spec is a small frozen (so hashable: jax compiles a step per spec) dataclass with:

- ``aux_keys``: the per-row arrays the batch must carry besides ``labels`` (a class attribute);
- optionally ``token_states`` (property): True when it reads every token's final state ``[B, L, D]``
  (with ``attention_mask``) instead of the pooled state ``[B, D]``;
- optionally ``reads_parameter_distance`` (property): True when it reads the model's parameters through
  ``||theta - theta_base||_2``, which the backend then passes as the 0-d, differentiable
  ``batch[PARAMETER_DISTANCE]`` (the L2 norm of the LoRA adapter's merged update; for a fully trained model
  a backend anchored to base weights, the distance from them; else 0);
- ``terms(xp, logits, hidden, batch)``: its named :class:`Term` values, computed with the array-API
  namespace ``xp`` only (:mod:`unbackdoor.arrays` holds shared building blocks).

So a loss reads exactly: the logits ``[B, C]``; the pooled final state ``[B, D]`` or every token's state
``[B, L, D]`` with ``attention_mask [B, L]``; the batch's per-row arrays (``labels``, its ``aux_keys``, and
``weight [B]`` / ``position_weight [B, L]`` where a backend pads); and the parameter distance. A backend
builds the batch with :func:`model_inputs` and minimises :func:`objective`; it holds no code of any loss.

The NumPy reference (float64), the NaN guard's report and both backends' training steps (torch tensors
with autograd; jax traced inside ``jit``) all evaluate ``terms`` through :func:`objective`. Losses are
registered by name through the ``unbackdoor_losses`` hook (:class:`LossInfo`). Every built-in loss is written
this way, the unlearning losses (RGA, GA, NPO: batch values over the batch's poisoned and clean rows) too;
:mod:`unbackdoor.losses` keeps their closed forms as an independent check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import reduce
from operator import add
from typing import Any, ClassVar, Protocol, runtime_checkable

from .arrays import Array, namespace, row_mean
from .errors import ConfigError

#: the batch key of ``||theta - theta_base||_2`` (0-d), passed to a spec that ``reads_parameter_distance``
PARAMETER_DISTANCE = "parameter_distance"


@dataclass(frozen=True)
class Term:
    """One named term of a loss.

    Attributes:
        value: ``[B]`` per-row values (averaged over the batch's real rows) or a 0-d batch value.
        weight: its weight in the objective.
    """

    value: Array
    weight: float = 1.0


@runtime_checkable
class ArrayLoss(Protocol):
    """A loss spec whose math is written once against an array-API namespace (see the module docstring)."""

    aux_keys: ClassVar[tuple[str, ...]]

    def terms(self, xp: Any, logits: Array, hidden: Array | None, batch: Mapping[str, Array]) -> dict[str, Term]:
        """The named terms on one batch.

        Args:
            xp: the array-API namespace of the arrays.
            logits: ``[B, C]`` the model's logits.
            hidden: ``[B, D]`` its pooled final states, or ``[B, L, D]`` every token's (``token_states``).
            batch: per-row arrays ``[B, ...]``: ``labels``, ``attention_mask``, the spec's ``aux_keys``;
                ``weight [B]`` (0: filler rows) and ``position_weight [B, L]`` when a backend pads further;
                the 0-d :data:`PARAMETER_DISTANCE` when the spec ``reads_parameter_distance``.
        """
        ...


def is_array_loss(spec: object) -> bool:
    """Whether ``spec`` follows the written-once contract (no backend trains a spec that does not)."""
    return callable(getattr(spec, "terms", None))


def model_inputs(spec: object, parameter_distance: Callable[[], Array],
                 batch: Mapping[str, Array] | None = None) -> dict[str, Array]:
    """What ``spec`` reads of the model, to add to its ``batch``: ``{PARAMETER_DISTANCE: parameter_distance()}``
    when it ``reads_parameter_distance`` (the backend's differentiable distance, computed only then) and the
    batch does not carry one already (a loss evaluated on given outputs, :func:`unbackdoor.testing.check_loss`),
    else ``{}``."""
    if getattr(spec, "reads_parameter_distance", False) and PARAMETER_DISTANCE not in (batch or {}):
        return {PARAMETER_DISTANCE: parameter_distance()}
    return {}


def combine(terms: Mapping[str, Term], weight: Array | None = None) -> Array:
    """The objective: the (``weight``-weighted) row mean of the weighted per-row terms' sum, plus the weighted
    batch terms."""
    rows = [t.weight * t.value for t in terms.values() if t.value.ndim == 1]
    scalars = [t.weight * t.value for t in terms.values() if t.value.ndim == 0]
    parts = ([row_mean(reduce(add, rows), weight)] if rows else []) + scalars
    if not parts:
        raise ConfigError("a loss returned no terms; return at least one Term")
    return reduce(add, parts)


def per_row(spec: ArrayLoss, logits: Array, hidden: Array | None, batch: Mapping[str, Array]) -> Array:
    """``[B]``: the weighted sum of ``spec``'s per-row terms (its batch terms left out)."""
    terms = spec.terms(namespace(logits), logits, hidden, batch)
    rows = [t.weight * t.value for t in terms.values() if t.value.ndim == 1]
    if not rows:
        raise ConfigError(f"loss {type(spec).__name__} has no per-row terms (only batch values); use objective")
    return reduce(add, rows)


def objective(spec: ArrayLoss, logits: Array, hidden: Array | None, batch: Mapping[str, Array]) -> Array:
    """The scalar one training step minimises (see :func:`combine`); rows with ``weight`` 0 count nowhere."""
    return combine(spec.terms(namespace(logits), logits, hidden, batch), batch.get("weight"))


@dataclass(frozen=True)
class LossInfo:
    """A registered loss (what ``unbackdoor_losses`` returns).

    Attributes:
        name: the loss's name (``w2s``), unique over every plugin.
        description: one line for ``unbackdoor list``.
        spec: the spec class, a frozen dataclass with ``aux_keys``.
    """

    name: str
    description: str
    spec: type

    def __post_init__(self) -> None:
        params = getattr(self.spec, "__dataclass_params__", None)
        if not isinstance(self.spec, type) or params is None or not params.frozen:
            raise ConfigError(f"loss {self.name!r}: spec {self.spec!r} must be a frozen dataclass class "
                              "(jax compiles one step per spec, so specs must be hashable)")
        if not isinstance(getattr(self.spec, "aux_keys", None), tuple):
            raise ConfigError(f"loss {self.name!r}: spec {self.spec.__name__} needs a class attribute "
                              "aux_keys: tuple[str, ...] (the per-row arrays it reads; () for none)")

    @property
    def written_once(self) -> bool:
        """Whether the spec defines ``terms`` (one definition for every backend)."""
        return callable(getattr(self.spec, "terms", None))

    def fields(self) -> list[str]:
        """The spec's fields (its hyper-parameters)."""
        return [f.name for f in dataclasses.fields(self.spec)]
