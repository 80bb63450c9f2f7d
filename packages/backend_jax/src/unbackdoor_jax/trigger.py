"""Soft triggers: logits and the gradient w.r.t. a relaxed trigger's vocabulary weights (``trigger-search``).

One jitted function per model structure, trigger length and padded batch shape. A search calls it with
few shapes: batches widen to the training loop's width ladder (:func:`unbackdoor_jax.train.fill_batch`)
and fill up to a power-of-two number of rows with weight-0 copies, so the varying sizes of the evaluation
batches reuse a handful of compiled functions. On a decoder :func:`trigger_prefix` computes the keys and values
of each row's tokens before the trigger once; a batch carrying them (``past_key``...) runs only the trigger and
the tokens after it, its cached positions widened to the same ladder.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from unbackdoor.batching import trigger_weights

from .layers import Ctx
from .modeling import SequenceClassifier
from .train import device_batch, fill_batch, padded_width

Array = jax.Array
#: fewest rows a call pads to (smaller batches share one compiled function)
MIN_ROWS = 8


def embed_trigger(module: SequenceClassifier, input_ids: Array, trigger_at: Array, weights: Array) -> Array:
    """Input embeddings ``[B, L, D]`` float32: the ids' own, but ``weights[j] @ E[:V]`` at ``trigger_at[:, j]``."""
    table = module.backbone.input_embeddings()
    trigger = jnp.einsum("kv,vd->kd", weights, table.weight[: weights.shape[1]].astype(jnp.float32))
    rows = jnp.arange(input_ids.shape[0])[:, None]
    return table(input_ids).at[rows, trigger_at].set(jnp.broadcast_to(trigger, (*trigger_at.shape, trigger.shape[1])))


def _logits(module: SequenceClassifier, batch: Mapping[str, Array], weights: Array) -> Array:
    """``[B, C]`` float32 logits of the rows carrying the soft trigger, in evaluation mode (no dropout key)."""
    embeds = embed_trigger(module, batch["input_ids"], batch["trigger_at"], weights)
    past = {k: batch[f"past_{k}"] for k in ("key", "value", "mask", "length")} if "past_key" in batch else None
    logits, _ = module(batch["input_ids"], batch["attention_mask"], Ctx(jnp.float32), inputs_embeds=embeds,
                       past=past)
    return logits.astype(jnp.float32)


@partial(jax.jit, static_argnames=("graphdef",))
def prefix_states(graphdef: Any, state: Any, input_ids: Array, attention_mask: Array) -> tuple[Array, Array]:
    """The decoder's cached keys and values ``[layers, B, P, K, D]`` of the tokens, compiled."""
    return nnx.merge(graphdef, state).backbone.cached_keys(input_ids, attention_mask, Ctx(jnp.float32))


@partial(jax.jit, static_argnames=("graphdef",))
def logits_only(graphdef: Any, state: Any, batch: dict[str, Array], weights: Array) -> Array:
    """:func:`_logits` of the module ``(graphdef, state)``, compiled."""
    return _logits(nnx.merge(graphdef, state), batch, weights)


@partial(jax.jit, static_argnames=("graphdef",))
def logits_loss_grad(graphdef: Any, state: Any, batch: dict[str, Array], weights: Array) -> tuple[Array, Array, Array]:
    """Logits, the mean cross-entropy to ``batch["target"]`` over the real rows (``batch["weight"]``) and its
    gradient w.r.t. ``weights`` only (the model's parameters are constants here)."""
    module = nnx.merge(graphdef, state)

    def loss(w: Array) -> tuple[Array, Array]:
        logits = _logits(module, batch, w)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["target"])
        return (ce * batch["weight"]).sum() / batch["weight"].sum(), logits

    (value, logits), grad = jax.value_and_grad(loss, has_aux=True)(weights)
    return logits, value, grad


def padded_rows(rows: int) -> int:
    """The power of two (at least :data:`MIN_ROWS`) a batch of ``rows`` rows fills up to."""
    return max(MIN_ROWS, 1 << max(rows - 1, 0).bit_length())


def trigger_logits(module: SequenceClassifier, batch: Mapping[str, np.ndarray], weights: np.ndarray,
                   target: np.ndarray | None, pad_id: int) -> tuple[np.ndarray, float, np.ndarray | None]:
    """See :meth:`unbackdoor.backend.TriggerBackend.trigger_logits`: slot ``j`` embeds ``weights[j] @ E[:V]``."""
    table = module.backbone.input_embeddings().weight
    weights = trigger_weights(weights, np.shape(batch["trigger_at"])[1], table.shape[0])
    n = len(batch["input_ids"])
    parts = {k: np.asarray(batch[k]) for k in ("input_ids", "attention_mask", "trigger_at")}
    if target is not None:
        parts["target"] = np.asarray(target, np.int32)
    if "past_key" in batch:
        full = _fill_cached(parts, batch, padded_rows(n), int(module.backbone.max_positions), pad_id)
    else:
        full = fill_batch(parts, padded_rows(n), int(module.backbone.max_positions), pad_id)
        full.pop("position_weight")  # a per-position weight the loss here does not read
    graphdef, state = nnx.split(module)
    if target is None:
        return np.asarray(logits_only(graphdef, state, device_batch(full), jnp.asarray(weights)))[:n], float("nan"), None
    logits, loss, grad = logits_loss_grad(graphdef, state, device_batch(full), jnp.asarray(weights))
    return np.asarray(logits)[:n], float(loss), np.asarray(grad, np.float32)


def trigger_prefix(module: SequenceClassifier, batch: Mapping[str, np.ndarray],
                   pad_id: int) -> dict[str, np.ndarray] | None:
    """See :meth:`unbackdoor.backend.TriggerCacheBackend.trigger_prefix`: the keys and values
    ``[layers, B, P, K, D]``; None for an encoder or a model with a soft prompt."""
    if not module.meta.decoder or module.prompt is not None:
        return None
    n, width = np.shape(batch["input_ids"])
    parts = {k: np.asarray(batch[k]) for k in ("input_ids", "attention_mask")}
    full = fill_batch(parts, padded_rows(n), int(module.backbone.max_positions), pad_id)
    graphdef, state = nnx.split(module)
    keys, values = prefix_states(graphdef, state, jnp.asarray(full["input_ids"], jnp.int32),
                                 jnp.asarray(full["attention_mask"], jnp.int32))
    return {"key": np.asarray(keys)[:, :n, :width], "value": np.asarray(values)[:, :n, :width]}


def _fill_cached(parts: dict[str, np.ndarray], batch: Mapping[str, np.ndarray], rows: int,
                 max_positions: int, pad_id: int) -> dict[str, np.ndarray]:
    """A cached batch filled to ``rows`` rows (weight-0 copies of row 0), its cached positions widened to
    :func:`~unbackdoor_jax.train.padded_width` and its uncached columns to a power of two (few, short: an
    appended trigger's 2 stay 2), both masked: right padding leaves every real token's result as it was, and
    the pooled token is the last real one."""
    n, cached = len(parts["input_ids"]), np.shape(batch["past_mask"])[1]
    take = np.concatenate([np.arange(n), np.zeros(rows - n, np.int64)])
    extra = padded_width(cached, max_positions) - cached
    out = {k: v[take] for k, v in parts.items()}
    width = out["input_ids"].shape[1]
    wide = (1 << max(width - 1, 0).bit_length()) - width
    out["input_ids"] = np.pad(out["input_ids"], ((0, 0), (0, wide)), constant_values=pad_id)
    out["attention_mask"] = np.pad(out["attention_mask"], ((0, 0), (0, wide)))
    out["past_mask"] = np.pad(np.asarray(batch["past_mask"])[take], ((0, 0), (0, extra)))
    out["past_length"] = np.asarray(batch["past_length"])[take]
    for k in ("past_key", "past_value"):  # [layers, B, P, K, D]
        out[k] = np.pad(np.asarray(batch[k])[:, take], ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0)))
    out["weight"] = (np.arange(rows) < n).astype(np.float32)
    return out
