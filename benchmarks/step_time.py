"""Step time of the fused W2S step, jax (one jitted function) vs torch, on the real SmolLM2-135M.

Both backends get the same batch (``BATCH`` SST-2 rows cut to ``MAX_LEN`` tokens, so every row has
the full width and no backend pads differently), LoRA r=8 on q_proj/v_proj, fp32, AdamW at a fixed
rate, and the same cached teacher outputs (random, fixed seed: the step's cost does not depend on
their values). Each backend runs ``WARMUP`` steps first (for jax the first one compiles: its time
is the compile time, reported separately), then ``STEPS`` timed steps; the median step is reported.

``torch_steps`` and ``jax_steps`` also take another batch, precision, device, loss, LoRA and step counts: the
device check (``device_check.py``) times the bf16 step on a GPU with them, ``precision.py`` compares fp32 with
bf16. Each also reports the bytes the model's parameters hold and the peak memory of its timed steps.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from unbackdoor.data import load_dataset
from unbackdoor.models import resolve_model
from unbackdoor.specs import LoRASpec, LossSpec, TrainSpec, W2SLoss

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


def packed(train: Any, encoder: Any, rows: int, length: int) -> tuple[list[str], np.ndarray]:
    """``rows`` texts of consecutive SST-2 rows joined until each has ``length`` tokens; each keeps its first
    row's label."""
    texts, labels, i = [], [], 0
    while len(texts) < rows:
        if i >= len(train.texts):
            raise ValueError(f"SST-2 train has too few rows to pack {rows} rows of {length} tokens")
        parts, label = [], int(train.labels[i])
        while len(encoder.encode([" ".join(parts)], length + 1)[0]) <= length and i < len(train.texts):
            parts.append(train.texts[i])
            i += 1
        texts.append(" ".join(parts))
        labels.append(label)
    return texts, np.asarray(labels, np.int64)


def packed_batch(encoder: Any, hidden_size: int, rows: int, length: int) -> dict[str, np.ndarray]:
    """``rows`` x ``length`` tokens of packed SST-2 rows (no padding) with random teacher outputs."""
    texts, labels = packed(load_dataset("sst2").train, encoder, rows, length)
    ids = np.stack(encoder.encode(texts, length)).astype(np.int64)
    rng = np.random.default_rng(0)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels,
            "teacher_logits": rng.normal(size=(rows, 2)).astype(np.float32),
            "teacher_hidden": rng.normal(size=(rows, hidden_size)).astype(np.float32)}


def _host_peak_mb() -> float | None:
    """This process's peak resident memory (Linux ``VmHWM``), None where /proc does not tell."""
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def host_peak_window() -> Callable[[], float | None]:
    """Start a new peak-memory window for the host (Linux: ``clear_refs`` 5 resets ``VmHWM``); the returned
    function reads the peak since (None where the kernel does not allow it)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return lambda: None
    return _host_peak_mb


def _timed(step: Any, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def _summary(step: Any, warmup: int, steps: int) -> dict[str, Any]:
    """``warmup`` steps (the first one's time kept), then the median of ``steps`` timed ones."""
    warm = _timed(step, warmup)
    median = statistics.median(_timed(step, steps))
    return {"first_step_s": warm[0], "compile_s": warm[0] - median, "step_s": median}


def torch_steps(path: Path, batch: dict[str, np.ndarray] | None = None, precision: str = "fp32",
                device: str = "cpu", warmup: int = WARMUP, steps: int = STEPS, loss: LossSpec = LOSS,
                lora: LoRASpec = LORA) -> dict[str, Any]:
    """Median seconds per torch step (``unbackdoor_torch.train.train_step``) on ``device``.

    ``batch``: input_ids, attention_mask, labels, teacher_logits, teacher_hidden (default: :func:`_batch`'s).
    Each step reads its loss back (``float``), so it has finished on a GPU when its time is taken. The
    backend's precision is set before LoRA is added, so in bf16 the frozen weights are held in bf16.
    """
    import torch

    from unbackdoor_torch.backend import TorchBackend
    from unbackdoor_torch.train import make_optimizer, to_tensors, train_step

    backend = TorchBackend(device)
    backend.precision = precision
    model = backend.add_lora(backend.load_classifier(path, 2, seed=0), lora, seed=0)
    arrays = _batch(model.encoder, backend.hidden_size(model)) if batch is None else batch
    tensors = to_tensors(arrays, torch.device(device))
    optimizer = make_optimizer(model.module, SPEC)
    model.module.train()

    def step() -> None:
        train_step(model.module, optimizer, loss, tensors, precision)

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    peak = (lambda: torch.cuda.max_memory_allocated() / 2**20) if cuda else host_peak_window()
    out = _summary(step, warmup, steps)
    del out["compile_s"]  # eager: nothing compiles
    held = sum(p.numel() * p.element_size() for p in model.module.parameters()) / 2**20
    return {**out, "threads": torch.get_num_threads(), "device": backend.device_name, "precision": precision,
            "weights_mb": held, "peak_mb": peak(), "peak_of": "CUDA allocated" if cuda else "host resident"}


def jax_steps(path: Path, batch: dict[str, np.ndarray] | None = None, precision: str = "fp32",
              warmup: int = WARMUP, steps: int = STEPS, loss: LossSpec = LOSS, lora: LoRASpec = LORA) -> dict[str, Any]:
    """Median seconds per jax step (``unbackdoor_jax.train.train_step``, one jitted function) and compile time,
    on jax's default device; ``batch`` as for :func:`torch_steps`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from unbackdoor_jax.backend import JaxBackend
    from unbackdoor_jax.train import DTYPES, adamw, device_batch, train_step, trainable_filter

    backend = JaxBackend()
    backend.precision = precision
    model = backend.add_lora(backend.load_classifier(path, 2, seed=0), lora, seed=0)
    arrays = dict(_batch(model.encoder, backend.hidden_size(model)) if batch is None else batch)
    arrays["weight"] = np.ones(len(arrays["labels"]), np.float32)
    tensors = device_batch(arrays)
    graphdef, trainable, frozen = nnx.split(model.module, trainable_filter(model.module), ...)
    state = {"trainable": trainable, "opt": adamw(SPEC.lr, SPEC.weight_decay).init(trainable)}
    key, lr = jax.random.key(0, impl="rbg"), jnp.float32(SPEC.lr)

    def step() -> None:
        out = train_step(graphdef, loss, SPEC.weight_decay, DTYPES[precision], state["trainable"], frozen,
                         state["opt"], tensors, lr, key)
        state["trainable"], state["opt"] = out[0], out[1]
        jax.block_until_ready(out[2])

    accelerator = jax.devices()[0].platform != "cpu"
    peak = (lambda: (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**20) if accelerator \
        else host_peak_window()
    out = _summary(step, warmup, steps)
    held = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model.module))) / 2**20
    return {**out, "devices": str(jax.devices()), "device": backend.device_name, "precision": precision,
            "weights_mb": held, "peak_mb": peak(), "peak_of": "device peak in use" if accelerator else "host resident"}


def measure(cache: Path) -> dict[str, Any]:
    """Both backends in one process (torch first), the same batch shapes."""
    path = resolve_model("smollm2-135m", cache)
    out = {"setting": f"SmolLM2-135M, LoRA r=8 q_proj/v_proj, batch {BATCH} x {MAX_LEN} tokens, fp32, "
                      f"W2S a=1 b=0.2 c=0.2 T=2; {WARMUP} warm-up steps, median of {STEPS} timed steps",
           "torch": torch_steps(path), "jax": jax_steps(path)}
    out["ratio_jax_over_torch"] = out["jax"]["step_s"] / out["torch"]["step_s"]
    return out
