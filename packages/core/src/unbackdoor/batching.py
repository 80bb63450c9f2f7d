"""Length-bucketed dynamic padding, shared by every backend.

Rows are grouped with others of similar length so a batch pads to its own
longest row (rounded up to ``multiple``, which keeps the number of distinct
shapes, and so jit caches, small) instead of to the global maximum.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from .specs import TrainSpec

Batch = dict[str, np.ndarray]


def pad_batch(ids: Sequence[np.ndarray], pad_id: int, multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest row (rounded up to ``multiple``): ``input_ids, attention_mask`` ``[B, L]``."""
    longest = max(len(x) for x in ids)
    width = -(-longest // multiple) * multiple
    input_ids = np.full((len(ids), width), pad_id, np.int32)
    mask = np.zeros((len(ids), width), np.int32)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = x
        mask[row, : len(x)] = 1
    return input_ids, mask


def trigger_batch(ids: Sequence[np.ndarray], insert_at: Sequence[int] | np.ndarray, length: int, pad_id: int,
                  multiple: int = 8) -> Batch:
    """Rows with ``length`` trigger slots inserted before position ``insert_at[b]`` of row ``b``.

    Returns ``input_ids`` and ``attention_mask`` ``[B, L]`` (right-padded as :func:`pad_batch`; the slots
    hold ``pad_id``, the backend puts the trigger's embeddings there) and ``trigger_at`` ``[B, length]``
    int32, the column of trigger token ``j`` in row ``b`` (:meth:`unbackdoor.backend.Backend.trigger_logits`).
    """
    starts = np.asarray(insert_at, np.int64).reshape(-1)
    slots = np.full(length, pad_id, np.int32)
    rows = [np.concatenate([x[:i], slots, x[i:]]) for x, i in zip(ids, starts, strict=True)]
    input_ids, mask = pad_batch(rows, pad_id, multiple)
    trigger_at = (starts[:, None] + np.arange(length)[None]).astype(np.int32)
    return {"input_ids": input_ids, "attention_mask": mask, "trigger_at": trigger_at}


def cached_trigger_batch(prefix: Sequence[Mapping[str, np.ndarray]], suffixes: Sequence[np.ndarray], length: int,
                         pad_id: int, multiple: int = 8) -> Batch:
    """:func:`trigger_batch`'s rows when each row's tokens before the trigger are given as cached states.

    ``prefix[b]`` holds row ``b``'s ``key`` and ``value`` ``[layers, P_b, kv_heads, head_dim]``
    (:meth:`unbackdoor.backend.TriggerCacheBackend.trigger_prefix`, cut to the row's ``P_b`` real tokens),
    ``suffixes[b]`` its token ids after the trigger. Returns ``input_ids``/``attention_mask`` ``[B, S]``: the
    ``length`` trigger slots (``pad_id``) and the suffix, right-padded to the longest (no rounding: a decoder
    reads every column); ``trigger_at`` ``[B, length]`` (``0..length-1``); ``past_key``/``past_value``
    ``[layers, B, P, kv_heads, head_dim]`` float32 with ``P`` the longest ``P_b`` rounded up to ``multiple``,
    ``past_mask`` ``[B, P]`` (1 on the real cached tokens) and ``past_length`` ``[B]`` (``P_b``, the position
    of the row's first trigger slot).
    """
    lengths = np.asarray([p["key"].shape[1] for p in prefix], np.int64)
    layers, _, heads, dim = prefix[0]["key"].shape
    width = max(multiple, -(-int(lengths.max()) // multiple) * multiple)
    past = {k: np.zeros((layers, len(prefix), width, heads, dim), np.float32) for k in ("key", "value")}
    for row, (states, n) in enumerate(zip(prefix, lengths, strict=True)):
        for k in past:
            past[k][:, row, :n] = states[k]
    slots = np.full(length, pad_id, np.int32)
    input_ids, mask = pad_batch([np.concatenate([slots, x]) for x in suffixes], pad_id, 1)
    return {"input_ids": input_ids, "attention_mask": mask,
            "trigger_at": np.broadcast_to(np.arange(length, dtype=np.int32), (len(prefix), length)).copy(),
            "past_key": past["key"], "past_value": past["value"],
            "past_mask": (np.arange(width)[None] < lengths[:, None]).astype(np.int32),
            "past_length": lengths.astype(np.int32)}


def trigger_weights(weights: np.ndarray, slots: int, vocab: int) -> np.ndarray:
    """``weights`` as float32 when they are ``[slots, V]`` with ``V <= vocab`` (the embedding matrix's rows),
    else a ValueError naming both shapes (:meth:`unbackdoor.backend.TriggerBackend.trigger_logits`)."""
    weights = np.asarray(weights, np.float32)
    if weights.ndim != 2 or weights.shape[0] != slots or weights.shape[1] > vocab:
        raise ValueError(f"trigger weights must be [{slots}, V <= {vocab}], got {list(weights.shape)}")
    return weights


def batch_order(lengths: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0,
                bucket: bool = True, pool: int = 50) -> list[np.ndarray]:
    """Row indices of each batch.

    With ``bucket`` the rows are sorted by length inside pools of
    ``pool * batch_size`` (shuffled first when ``shuffle``), cut into batches,
    and the batch order is shuffled: near-uniform lengths per batch while
    keeping the randomness of SGD.
    """
    rng = np.random.default_rng(seed)
    n = len(lengths)
    order = rng.permutation(n) if shuffle else np.arange(n)
    if bucket:
        span = pool * batch_size
        order = np.concatenate([
            chunk[np.argsort(lengths[chunk], kind="stable")] for chunk in np.array_split(order, max(1, -(-n // span)))
        ]) if n else order
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def iter_batches(
    ids: Sequence[np.ndarray],
    pad_id: int,
    batch_size: int,
    *,
    arrays: Mapping[str, np.ndarray] | None = None,
    shuffle: bool = False,
    seed: int = 0,
    bucket: bool = True,
    multiple: int = 8,
) -> Iterator[Batch]:
    """Yield padded batches with ``input_ids``, ``attention_mask``, ``index`` and each per-row array."""
    lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    for rows in batch_order(lengths, batch_size, shuffle=shuffle, seed=seed, bucket=bucket):
        input_ids, mask = pad_batch([ids[i] for i in rows], pad_id, multiple)
        batch: Batch = {"input_ids": input_ids, "attention_mask": mask, "index": rows}
        for key, value in (arrays or {}).items():
            batch[key] = np.asarray(value)[rows]
        yield batch


def num_batches(n: int, batch_size: int) -> int:
    """How many batches ``n`` rows make."""
    return -(-n // batch_size)


def epoch_batches(ids: list[np.ndarray], pad_id: int, arrays: Mapping[str, np.ndarray],
                  spec: TrainSpec) -> Iterator[Mapping[str, np.ndarray]]:
    """All training batches for ``spec.epochs`` (a fractional last epoch is cut short)."""
    total = total_steps(len(ids), spec)
    step = 0
    for epoch in range(math.ceil(spec.epochs)):
        for batch in iter_batches(ids, pad_id, spec.batch_size, arrays=arrays, shuffle=True,
                                  seed=spec.seed * 1000 + epoch):
            if step >= total:
                return
            step += 1
            yield batch


def total_steps(n: int, spec: TrainSpec) -> int:
    """Optimiser steps for ``n`` rows: ``ceil(epochs * batches per epoch)``, capped by ``max_steps``."""
    steps = math.ceil(spec.epochs * num_batches(n, spec.batch_size))
    return min(steps, spec.max_steps) if spec.max_steps else steps


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to the peak rate over ``warmup`` steps, then linear decay to zero at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))
