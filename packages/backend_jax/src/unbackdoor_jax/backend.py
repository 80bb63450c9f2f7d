"""JaxBackend: the core's Backend protocol over JAX, Flax nnx and Optax.

Steps compile once per model structure, loss and padded batch shape (see
:mod:`unbackdoor_jax.train`). Set ``JAX_COMPILATION_CACHE_DIR`` to keep
compiled steps on disk between runs (jax's own persistent cache), which
saves most of the start-up time of a repeated run on CPU. With more than one
device, training is data parallel over all of them (see
:mod:`unbackdoor_jax.parallel`; ``UNBACKDOOR_JAX_DATA_PARALLEL`` = auto/on/off).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from unbackdoor.backend import Predictions, TrainStats, causal_lm_inputs
from unbackdoor.batching import iter_batches
from unbackdoor.data import TextDataset
from unbackdoor.errors import check_choice
from unbackdoor.models import check_model_dir
from unbackdoor.specs import PRECISIONS, AdapterSpec, LoRASpec, LossSpec, TrainSpec
from unbackdoor.text import TextEncoder

from . import analysis, lora, lossgrad, modeling, parallel, train, trigger
from .layers import hold_frozen


@dataclass
class JaxModel:
    """A classifier (nnx module), its tokenizer and the directory it came from."""

    module: modeling.SequenceClassifier
    encoder: TextEncoder
    source: Path

    @property
    def stacked(self) -> str:
        """HF key prefix of the backbone's stacked layers (``layers`` or ``encoder.layer``)."""
        return str(type(self.module.backbone).STACKED)


class JaxBackend:
    """Train and run sequence classifiers with JAX (CPU, or an accelerator when jax sees one)."""

    name = "jax"

    def __init__(self, precision: str = "fp32") -> None:
        #: ``bf16``: bf16 matmuls, and a model that gets an adapter holds its frozen base weights in bf16; the one
        #: precision every method runs at (training, inference, analysis), set here or by the runner
        self.precision = check_precision(precision)
        #: recompute each layer's activations in the backward pass instead of keeping them (less memory)
        self.gradient_checkpointing = False
        self.data_parallel = parallel.default_mode()  # "auto" | "on" | "off"
        self._lm: tuple[Path, analysis.CausalLM] | None = None  # the last causal LM lm_nll loaded

    @property
    def device_name(self) -> str:
        """Where the models run, for the report: ``cpu``, or ``gpu (NVIDIA H200)``, ``8 x gpu (...)`` when
        data-parallel training spans several devices."""
        devices = jax.devices()
        kind = devices[0].platform + ("" if devices[0].platform == "cpu" else f" ({devices[0].device_kind})")
        spans = parallel.data_mesh(self.data_parallel) is not None
        return f"{len(devices)} x {kind}" if spans else kind

    def native_bf16(self) -> bool:
        """Whether jax's device multiplies bf16 natively: GPUs and TPUs; XLA's CPU backend widens bf16 operands
        to float32 (measured 0.83-0.88x fp32's step speed, ``benchmarks/results/precision.md``)."""
        return jax.devices()[0].platform != "cpu"

    def auto_precision(self) -> str:
        """``--precision auto``: bf16 on an accelerator, fp32 on the CPU."""
        return "bf16" if self.native_bf16() else "fp32"

    def load_classifier(self, path: str | Path, num_labels: int, *, projection_dim: int | None = None,
                        seed: int = 0, projection_activation: str = "none") -> JaxModel:
        """Load a HF directory as a sequence classifier (see :mod:`unbackdoor_jax.modeling`)."""
        path = Path(path)
        module = modeling.load_classifier(path, num_labels, projection_dim, seed, projection_activation)
        return JaxModel(module, TextEncoder.from_dir(path), path)

    def add_lora(self, model: JaxModel, spec: LoRASpec, *, seed: int = 0) -> JaxModel:
        """Add LoRA adapters; from now on only they and the head train."""
        lora.add_lora(model.module.backbone, spec, seed)
        self._hold_frozen(model)
        return model

    def anchor(self, model: JaxModel, path: str | Path) -> JaxModel:
        """Measure the model's distance (RGA's ``||theta - theta_base||``) from the backbone weights at ``path``
        (the clean base of the same architecture) over every backbone parameter: full-parameter unlearning."""
        lora.anchor(model.module.backbone, modeling.load_backbone(check_model_dir(Path(path)))[0], str(path))
        return model

    def add_adapter(self, model: JaxModel, spec: AdapterSpec, *, seed: int = 0) -> JaxModel:
        """LoRA, or prompt tuning (p-tuning and prefix tuning raise a ConfigError naming the alternatives)."""
        if isinstance(spec, LoRASpec):
            return self.add_lora(model, spec, seed=seed)
        modeling.add_prompt(model.module, spec, seed)
        self._hold_frozen(model)
        return model

    def _hold_frozen(self, model: JaxModel) -> None:
        """bf16: the base weights are frozen under the adapter just added, so hold them in bf16."""
        if check_precision(self.precision) == "bf16":
            hold_frozen(model.module.backbone, train.DTYPES["bf16"])

    def train(self, model: JaxModel, data: TextDataset, loss: LossSpec, spec: TrainSpec,
              aux: Mapping[str, np.ndarray] | None = None, desc: str = "train") -> TrainStats:
        """Train in place with the jitted step of ``loss`` (data parallel per :attr:`data_parallel`)."""
        missing = [k for k in loss.aux_keys if k not in (aux or {})]
        if missing:
            raise ValueError(f"loss {type(loss).__name__} needs per-row arrays {missing}")
        mesh = parallel.data_mesh(self.data_parallel)
        return train.fit(model.module, model.encoder, data, loss, spec, aux or {}, desc, mesh,
                         remat=bool(self.gradient_checkpointing), precision=check_precision(self.precision))

    def predict(self, model: JaxModel, data: TextDataset, *, batch_size: int = 64, max_length: int = 128,
                hidden: bool = False, desc: str = "predict") -> Predictions:
        """Logits (and pooled states) in the dataset's order."""
        precision = check_precision(self.precision)
        return train.predict(model.module, model.encoder, data, batch_size, max_length, hidden, precision, desc)

    def save(self, model: JaxModel, path: str | Path) -> None:
        """Save as a HF-format directory, LoRA merged into the backbone weights."""
        modeling.save_classifier(model.module, model.source, Path(path))

    def hidden_size(self, model: JaxModel) -> int:
        """Width of the pooled (projected) state."""
        return model.module.meta.projection_dim or int(model.module.backbone.hidden_size)

    def lm_nll(self, path: str | Path, texts: Sequence[str], *, batch_size: int = 16,
               max_length: int = 128) -> np.ndarray:
        """Mean next-token NLL of each text under the causal LM at ``path`` ``[N]`` (the LM is kept for reuse)."""
        ids, pad_id = causal_lm_inputs(path, texts, max_length)
        dtype = train.DTYPES[check_precision(self.precision)]
        return analysis.lm_nll(self._causal_lm(Path(path)), ids, pad_id, batch_size, dtype)

    def _causal_lm(self, path: Path) -> analysis.CausalLM:
        if self._lm is None or self._lm[0] != path.resolve():
            self._lm = (path.resolve(), analysis.load_causal_lm(path))
        return self._lm[1]

    def mlp_activations(self, model: JaxModel, data: TextDataset, *, batch_size: int = 64,
                        max_length: int = 128) -> list[np.ndarray]:
        """Mean |activation| of each feed-forward neuron on ``data``, one ``[intermediate_size]`` array per layer."""
        if len(data) == 0:
            raise ValueError(f"cannot measure activations on the empty dataset {data.name!r}")
        ids = model.encoder.encode(data.texts, max_length)
        batches = list(iter_batches(ids, model.encoder.pad_id, batch_size))
        dtype = train.DTYPES[check_precision(self.precision)]
        return analysis.mlp_activations(model.module, batches, min(batch_size, len(ids)), max_length,
                                        model.encoder.pad_id, dtype)

    def trigger_logits(self, model: JaxModel, batch: Mapping[str, np.ndarray], weights: np.ndarray,
                       target: np.ndarray | None = None) -> tuple[np.ndarray, float, np.ndarray | None]:
        """Logits with a soft trigger in the ``trigger_at`` slots, and the loss's gradient w.r.t. ``weights``
        (:meth:`unbackdoor.backend.TriggerBackend.trigger_logits`); float32 whatever :attr:`precision` says."""
        return trigger.trigger_logits(model.module, batch, weights, target, model.encoder.pad_id)

    def trigger_prefix(self, model: JaxModel, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """A decoder's cached keys and values of the rows' tokens before the trigger, None for an encoder
        (:meth:`unbackdoor.backend.TriggerCacheBackend.trigger_prefix`); float32."""
        return trigger.trigger_prefix(model.module, batch, model.encoder.pad_id)

    def loss_grads(self, loss: LossSpec, logits: np.ndarray, hidden: np.ndarray | None,
                   batch: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray, np.ndarray | None]:
        """``loss`` on given outputs and its gradients w.r.t. them, as a training step evaluates it
        (:meth:`unbackdoor.backend.LossGradBackend.loss_grads`)."""
        return lossgrad.loss_grads(loss, logits, hidden, batch)

    def export_adapter(self, model: JaxModel) -> dict[str, np.ndarray]:
        """LoRA weights as numpy under peft-style names (``backbone.layers.0.self_attn.q_proj.lora_A.weight``)."""
        return lora.export_adapter(model.module.backbone, model.stacked)

    def import_adapter(self, model: JaxModel, arrays: Mapping[str, np.ndarray]) -> None:
        """Set the LoRA weights from :meth:`export_adapter`'s names (e.g. copied from peft)."""
        lora.import_adapter(model.module.backbone, model.stacked, dict(arrays))


def check_precision(value: str) -> str:
    """``value`` if it is a known precision, else a ConfigError listing them."""
    return check_choice("precision", value, PRECISIONS)
