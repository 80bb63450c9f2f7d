"""Train the tiny Llama for a few steps; under torchrun every rank trains its shard (DDP, gloo).

Usage: ``[torchrun --nproc-per-node 2] ddp_train.py MODEL_DIR OUT.npz``; rank 0 (or the single process)
saves the per-step losses and every parameter.
"""

from __future__ import annotations

import os
import sys

import numpy as np


def train(model_dir: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Full fine-tune on 32 SST-2 rows, global batch 8: the losses and the final weights."""
    from unbackdoor.data import load_dataset
    from unbackdoor.specs import CrossEntropy, TrainSpec
    from unbackdoor_torch.backend import TorchBackend

    backend = TorchBackend("cpu")
    model = backend.load_classifier(model_dir, 2, seed=0)
    spec = TrainSpec(epochs=1, lr=1e-3, batch_size=8, max_length=32, seed=0)
    stats = backend.train(model, load_dataset("sst2").train.head(32), CrossEntropy(), spec, desc="ddp")
    weights = {k: v.detach().cpu().numpy() for k, v in model.module.state_dict().items()}
    return np.asarray(stats.losses), weights


if __name__ == "__main__":
    if "RANK" in os.environ:
        from unbackdoor_torch import parallel

        parallel.init("gloo")
    losses, weights = train(sys.argv[1])
    if int(os.environ.get("RANK", 0)) == 0:
        from unbackdoor_torch import parallel

        np.savez(sys.argv[2], losses=losses, ddp=parallel.active(), **weights)
