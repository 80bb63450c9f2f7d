"""Train the tiny Llama with the jax backend, data parallel over a device mesh or on one device.

Usage: ``XLA_FLAGS=--xla_force_host_platform_device_count=2 jax_dp_train.py MODEL_DIR OUT.npz`` trains every
config of :data:`CONFIGS` data parallel (``data_parallel = "on"``) and saves, per config, the per-step losses,
every final weight and what the jitted step saw: the per-device shards of the batch it was given, the
sharding XLA chose for the logits inside it, and whether the parameters and optimiser state it returned are
replicated. :func:`train` with ``"off"`` is the single-device reference.
"""

from __future__ import annotations

import sys

import numpy as np

#: name -> (LoRA or full fine-tune, loss, rows, batch size): 20 rows in batches of 5 need a weight-0 filler
#: row per step on 2 devices (6 rows, 3 per device); 32 in batches of 8 split evenly.
CONFIGS = {"lora_w2s": ("lora", "w2s", 20, 5), "full_ce": ("full", "ce", 32, 8)}


def _setup(model_dir: str, config: str, mode: str):
    from unbackdoor.data import load_dataset
    from unbackdoor.specs import CrossEntropy, LoRASpec, TrainSpec, W2SLoss
    from unbackdoor_jax.backend import JaxBackend

    tuning, loss_name, rows, batch_size = CONFIGS[config]
    backend = JaxBackend()
    backend.data_parallel = mode
    model = backend.load_classifier(model_dir, 2, seed=0)
    if tuning == "lora":
        model = backend.add_lora(model, LoRASpec(rank=4, alpha=8.0, target_modules=("all-linear",)), seed=0)
    rng = np.random.default_rng(0)
    aux = {"teacher_logits": rng.normal(size=(rows, 2)).astype(np.float32),
           "teacher_hidden": rng.normal(size=(rows, 32)).astype(np.float32)} if loss_name == "w2s" else {}
    loss = W2SLoss(alpha=1.0, beta=0.5, gamma=0.5, temperature=2.0) if loss_name == "w2s" else CrossEntropy()
    spec = TrainSpec(epochs=1, lr=5e-3 if tuning == "lora" else 1e-3, batch_size=batch_size, max_length=32,
                     weight_decay=0.01, warmup_ratio=0.25, seed=0)
    return backend, model, load_dataset("sst2").train.head(rows), loss, spec, aux


def _weights(module) -> dict[str, np.ndarray]:
    from flax import nnx

    return {"/".join(map(str, path)): np.asarray(value) for path, value in nnx.to_flat_state(nnx.state(module))}


def initial(model_dir: str, config: str) -> dict[str, np.ndarray]:
    """Every weight of ``config``'s model before training."""
    return _weights(_setup(model_dir, config, "off")[1].module)


def train(model_dir: str, config: str, mode: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Train ``config`` with ``data_parallel = mode``: the per-step losses and every final weight by path."""
    backend, model, data, loss, spec, aux = _setup(model_dir, config, mode)
    stats = backend.train(model, data, loss, spec, aux, desc=f"{config} {mode}")
    return np.asarray(stats.losses), _weights(model.module)


def _probe() -> dict[str, list]:
    """Wrap the train step and the loss it traces to record the shardings they see (numerics unchanged)."""
    import jax

    from unbackdoor_jax import train as jax_train

    seen: dict[str, list] = {"batch": [], "logits": [], "replicated": []}
    step, objective = jax_train.train_step, jax_train.batch_objective

    def spy_step(*args):
        batch_ids = args[7]["input_ids"]
        seen["batch"].append([len(batch_ids.sharding.device_set), *(s.data.shape[0] for s in batch_ids.addressable_shards)])
        out = step(*args)
        leaves = jax.tree.leaves(out[:2]) + jax.tree.leaves(args[5])  # new trainable + optimiser state, frozen
        seen["replicated"].append(all(x.sharding.is_fully_replicated and len(x.sharding.device_set) == 2
                                      for x in leaves))
        return out

    def spy_objective(spec, model, logits, hidden, batch):  # traced inside the jitted step: shardings XLA chose
        jax.debug.inspect_array_sharding(logits, callback=lambda s: seen["logits"].append(
            [len(s.device_set), s.shard_shape(logits.shape)[0], logits.shape[0]]))
        return objective(spec, model, logits, hidden, batch)

    jax_train.train_step, jax_train.batch_objective = spy_step, spy_objective
    return seen


if __name__ == "__main__":
    import jax

    seen = _probe()
    out: dict[str, np.ndarray] = {"devices": np.asarray(jax.device_count())}
    for name in CONFIGS:
        for key in seen:
            seen[key].clear()
        losses, weights = train(sys.argv[1], name, "on")
        out |= {f"{name}|losses": losses, **{f"{name}|w|{k}": v for k, v in weights.items()}}
        out |= {f"{name}|{key}": np.asarray(value) for key, value in seen.items()}
    np.savez(sys.argv[2], **out)
