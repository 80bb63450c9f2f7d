"""Data-parallel training with ``torch.distributed`` (DDP), launched by ``torchrun``.

Every rank walks the same seeded sequence of global batches (the core's length-bucketed batches) and
trains on its slice of rows ``rank::world``; DDP averages the gradients, so with a global batch size
divisible by the world size a step equals the single-process step on the whole batch (up to the order
of the floating-point sums) for every per-example-mean loss (cross-entropy, W2S, label reset). The
unlearning losses (means over groups of rows of the batch) are not exact under sharding.

Use: ``torchrun --nproc-per-node N script.py`` where the script calls :func:`init` and then
:meth:`TorchBackend.train <unbackdoor_torch.backend.TorchBackend.train>` as usual: the backend trains
with :func:`fit` (the one training loop, :func:`unbackdoor_torch.train.fit`, with DDP steps on this rank's
rows) whenever a process group with more than one rank is initialised. CPU uses gloo, CUDA
uses NCCL with one GPU per rank (``LOCAL_RANK``). A ``TorchBackend`` made in a process torchrun started
as one of several joins the group itself, so ``torchrun --nproc-per-node N -m unbackdoor run ...`` runs
the whole experiment data-parallel (:func:`rank`, :func:`world_size` and :func:`barrier` are what the
core's runner asks for; see :mod:`unbackdoor.ranks`).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from unbackdoor.backend import TrainStats
from unbackdoor.data import TextDataset
from unbackdoor.errors import ConfigError, TrainingDivergedError
from unbackdoor.specs import LossSpec, TrainSpec, reads_token_states
from unbackdoor.text import TextEncoder

from . import train
from .losses import batch_objective
from .train import autocast


def init(backend: str | None = None) -> torch.device:
    """Join the process group torchrun describes (env vars) and return this rank's device."""
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if cuda else "gloo"))
        atexit.register(leave)
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def leave() -> None:
    """Destroy the process group :func:`init` joined (registered to run at exit): a rank that exits with the
    group alive leaves gloo's threads running, and was seen to abort at exit (``terminate called without an
    active exception``, exit -6) after its work was done."""
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the running process group (0 without one)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """How many ranks the running process group has (1 without one)."""
    return dist.get_world_size() if active() else 1


def barrier() -> None:
    """Return once every rank has called it (at once without a process group)."""
    if not active():
        return
    if dist.get_backend() == "nccl":  # name the GPU, or NCCL guesses one (with a warning)
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def shard(batch: Mapping[str, np.ndarray], rank: int, world: int) -> dict[str, np.ndarray]:
    """This rank's rows ``rank::world`` of a global batch (every array sliced alike)."""
    return {k: np.asarray(v)[rank::world] for k, v in batch.items()}


def _global_mean(value: torch.Tensor) -> torch.Tensor:
    out = value.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def ddp_step(ddp: DistributedDataParallel, optimizer: torch.optim.Optimizer, loss: LossSpec,
             batch: dict[str, torch.Tensor], precision: str) -> float:
    """One step on this rank's rows; gradients averaged by DDP. Returns the global batch loss."""
    with autocast(precision, batch["input_ids"].device):
        logits, hidden = ddp(batch["input_ids"], batch["attention_mask"], tokens=reads_token_states(loss))
    value = batch_objective(loss, ddp.module, logits.float(), hidden.float(), batch)
    mean = _global_mean(value)  # every rank sees a non-finite loss anywhere, so none waits in backward
    if not torch.isfinite(mean):
        raise TrainingDivergedError(f"non-finite loss {mean.item()} ({type(loss).__name__}, mean over "
                                    f"{dist.get_world_size()} ranks; this rank's loss {value.item()})")
    value.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(mean)


def fit(model: nn.Module, encoder: TextEncoder, data: TextDataset, loss: LossSpec, spec: TrainSpec,
        aux: Mapping[str, np.ndarray], device: torch.device, desc: str, precision: str = "fp32") -> TrainStats:
    """:func:`unbackdoor_torch.train.fit` over all ranks (DDP steps on each rank's rows); every rank ends with the
    same weights."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if spec.batch_size % world:
        raise ConfigError(f"batch size {spec.batch_size} must be divisible by the {world} data-parallel ranks")

    def steps(module: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[dict[str, torch.Tensor]], float]:
        ddp = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        return lambda batch: ddp_step(ddp, optimizer, loss, batch, precision)

    def rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(batch["index"]) < world:
            raise ConfigError(f"a batch of {len(batch['index'])} rows cannot be split over {world} ranks")
        return shard(batch, rank, world)

    return train.fit(model, encoder, data, loss, spec, aux, device, f"{desc} [rank {rank}/{world}]",
                     precision=precision, steps=steps, rows=rows)
