"""TorchBackend: the core's Backend protocol over torch, transformers and peft."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers.utils import logging as hf_logging

from unbackdoor import initial
from unbackdoor.backend import Predictions, TrainStats, causal_lm_inputs
from unbackdoor.batching import iter_batches
from unbackdoor.data import TextDataset
from unbackdoor.errors import ConfigError, check_choice
from unbackdoor.ranks import launched_world
from unbackdoor.specs import ALL_LINEAR, PRECISIONS, AdapterSpec, LoRASpec, LossSpec, PromptSpec, TrainSpec
from unbackdoor.text import TextEncoder

from . import analysis, lossgrad, modeling, parallel, train, trigger
from .losses import ANCHOR

hf_logging.set_verbosity_error()  # our own progress bars say what is happening
hf_logging.disable_progress_bar()


@dataclass
class TorchModel:
    """A classifier, its tokenizer and the directory it came from."""

    module: modeling.SequenceClassifier
    encoder: TextEncoder
    source: Path


class TorchBackend:
    """Train and run sequence classifiers with torch (CPU, or CUDA when present)."""

    name = "torch"

    def __init__(self, device: str | None = None, precision: str = "fp32") -> None:
        self.device = _device(device)
        #: ``bf16``: autocast, and a model that gets an adapter holds its frozen base weights in bf16; the one
        #: precision every method runs at (training, inference, analysis), set here or by the runner
        self.precision = check_choice("precision", precision, PRECISIONS)
        #: recompute each layer's activations in the backward pass instead of keeping them (less memory)
        self.gradient_checkpointing = False
        self._lm: tuple[Path, torch.nn.Module] | None = None  # the last causal LM lm_nll loaded

    @property
    def device_name(self) -> str:
        """Where the models run, for the report: ``cpu``, or ``cuda:0 (NVIDIA H200)``."""
        if self.device.type != "cuda":
            return str(self.device)
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"

    def native_bf16(self) -> bool:
        """Whether this device multiplies bf16 natively: a CUDA GPU with bf16, a CPU with AVX-512 BF16 or AMX
        (oneDNN's bf16 GEMMs; elsewhere torch emulates them, tens of times slower than fp32)."""
        if self.device.type == "cuda":
            return bool(torch.cuda.is_bf16_supported())
        if self.device.type == "cpu":
            return _cpu_flag("_is_avx512_bf16_supported") or _cpu_flag("_is_amx_tile_supported")
        return False

    def auto_precision(self) -> str:
        """``--precision auto``: bf16 where :meth:`native_bf16` (2x faster per step on such a CPU, bf16 weights
        held), else fp32."""
        return "bf16" if self.native_bf16() else "fp32"

    @property
    def rank(self) -> int:
        """This process's rank under torchrun (0 in one process); rank 0 writes (:mod:`unbackdoor.ranks`)."""
        return parallel.rank()

    @property
    def world_size(self) -> int:
        """How many processes train together (torchrun's ranks; 1 in one process)."""
        return parallel.world_size()

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in one process)."""
        parallel.barrier()

    def load_classifier(self, path: str | Path, num_labels: int, *, projection_dim: int | None = None,
                        seed: int = 0, projection_activation: str = "none") -> TorchModel:
        """Load a HF directory as a sequence classifier (see :mod:`unbackdoor_torch.modeling`)."""
        path = Path(path)
        module = modeling.load_classifier(path, num_labels, projection_dim, seed, projection_activation).to(self.device)
        return TorchModel(module, modeling.load_encoder(path), path)

    def anchor(self, model: TorchModel, path: str | Path) -> TorchModel:
        """Measure the model's distance (RGA's ``||theta - theta_base||``) from the backbone weights at ``path``
        (the clean base of the same architecture) over every backbone parameter: full-parameter unlearning."""
        if any(isinstance(m, LoraLayer) for m in model.module.modules()):
            raise ConfigError("a model with LoRA measures its distance by the adapter; anchor it before adding LoRA")
        base = dict(modeling.load_backbone(Path(path)).named_parameters())
        own = dict(model.module.backbone.named_parameters())
        if {k: tuple(v.shape) for k, v in own.items()} != {k: tuple(v.shape) for k, v in base.items()}:
            raise ConfigError(f"the anchor {str(path)!r} does not have the model's parameters and shapes")
        pairs = [(w, base[k].detach().to(w.device, w.dtype)) for k, w in own.items()]
        object.__setattr__(model.module, ANCHOR, pairs)  # a plain attribute: not a parameter, buffer or state
        return model

    def add_lora(self, model: TorchModel, spec: LoRASpec, *, seed: int = 0) -> TorchModel:
        """Wrap the backbone with peft LoRA; the backbone freezes, the head stays trainable."""
        torch.manual_seed(seed)
        spec.chosen(name for name, module in model.module.backbone.named_modules()
                    if isinstance(module, torch.nn.Linear))  # the jax backend's clear error, not peft's
        targets: str | list[str] = ALL_LINEAR if spec.target_modules == (ALL_LINEAR,) else list(spec.target_modules)
        self._hold_frozen(model)
        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets)
        model.module.backbone = get_peft_model(model.module.backbone, config)
        _seed_lora_a(model.module, spec.rank, seed)
        return model

    def add_adapter(self, model: TorchModel, spec: AdapterSpec, *, seed: int = 0) -> TorchModel:
        """LoRA, or a prompt-learning adapter (prompt tuning, p-tuning, prefix tuning) via peft."""
        if isinstance(spec, LoRASpec):
            return self.add_lora(model, spec, seed=seed)
        torch.manual_seed(seed)
        self._hold_frozen(model)
        model.module.backbone = get_peft_model(model.module.backbone, _prompt_config(spec))
        if spec.method == "prompt-tuning":  # the jax backend starts from the same virtual tokens
            embedding = model.module.backbone.prompt_encoder["default"].embedding
            with torch.no_grad():
                embedding.weight.copy_(torch.from_numpy(initial.soft_prompt(*embedding.weight.shape, seed)))
        return model

    def train(self, model: TorchModel, data: TextDataset, loss: LossSpec, spec: TrainSpec,
              aux: Mapping[str, np.ndarray] | None = None, desc: str = "train") -> TrainStats:
        """Train in place with the fused step of ``loss``."""
        missing = [k for k in loss.aux_keys if k not in (aux or {})]
        if missing:
            raise ValueError(f"loss {type(loss).__name__} needs per-row arrays {missing}")
        precision = check_choice("precision", self.precision, PRECISIONS)
        _check_held(model, precision)
        with _checkpointing(model.module.backbone, self.gradient_checkpointing):
            if parallel.active():  # launched by torchrun: data-parallel over the ranks
                return parallel.fit(model.module, model.encoder, data, loss, spec, aux or {}, self.device, desc,
                                    precision)
            return train.fit(model.module, model.encoder, data, loss, spec, aux or {}, self.device, desc,
                             precision=precision)

    def predict(self, model: TorchModel, data: TextDataset, *, batch_size: int = 64, max_length: int = 128,
                hidden: bool = False, desc: str = "predict") -> Predictions:
        """Logits (and pooled states) in the dataset's order."""
        _check_held(model, self.precision)
        return train.predict(model.module, model.encoder, data, batch_size, max_length, hidden,
                             self.device, self.precision, desc)

    def save(self, model: TorchModel, path: str | Path) -> None:
        """Save as a HF-format directory, LoRA merged into the backbone.

        Under torchrun every rank merges (their models stay alike) and rank 0 alone writes, as
        accelerate's ``save_model`` does: the ranks hold the same weights.
        """
        module = model.module
        if getattr(module.backbone, "active_peft_config", None) is not None and \
                module.backbone.active_peft_config.is_prompt_learning:
            raise ValueError("a prompt-learning adapter cannot be merged into the weights; save a LoRA model instead")
        if hasattr(module.backbone, "merge_and_unload"):
            modeling.upcast_adapted(module.backbone)  # frozen bf16 weights: merge the update in float32
            module.backbone = module.backbone.merge_and_unload()
        if parallel.rank() == 0:
            modeling.save_classifier(module, model.source, Path(path))

    def hidden_size(self, model: TorchModel) -> int:
        """Width of the pooled (projected) state."""
        meta = model.module.meta
        return meta.projection_dim or model.module.backbone.config.hidden_size

    def lm_nll(self, path: str | Path, texts: Sequence[str], *, batch_size: int = 16,
               max_length: int = 128) -> np.ndarray:
        """Mean next-token NLL of each text under the causal LM at ``path`` ``[N]`` (the LM is kept for reuse)."""
        ids, pad_id = causal_lm_inputs(path, texts, max_length)
        return analysis.lm_nll(self._causal_lm(Path(path)), ids, pad_id, batch_size, self.device, self.precision)

    def _causal_lm(self, path: Path) -> torch.nn.Module:
        if self._lm is None or self._lm[0] != path.resolve():
            self._lm = (path.resolve(), analysis.load_causal_lm(path, self.device))
        return self._lm[1]

    def mlp_activations(self, model: TorchModel, data: TextDataset, *, batch_size: int = 64,
                        max_length: int = 128) -> list[np.ndarray]:
        """Mean |activation| of each feed-forward neuron on ``data``, one ``[intermediate_size]`` array per layer."""
        ids = model.encoder.encode(data.texts, max_length)
        batches = list(iter_batches(ids, model.encoder.pad_id, batch_size))
        return analysis.mlp_activations(model.module, batches, self.device, self.precision)

    def trigger_logits(self, model: TorchModel, batch: Mapping[str, np.ndarray], weights: np.ndarray,
                       target: np.ndarray | None = None) -> tuple[np.ndarray, float, np.ndarray | None]:
        """Logits with a soft trigger in the ``trigger_at`` slots, and the loss's gradient w.r.t. ``weights``
        (:meth:`unbackdoor.backend.TriggerBackend.trigger_logits`)."""
        _check_held(model, "fp32")
        return trigger.trigger_logits(model.module, batch, weights, target, self.device)

    def trigger_prefix(self, model: TorchModel, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """A decoder's cached keys and values of the rows' tokens before the trigger, None for an encoder
        (:meth:`unbackdoor.backend.TriggerCacheBackend.trigger_prefix`)."""
        _check_held(model, "fp32")
        return trigger.trigger_prefix(model.module, batch, self.device)

    def loss_grads(self, loss: LossSpec, logits: np.ndarray, hidden: np.ndarray | None,
                   batch: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray, np.ndarray | None]:
        """``loss`` on given outputs and its gradients w.r.t. them, as a training step evaluates it
        (:meth:`unbackdoor.backend.LossGradBackend.loss_grads`)."""
        return lossgrad.loss_grads(loss, logits, hidden, batch, self.device)

    def _hold_frozen(self, model: TorchModel) -> None:
        """bf16: the base weights freeze under the adapter about to be added, so hold them in bf16."""
        if check_choice("precision", self.precision, PRECISIONS) == "bf16":
            modeling.hold_frozen(model.module.backbone, torch.bfloat16)


def _device(requested: str | None) -> torch.device:
    """``requested``, else CUDA when torch sees a GPU, else the CPU; in one of several processes torchrun
    started, after joining its process group (NCCL on the GPU ``LOCAL_RANK`` names; gloo on the CPU)."""
    chosen = torch.device(requested) if requested else None
    if launched_world() > 1:
        joined = parallel.init("gloo" if chosen is not None and chosen.type == "cpu" else None)
        return chosen if chosen is not None else joined
    return chosen if chosen is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cpu_flag(name: str) -> bool:
    """One of ``torch.cpu``'s private capability probes (``_is_avx512_bf16_supported``...); False if it is gone."""
    probe = getattr(torch.cpu, name, None)
    return bool(probe()) if callable(probe) else False


def _check_held(model: TorchModel, precision: str) -> None:
    """A model holding bf16 weights runs only under bf16 autocast (a float32 matmul cannot read them)."""
    held = modeling.held_dtype(model.module)
    if held != torch.float32 and precision != "bf16":
        raise ConfigError(f"the model holds its frozen weights in {str(held).removeprefix('torch.')} (its adapter "
                          f"was added under precision 'bf16'); run it with precision 'bf16', not {precision!r}")


@contextlib.contextmanager
def _checkpointing(backbone: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """HF gradient checkpointing (non-reentrant: LoRA and prompt adapters need no input gradients) while training."""
    if not enabled:
        yield
        return
    if not getattr(backbone, "supports_gradient_checkpointing", False):
        raise ConfigError(f"gradient checkpointing is not supported by {type(backbone).__name__}")
    backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        backbone.gradient_checkpointing_disable()


def _seed_lora_a(module: torch.nn.Module, rank: int, seed: int) -> None:
    """Overwrite peft's torch-RNG ``A`` matrices with the core's draws (keyed by peft's saved names)."""
    with torch.no_grad():
        for name, sub in module.named_modules():
            if hasattr(sub, "lora_A") and "default" in sub.lora_A:
                weight = sub.lora_A["default"].weight
                key = name.replace("base_model.model.", "")
                weight.copy_(torch.from_numpy(initial.lora_a(key, rank, weight.shape[1], seed)).to(weight.device))


def _prompt_config(spec: PromptSpec) -> PrefixTuningConfig | PromptEncoderConfig | PromptTuningConfig:
    """peft's config for a prompt-learning spec (the backbone is a bare encoder/decoder: feature extraction)."""
    common = {"task_type": TaskType.FEATURE_EXTRACTION, "num_virtual_tokens": spec.num_virtual_tokens}
    if spec.method == "p-tuning":
        return PromptEncoderConfig(**common, encoder_hidden_size=spec.encoder_hidden_size)
    if spec.method == "prefix-tuning":
        return PrefixTuningConfig(**common)
    return PromptTuningConfig(**common)
