"""W2S training throughput: our fused loop vs a naive HF-Trainer-style loop, same data, same run.

Naive = every batch padded to ``max_length``, rows in file order, and the
frozen teacher recomputed at every step. Fused = length-bucketed dynamic
padding and teacher outputs computed once and cached (their time counted).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unbackdoor.data import load_dataset
from unbackdoor.models import resolve_model
from unbackdoor.specs import LoRASpec, TrainSpec, W2SLoss
from unbackdoor_torch.backend import TorchBackend
from unbackdoor_torch.losses import per_example_loss
from unbackdoor_torch.train import make_optimizer

ROWS, EPOCHS, BATCH, MAX_LEN = 96, 2, 16, 48
LOSS = W2SLoss(1.0, 0.2, 0.2, 2.0)


def _models(backend: TorchBackend, cache: Path) -> tuple[Any, Any]:
    student = backend.load_classifier(resolve_model("smollm2-135m", cache), 2, seed=0)
    student = backend.add_lora(student, LoRASpec(8, 16.0), seed=0)
    teacher = backend.load_classifier(resolve_model("minilm-l6", cache), 2, projection_dim=576, seed=0)
    return student, teacher


def fused(backend: TorchBackend, cache: Path, rows: Any, precision: str = "fp32") -> float:
    """samples/s of teacher-outputs-once + ``TorchBackend.train``."""
    student, teacher = _models(backend, cache)
    backend.precision = precision
    start = time.perf_counter()
    t = backend.predict(teacher, rows, max_length=MAX_LEN, hidden=True)
    backend.train(student, rows, LOSS, TrainSpec(EPOCHS, 2e-4, BATCH, MAX_LEN),
                  {"teacher_logits": t.logits, "teacher_hidden": t.hidden})
    backend.precision = "fp32"
    return ROWS * EPOCHS / (time.perf_counter() - start)


def _padded(encoder: Any, texts: list[str]) -> torch.Tensor:
    ids = encoder.encode(texts, MAX_LEN)
    out = np.full((len(ids), MAX_LEN), encoder.pad_id, np.int64)
    for i, x in enumerate(ids):
        out[i, : len(x)] = x
    return torch.from_numpy(out)


def naive(backend: TorchBackend, cache: Path, rows: Any) -> float:
    """samples/s of the naive loop (max-length padding, teacher forward every step)."""
    student, teacher = _models(backend, cache)
    opt = make_optimizer(student.module, TrainSpec(EPOCHS, 2e-4, BATCH, MAX_LEN))
    student.module.train()
    start = time.perf_counter()
    for _ in range(EPOCHS):
        for i in range(0, ROWS, BATCH):
            texts = list(rows.texts[i : i + BATCH])
            s_ids, t_ids = _padded(student.encoder, texts), _padded(teacher.encoder, texts)
            with torch.no_grad():
                t_logits, t_hidden = teacher.module(t_ids, (t_ids != teacher.encoder.pad_id).long())
            logits, hidden = student.module(s_ids, (s_ids != student.encoder.pad_id).long())
            batch = {"labels": torch.from_numpy(rows.labels[i : i + BATCH]), "teacher_logits": t_logits,
                     "teacher_hidden": t_hidden}
            per_example_loss(LOSS, logits, hidden, batch).mean().backward()
            opt.step()
            opt.zero_grad()
    return ROWS * EPOCHS / (time.perf_counter() - start)


def measure(cache: Path) -> dict[str, Any]:
    """Both loops on the same rows, in one process; naive first so neither gets a warmer cache."""
    backend = TorchBackend("cpu")
    rows = load_dataset("sst2").train.shuffled(0).head(ROWS)
    slow = naive(backend, cache, rows)
    fast = fused(backend, cache, rows)
    fast_bf16 = fused(backend, cache, rows, "bf16")
    setting = (f"{ROWS} SST-2 rows x {EPOCHS} epochs, batch {BATCH}, max_length {MAX_LEN}, LoRA r=8 on q_proj,v_proj, "
               f"W2S a=1 b=0.2 c=0.2 T=2, fp32, {torch.get_num_threads()} threads.")
    return {"setting": setting, "fused": fast, "naive": slow, "ratio": fast / slow, "fused_bf16": fast_bf16,
            "ratio_bf16": fast_bf16 / slow}
