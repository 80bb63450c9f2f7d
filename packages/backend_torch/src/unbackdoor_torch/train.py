"""The training and inference loops of the torch backend.

One forward over the batch, one backward, one AdamW step: every loss spec is
a single fused step. Batches come from the core's length-bucketed padding.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from unbackdoor.backend import Predictions, TrainStats
from unbackdoor.batching import epoch_batches, iter_batches, lr_factor, num_batches, total_steps
from unbackdoor.data import TextDataset
from unbackdoor.guards import diverged, locate
from unbackdoor.progress import progress
from unbackdoor.specs import LossSpec, TrainSpec, reads_token_states
from unbackdoor.text import TextEncoder

from .losses import batch_objective, loss_inputs


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast when asked for, else a no-op."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_tensors(batch: Mapping[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """numpy batch -> tensors (ids and labels as int64, aux arrays as float32)."""
    out = {}
    for key, value in batch.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        out[key] = tensor.to(device, torch.float32 if value.dtype.kind == "f" else torch.int64)
    return out


def linear_schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The core's schedule (:func:`unbackdoor.batching.lr_factor`) as a torch scheduler."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup))


HEAD = ("projection.", "classifier.")


def make_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (call inside :func:`head_frozen`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


@contextlib.contextmanager
def head_frozen(model: nn.Module, spec: TrainSpec) -> Iterator[None]:
    """With ``spec.train_head`` False: the head takes no gradient while training (restored after)."""
    held = [] if spec.train_head else [p for n, p in model.named_parameters() if n.startswith(HEAD) and p.requires_grad]
    for param in held:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in held:
            param.requires_grad_(True)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: LossSpec,
               batch: dict[str, torch.Tensor], precision: str) -> float:
    """One fused step: forward, loss, backward, optimiser update. Returns the loss."""
    with autocast(precision, batch["input_ids"].device):
        logits, hidden = model(batch["input_ids"], batch["attention_mask"], tokens=reads_token_states(loss))
    value = batch_objective(loss, model, logits.float(), hidden.float(), batch)
    if not torch.isfinite(value):
        inputs = loss_inputs(loss, model, batch)  # the batch as the loss read it, its parameter distance included
        raise diverged(loss, value.item(), logits.detach().float().cpu().numpy(), hidden.detach().float().cpu().numpy(),
                       {k: v.detach().cpu().numpy() for k, v in inputs.items()})
    value.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(value.detach())


#: ``(model, optimizer) -> step``: builds the function that trains one batch of tensors and returns its loss
StepFactory = Callable[[nn.Module, torch.optim.Optimizer], Callable[[dict[str, torch.Tensor]], float]]


def plain_steps(loss: LossSpec, precision: str) -> StepFactory:
    """One process's steps (:func:`train_step`)."""
    return lambda model, optimizer: lambda batch: train_step(model, optimizer, loss, batch, precision)


def fit(model: nn.Module, encoder: TextEncoder, data: TextDataset, loss: LossSpec, spec: TrainSpec,
        aux: Mapping[str, np.ndarray], device: torch.device, desc: str, *, precision: str = "fp32",
        steps: StepFactory | None = None,
        rows: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] = dict) -> TrainStats:
    """Train ``model`` in place (matmuls at ``precision``) and report steps, samples, time and losses.

    ``steps`` builds the step (default :func:`plain_steps`; data-parallel ranks pass their own,
    :func:`unbackdoor_torch.parallel.fit`); ``rows`` picks the rows of each global batch this process trains on.
    """
    if len(data) == 0:
        raise ValueError(f"cannot train on the empty dataset {data.name!r}")
    torch.manual_seed(spec.seed)
    ids = encoder.encode(data.texts, spec.max_length)
    total = total_steps(len(ids), spec)
    with head_frozen(model, spec):  # before any wrapper (DDP), which registers the parameters that take gradients
        optimizer = make_optimizer(model, spec)
        step = (steps or plain_steps(loss, precision))(model, optimizer)
        scheduler = linear_schedule(optimizer, total, int(spec.warmup_ratio * total))
        model.train()
        losses, samples, start = [], 0, time.perf_counter()
        for batch in progress(epoch_batches(ids, encoder.pad_id, {"labels": data.labels, **aux}, spec), desc, total):
            with locate(desc, len(losses), total):
                losses.append(step(to_tensors(rows(batch), device)))
            scheduler.step()
            samples += len(batch["index"])
    model.eval()
    seconds = time.perf_counter() - start
    return TrainStats(len(losses), samples, seconds, losses[-1] if losses else float("nan"), tuple(losses))


@torch.inference_mode()
def predict(model: nn.Module, encoder: TextEncoder, data: TextDataset, batch_size: int, max_length: int,
            hidden: bool, device: torch.device, precision: str, desc: str) -> Predictions:
    """Logits (and pooled states) for every row, restored to the dataset's order."""
    model.eval()
    ids = encoder.encode(data.texts, max_length)
    logits_out: np.ndarray | None = None
    hidden_out: np.ndarray | None = None
    for batch in progress(iter_batches(ids, encoder.pad_id, batch_size), desc, num_batches(len(ids), batch_size)):
        t = to_tensors(batch, device)
        with autocast(precision, device):
            logits, pooled = model(t["input_ids"], t["attention_mask"])
        if logits_out is None:
            logits_out = np.zeros((len(ids), logits.shape[-1]), np.float32)
            hidden_out = np.zeros((len(ids), pooled.shape[-1]), np.float32) if hidden else None
        logits_out[batch["index"]] = logits.float().cpu().numpy()
        if hidden_out is not None:
            hidden_out[batch["index"]] = pooled.float().cpu().numpy()
    if logits_out is None:
        raise ValueError(f"cannot predict on the empty dataset {data.name!r}")
    return Predictions(logits_out, hidden_out)
