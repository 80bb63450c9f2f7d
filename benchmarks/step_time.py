"""Step time of the fused W2S step, jax (one jitted function) vs torch, on the real SmolLM2-135M.

Both backends get the same batch (``BATCH`` SST-2 rows cut to ``MAX_LEN`` tokens, so every row has
the full width and no backend pads differently), LoRA r=8 on q_proj/v_proj, fp32, AdamW at a fixed
rate, and the same cached teacher outputs (random, fixed seed: the step's cost does not depend on
their values). Each backend runs ``WARMUP`` steps first (for jax the first one compiles: its time
is the compile time, reported separately), then ``STEPS`` timed steps; the median step is reported.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from unbackdoor.data import load_dataset
from unbackdoor.models import resolve_model
from unbackdoor.specs import LoRASpec, TrainSpec, W2SLoss

BATCH, MAX_LEN, WARMUP, STEPS = 16, 48, 2, 10
LOSS = W2SLoss(1.0, 0.2, 0.2, 2.0)
LORA = LoRASpec(8, 16.0)
SPEC = TrainSpec(1, 2e-4, BATCH, MAX_LEN, weight_decay=0.0)


def _batch(encoder: Any, hidden_size: int) -> dict[str, np.ndarray]:
    """The shared batch: the longest SST-2 rows (all cut to MAX_LEN), labels and teacher outputs."""
    train = load_dataset("sst2").train
    ids = encoder.encode(list(train.texts), MAX_LEN)
    longest = np.argsort([-len(x) for x in ids], kind="stable")[:BATCH]
    rows = np.stack([ids[i] for i in longest]).astype(np.int64)
    if rows.shape != (BATCH, MAX_LEN):
        raise RuntimeError(f"expected {BATCH} rows of {MAX_LEN} tokens, got {rows.shape}")
    rng = np.random.default_rng(0)
    return {"input_ids": rows, "attention_mask": np.ones_like(rows), "labels": train.labels[longest].astype(np.int64),
            "teacher_logits": rng.normal(size=(BATCH, 2)).astype(np.float32),
            "teacher_hidden": rng.normal(size=(BATCH, hidden_size)).astype(np.float32)}


def _timed(step: Any, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def torch_steps(path: Path) -> dict[str, Any]:
    """Median seconds per torch step (``unbackdoor_torch.train.train_step``)."""
    import torch

    from unbackdoor_torch.backend import TorchBackend
    from unbackdoor_torch.train import make_optimizer, to_tensors, train_step

    backend = TorchBackend("cpu")
    model = backend.add_lora(backend.load_classifier(path, 2, seed=0), LORA, seed=0)
    batch = to_tensors(_batch(model.encoder, backend.hidden_size(model)), torch.device("cpu"))
    optimizer = make_optimizer(model.module, SPEC)
    model.module.train()

    def step() -> None:
        train_step(model.module, optimizer, LOSS, batch, "fp32")

    warm = _timed(step, WARMUP)
    times = _timed(step, STEPS)
    return {"first_step_s": warm[0], "step_s": statistics.median(times), "threads": torch.get_num_threads()}


def jax_steps(path: Path) -> dict[str, Any]:
    """Median seconds per jax step (``unbackdoor_jax.train.train_step``, one jitted function) and compile time."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from unbackdoor_jax.backend import JaxBackend
    from unbackdoor_jax.train import DTYPES, adamw, device_batch, train_step, trainable_filter

    backend = JaxBackend()
    model = backend.add_lora(backend.load_classifier(path, 2, seed=0), LORA, seed=0)
    arrays = _batch(model.encoder, backend.hidden_size(model))
    arrays["weight"] = np.ones(BATCH, np.float32)
    batch = device_batch(arrays)
    graphdef, trainable, frozen = nnx.split(model.module, trainable_filter(model.module), ...)
    state = {"trainable": trainable, "opt": adamw(SPEC.lr, SPEC.weight_decay).init(trainable)}
    key, lr = jax.random.key(0, impl="rbg"), jnp.float32(SPEC.lr)

    def step() -> None:
        out = train_step(graphdef, LOSS, SPEC.weight_decay, DTYPES["fp32"], state["trainable"], frozen, state["opt"],
                         batch, lr, key)
        state["trainable"], state["opt"] = out[0], out[1]
        jax.block_until_ready(out[2])

    warm = _timed(step, WARMUP)
    times = _timed(step, STEPS)
    median = statistics.median(times)
    return {"first_step_s": warm[0], "compile_s": warm[0] - median, "step_s": median, "devices": str(jax.devices())}


def measure(cache: Path) -> dict[str, Any]:
    """Both backends in one process (torch first), the same batch shapes."""
    path = resolve_model("smollm2-135m", cache)
    out = {"setting": f"SmolLM2-135M, LoRA r=8 q_proj/v_proj, batch {BATCH} x {MAX_LEN} tokens, fp32, "
                      f"W2S a=1 b=0.2 c=0.2 T=2; {WARMUP} warm-up steps, median of {STEPS} timed steps",
           "torch": torch_steps(path), "jax": jax_steps(path)}
    out["ratio_jax_over_torch"] = out["jax"]["step_s"] / out["torch"]["step_s"]
    return out
