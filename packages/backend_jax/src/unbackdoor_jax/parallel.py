"""Data-parallel training over a 1-D ``jax.sharding`` mesh (axis ``"data"``).

The jitted train step itself is unchanged: its batch arrays arrive sharded by
rows over the mesh (``PartitionSpec("data")``) while the parameters and the
optimiser state arrive replicated, so XLA's SPMD partitioner runs each device
on its rows and inserts the all-reduce of the gradients. The step still
computes the objective of the whole global batch (not a mean of per-device
means), so every loss, the unlearning ones with their group means included,
equals the single-device step up to the order of the floating-point sums.
The global batch is the single-device one, with weight-0 filler rows added
so that the row count divides by the device count.

Selection (backend option ``JaxBackend.data_parallel``, default from the
``UNBACKDOOR_JAX_DATA_PARALLEL`` environment variable): ``auto`` (default)
shards whenever jax sees more than one device, ``on`` always uses the mesh
(even of one device), ``off`` trains on the default device only.
Multi-host (TPU slices, several GPU nodes): call ``jax.distributed.initialize()``
before the first jax computation; ``jax.devices()`` then spans every host and
every process must walk the same batches (the core's seeded batching does).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unbackdoor.errors import check_choice

ENV = "UNBACKDOOR_JAX_DATA_PARALLEL"
MODES = ("auto", "on", "off")
AXIS = "data"


def default_mode() -> str:
    """The mode named by ``UNBACKDOOR_JAX_DATA_PARALLEL`` (``auto`` when unset)."""
    return os.environ.get(ENV, "auto")


def data_mesh(mode: str) -> Mesh | None:
    """A mesh of every device along ``"data"``, or None for single-device training (``off``, or ``auto`` on one device)."""
    check_choice("jax data-parallel mode", mode, MODES)
    devices = jax.devices()
    if mode == "off" or (mode == "auto" and len(devices) == 1):
        return None
    return Mesh(np.asarray(devices), (AXIS,))


def padded_rows(rows: int, mesh: Mesh) -> int:
    """``rows`` rounded up to a multiple of the mesh's device count (the extra rows are weight-0 fillers)."""
    return -(-rows // mesh.size) * mesh.size


def _put(value: Any, sharding: NamedSharding) -> jax.Array:
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    # Several hosts: each builds its devices' slices of the global value, which every process holds alike
    # (device_put would instead check that equality with a collective on every call).
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(module: nnx.Module, mesh: Mesh) -> None:
    """Copy every variable of ``module`` onto all devices of ``mesh``, in place (the old buffers are freed)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    nnx.update(module, jax.tree.map(lambda v: _put(v, sharding), nnx.state(module)))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """A filled host batch as global arrays split by rows over ``"data"`` (ids and labels int32, else float32)."""
    sharding = NamedSharding(mesh, PartitionSpec(AXIS))
    return {k: _put(np.asarray(v, np.int32 if np.asarray(v).dtype.kind in "iu" else np.float32), sharding)
            for k, v in batch.items()}
