"""The training and inference loops of the jax backend.

Each loss spec trains with ONE ``jax.jit`` step (forward, loss, gradients of
the trainable parameters only, AdamW update), a pure function of
``(trainable, frozen, optimiser state, batch)``. The model's structure
(``GraphDef``), the loss spec and the dtype are static arguments of
module-level jitted functions, so identical models share compiled code.
Batches come from the core's length-bucketed padding, then widen to a short
ladder of lengths and a short last batch fills up with zero-weight rows, so
a run compiles once per ladder width (compiling costs seconds; padding a few
more masked tokens costs little).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from unbackdoor.backend import Predictions, TrainStats
from unbackdoor.batching import epoch_batches, iter_batches, lr_factor, num_batches, total_steps
from unbackdoor.data import TextDataset
from unbackdoor.guards import diverged, locate
from unbackdoor.progress import progress
from unbackdoor.specs import LossSpec, TrainSpec, reads_token_states
from unbackdoor.text import TextEncoder

from . import parallel
from .layers import AdapterParam, Ctx
from .lora import merged_copy
from .losses import batch_objective, loss_inputs
from .modeling import SequenceClassifier

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
HEAD = ("projection", "classifier")
# Padded widths a batch may take: few shapes, as each compiles once (seconds on CPU, more for deep models),
# for at most 50% padding above 64 tokens; the core's multiples of 8 would give 8 shapes up to 64.
WIDTHS = (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


def trainable_filter(module: SequenceClassifier, train_head: bool = True) -> Any:
    """With an adapter (LoRA, soft prompt): the adapter and the head; else every parameter (full fine-tune).

    ``train_head=False`` leaves the head (projection, classifier) out either way.
    """
    adapter = bool(jax.tree.leaves(nnx.state(module, AdapterParam)))
    if adapter:
        return lambda path, var: isinstance(var, AdapterParam) or (
            train_head and path[0] in HEAD and isinstance(var, nnx.Param))
    if train_head:
        return nnx.Param
    return lambda path, var: path[0] not in HEAD and isinstance(var, nnx.Param)


def adamw(lr: Any, weight_decay: float) -> optax.GradientTransformation:
    """torch's AdamW defaults (betas 0.9/0.999, eps 1e-8, decoupled decay scaled by the current lr)."""
    return optax.adamw(learning_rate=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)


def batch_loss(graphdef: Any, loss: LossSpec, dtype: Any, trainable: Any, frozen: Any, batch: Mapping[str, jax.Array],
               key: jax.Array | None, remat: bool = False) -> jax.Array:
    """The batch objective of ``loss`` (filler rows weigh 0); dropout on when ``key`` is given, the layers
    rematerialised in the backward pass with ``remat``."""
    model = nnx.merge(graphdef, trainable, frozen)
    logits, hidden = model(batch["input_ids"], batch["attention_mask"], Ctx(dtype, key, remat=remat),
                           reads_token_states(loss))
    return batch_objective(loss, model, logits.astype(jnp.float32), hidden.astype(jnp.float32), batch)


@partial(jax.jit, static_argnames=("graphdef", "loss", "weight_decay", "dtype", "remat"))
def train_step(graphdef: Any, loss: LossSpec, weight_decay: float, dtype: Any, trainable: Any, frozen: Any,
               opt_state: Any, batch: dict[str, jax.Array], lr: jax.Array, key: jax.Array,
               remat: bool = False) -> tuple[Any, Any, jax.Array]:
    """One fused step: forward, loss, gradients w.r.t. ``trainable`` only, AdamW at rate ``lr``."""
    value, grads = jax.value_and_grad(batch_loss, argnums=3)(graphdef, loss, dtype, trainable, frozen, batch, key,
                                                             remat)
    updates, opt_state = adamw(lr, weight_decay).update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, value


@partial(jax.jit, static_argnames=("graphdef", "dtype"))
def forward(graphdef: Any, state: Any, input_ids: jax.Array, attention_mask: jax.Array,
            dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Inference: ``logits`` and pooled states, no dropout."""
    logits, pooled = nnx.merge(graphdef, state)(input_ids, attention_mask, Ctx(dtype))
    return logits.astype(jnp.float32), pooled.astype(jnp.float32)


def padded_width(width: int, max_length: int) -> int:
    """The smallest ladder width >= ``width``, but never wider than the longest possible batch."""
    cap = max(width, -(-max_length // 8) * 8)  # the core pads to multiples of 8
    return min(next((w for w in WIDTHS if w >= width), width), cap)


def fill_batch(batch: Mapping[str, np.ndarray], rows: int, max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Widen to :func:`padded_width` (masked pad tokens) and fill to ``rows`` rows with weight-0 copies of row 0.

    Right padding leaves every real token's result unchanged: keys past the
    mask are ignored and causal queries never see later positions. ``position_weight`` ``[rows, width]``
    marks the positions of the batch as the core padded it (1) apart from the widening and the filler
    rows (0): a loss over every position (W2S ``released``) counts the same positions as the torch backend.
    """
    n, width = batch["input_ids"].shape
    take = np.concatenate([np.arange(n), np.zeros(rows - n, np.int64)])
    out = {k: np.asarray(v)[take] for k, v in batch.items() if k != "index"}
    extra = padded_width(width, max_length) - width
    out["input_ids"] = np.pad(out["input_ids"], ((0, 0), (0, extra)), constant_values=pad_id)
    out["attention_mask"] = np.pad(out["attention_mask"], ((0, 0), (0, extra)))
    out["weight"] = (np.arange(rows) < n).astype(np.float32)
    out["position_weight"] = np.pad(np.ones((n, width), np.float32), ((0, rows - n), (0, extra)))
    return out


def device_batch(batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """numpy -> jax: ids and labels int32, everything else float32."""
    return {k: jnp.asarray(v, jnp.int32 if v.dtype.kind in "iu" else jnp.float32) for k, v in batch.items()}


@dataclass(frozen=True)
class Steps:
    """What every step of one run shares: the model's static parts, the loss and the schedule."""

    graphdef: Any
    frozen: Any
    loss: LossSpec
    spec: TrainSpec
    total: int
    rows: int
    pad_id: int
    dtype: Any = jnp.float32  # the matmuls' dtype (:data:`DTYPES` of the backend's precision)
    mesh: Mesh | None = None  # data parallel: batches sharded by rows over it (see parallel)
    remat: bool = False  # gradient checkpointing of the scanned layers

    def run(self, trainable: Any, opt_state: Any, step: int, batch: Mapping[str, np.ndarray]) -> tuple[Any, Any, Any]:
        """Dispatch step ``step`` (asynchronously); returns new parameters, optimiser state and the loss."""
        lr = jnp.float32(self.spec.lr * lr_factor(step, self.total, int(self.spec.warmup_ratio * self.total)))
        full = fill_batch(batch, self.rows, self.spec.max_length, self.pad_id)
        arrays = device_batch(full) if self.mesh is None else parallel.shard_batch(full, self.mesh)
        # Dropout masks follow the spec's seed; the "rbg" generator compiles far faster than threefry on CPU.
        key = jax.random.fold_in(jax.random.key(self.spec.seed, impl="rbg"), step)
        return train_step(self.graphdef, self.loss, self.spec.weight_decay, self.dtype, trainable,
                          self.frozen, opt_state, arrays, lr, key, self.remat)

    def check(self, value: jax.Array, trainable: Any, batch: Mapping[str, np.ndarray]) -> float:
        """The loss as a float; non-finite: a TrainingDivergedError with the terms at ``trainable`` (before the step)."""
        out = float(value)
        if math.isfinite(out):
            return out
        arrays = fill_batch(batch, self.rows, self.spec.max_length, self.pad_id)
        model = nnx.merge(self.graphdef, trainable, self.frozen)
        logits, hidden = model(jnp.asarray(arrays["input_ids"]), jnp.asarray(arrays["attention_mask"]),
                               Ctx(self.dtype), reads_token_states(self.loss))
        inputs = loss_inputs(self.loss, model, arrays)  # the batch as the loss read it, its distance included
        raise diverged(self.loss, out, np.asarray(logits, np.float32), np.asarray(hidden, np.float32), inputs)


def fit(module: SequenceClassifier, encoder: TextEncoder, data: TextDataset, loss: LossSpec, spec: TrainSpec,
        aux: Mapping[str, np.ndarray], desc: str, mesh: Mesh | None = None, remat: bool = False,
        precision: str = "fp32") -> TrainStats:
    """Train ``module`` in place and report steps, samples, time and per-step losses.

    ``precision``: the matmuls' (:data:`DTYPES`); ``remat``: gradient checkpointing (the layers' activations are
    recomputed in the backward pass).
    With a ``mesh`` (:func:`unbackdoor_jax.parallel.data_mesh`) the module is replicated over it and every
    global batch is sharded by rows (data parallel); it ends replicated.
    """
    if len(data) == 0:
        raise ValueError(f"cannot train on the empty dataset {data.name!r}")
    ids = encoder.encode(data.texts, spec.max_length)
    if mesh is not None:
        parallel.replicate(module, mesh)
    graphdef, trainable, frozen = nnx.split(module, trainable_filter(module, spec.train_head), ...)
    rows = min(spec.batch_size, len(ids))
    steps = Steps(graphdef, frozen, loss, spec, total_steps(len(ids), spec),
                  rows if mesh is None else parallel.padded_rows(rows, mesh), encoder.pad_id, DTYPES[precision], mesh,
                  remat)
    opt_state = adamw(spec.lr, spec.weight_decay).init(trainable)
    losses: list[float] = []
    pending, samples, start = [], 0, time.perf_counter()
    batches = epoch_batches(ids, encoder.pad_id, {"labels": data.labels, **aux}, spec)
    for step, batch in enumerate(progress(batches, desc, steps.total)):
        before = trainable  # kept one step, so a non-finite loss is diagnosed at the parameters that produced it
        trainable, opt_state, value = steps.run(trainable, opt_state, step, batch)
        samples += len(batch["index"])
        # Read the previous loss while this step runs: dispatch stays async, checks one step behind.
        with locate(desc, len(losses), steps.total):
            losses.extend(steps.check(*p) for p in pending)
        pending = [(value, before, batch)]
    with locate(desc, len(losses), steps.total):
        losses.extend(steps.check(*p) for p in pending)
    nnx.update(module, trainable)
    return TrainStats(len(losses), samples, time.perf_counter() - start, losses[-1], tuple(losses))


def predict(module: SequenceClassifier, encoder: TextEncoder, data: TextDataset, batch_size: int, max_length: int,
            hidden: bool, precision: str, desc: str) -> Predictions:
    """Logits (and pooled states) for every row, restored to the dataset's order."""
    if len(data) == 0:
        raise ValueError(f"cannot predict on the empty dataset {data.name!r}")
    ids = encoder.encode(data.texts, max_length)
    graphdef, state = nnx.split(merged_copy(module))
    rows, dtype = min(batch_size, len(ids)), DTYPES[precision]
    logits_out: np.ndarray | None = None
    hidden_out: np.ndarray | None = None
    for batch in progress(iter_batches(ids, encoder.pad_id, batch_size), desc, num_batches(len(ids), batch_size)):
        full = fill_batch(batch, rows, max_length, encoder.pad_id)
        logits, pooled = forward(graphdef, state, jnp.asarray(full["input_ids"]), jnp.asarray(full["attention_mask"]),
                                 dtype)
        n = len(batch["index"])
        if logits_out is None:
            logits_out = np.zeros((len(ids), logits.shape[-1]), np.float32)
            hidden_out = np.zeros((len(ids), pooled.shape[-1]), np.float32) if hidden else None
        logits_out[batch["index"]] = np.asarray(logits)[:n]
        if hidden_out is not None:
            hidden_out[batch["index"]] = np.asarray(pooled)[:n]
    assert logits_out is not None
    return Predictions(logits_out, hidden_out)
