"""The loss contract: a loss is a spec class whose ``terms`` method is written once, for every backend.

A loss spec is a small frozen (so hashable: jax compiles a step per spec) dataclass with:

- ``aux_keys``: the per-row arrays the batch must carry besides ``labels`` (a class attribute);
- optionally ``token_states`` (property): True when it reads every token's final state ``[B, L, D]``
  (with ``attention_mask``) instead of the pooled state ``[B, D]``;
- ``terms(xp, logits, hidden, batch)``: its named :class:`Term` values, computed with the array-API
  namespace ``xp`` only (:mod:`unbackdoor.arrays` holds shared building blocks).

The NumPy reference (float64), the NaN guard's report and both backends' training steps (torch tensors
with autograd; jax traced inside ``jit``) all evaluate ``terms`` through :func:`objective`. Losses are
registered by name through the ``unbackdoor_losses`` hook (:class:`LossInfo`). The unlearning losses (RGA,
GA, NPO: batch objectives over groups of rows that may read the model's parameters) are registered too but
still have one implementation per backend and NumPy references in :mod:`unbackdoor.losses`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from functools import reduce
from operator import add
from typing import Any, ClassVar, Protocol, runtime_checkable

from .arrays import Array, namespace, row_mean
from .errors import ConfigError


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
                ``weight [B]`` (0: filler rows) and ``position_weight [B, L]`` when a backend pads further.
        """
        ...


def is_array_loss(spec: object) -> bool:
    """Whether ``spec`` follows the written-once contract (else a backend implements it itself)."""
    return callable(getattr(spec, "terms", None))


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
    return reduce(add, [t.weight * t.value for t in terms.values() if t.value.ndim == 1])


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
