"""The backend contract: what a training framework must provide.

Backends are registered by plugins as :class:`BackendInfo` records naming a
factory by import path, so the framework (torch, jax) is imported only when
that backend is selected.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .data import TextDataset
from .errors import BackendUnavailableError
from .specs import AdapterSpec, LoRASpec, LossSpec, TrainSpec
from .text import TextEncoder

BACKEND_ENV = "UNBACKDOOR_BACKEND"
#: tokenizer_config keys tried, in order, for the token a causal LM's scored text starts with
START_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token")
DEFAULT_BACKEND = "torch"


@dataclass(frozen=True)
class Predictions:
    """What a model says about a dataset.

    Attributes:
        logits: ``[N, C]`` float32, rows in the dataset's order.
        hidden: ``[N, D]`` pooled hidden states (last token / pooled/projected), or None.
    """

    logits: np.ndarray
    hidden: np.ndarray | None = None

    @property
    def labels(self) -> np.ndarray:
        """Predicted classes ``[N]``."""
        return self.logits.argmax(-1)


@dataclass(frozen=True)
class TrainStats:
    """Figures from one training run (for reports and benchmarks)."""

    steps: int
    samples: int
    seconds: float
    final_loss: float
    losses: tuple[float, ...] = ()

    @property
    def samples_per_second(self) -> float:
        """Training throughput."""
        return self.samples / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> dict[str, float]:
        """The figures a report shows (no per-step losses)."""
        return {"steps": self.steps, "samples": self.samples, "seconds": round(self.seconds, 3),
                "samples_per_second": round(self.samples_per_second, 3), "final_loss": self.final_loss,
                "first_loss": self.losses[0] if self.losses else float("nan")}


@runtime_checkable
class Backend(Protocol):
    """A training framework. ``Model`` objects are opaque handles owned by the backend.

    Optional capabilities are small protocols of their own, so a backend without one still is a
    :class:`Backend` and callers test for a capability with ``isinstance``: :class:`DeviceBackend`
    (``device_name``), :class:`PrecisionBackend` (``precision``), :class:`AutoPrecisionBackend`
    (``auto_precision``, ``native_bf16``: what ``--precision auto`` resolves to), :class:`CheckpointingBackend`
    (``gradient_checkpointing``), :class:`AnchorBackend` (``anchor``, full-parameter unlearning),
    :class:`AdapterExportBackend` (``export_adapter``), :class:`TriggerBackend` (``trigger_logits``, the
    ``trigger-search`` auditor), :class:`TriggerCacheBackend` (``trigger_prefix``, the auditor's prefix cache
    on decoders), :class:`LossGradBackend` (``loss_grads``, :func:`unbackdoor.testing.check_loss`)
    and :class:`~unbackdoor.ranks.Ranks` (``rank``, ``world_size``, ``barrier()``: runs under a launcher such as
    torchrun, every rank trains and rank 0 writes; a backend without them is refused there).
    """

    name: str

    def load_classifier(self, path: str | Path, num_labels: int, *, projection_dim: int | None = None,
                        seed: int = 0, **head: Any) -> Any:
        """Load a sequence classifier from a HF-format directory (base model or a saved classifier).

        Decoders pool the last non-pad token; encoders use the pooled output.
        With ``projection_dim`` a linear layer g maps the pooled state to that
        size before the classifier (the W2S teacher). New heads are seeded.
        ``head`` may hold ``projection_activation`` (``relu``/``tanh`` after g, as the released W2S
        teacher; see :class:`~unbackdoor.layout.HeadMeta`); callers pass it only when it is not ``none``.
        """

    def add_lora(self, model: Any, spec: LoRASpec, *, seed: int = 0) -> Any:
        """Freeze the backbone and add a trainable LoRA adapter (the head stays trainable)."""

    def add_adapter(self, model: Any, spec: AdapterSpec, *, seed: int = 0) -> Any:
        """Freeze the backbone and add a PEFT module: LoRA, or prompt learning (:class:`PromptSpec`).

        Prompt learning puts virtual tokens in front of the input (prefix tuning: into every layer's
        keys and values); pooling still reads the last REAL token. Backends may support a subset of
        prompt methods and must raise a clear error for the others.
        """

    def train(self, model: Any, data: TextDataset, loss: LossSpec, spec: TrainSpec,
              aux: Mapping[str, np.ndarray] | None = None, desc: str = "train") -> TrainStats:
        """Train ``model`` in place on ``data`` with ``loss``; ``aux`` holds per-row arrays the loss needs."""

    def predict(self, model: Any, data: TextDataset, *, batch_size: int = 64, max_length: int = 128,
                hidden: bool = False, desc: str = "predict") -> Predictions:
        """Logits (and pooled hidden states when ``hidden``) for every row, in order."""

    def save(self, model: Any, path: str | Path) -> None:
        """Write the classifier (adapters merged) as a HF-format safetensors directory."""

    def hidden_size(self, model: Any) -> int:
        """Size of the pooled hidden state."""

    def lm_nll(self, path: str | Path, texts: Sequence[str], *, batch_size: int = 16,
               max_length: int = 128) -> np.ndarray:
        """Mean next-token negative log-likelihood of each text under the causal LM at ``path``.

        ``path`` is a HF-format causal LM directory (e.g. the converted SmolLM2). Token ids come from
        :func:`causal_lm_inputs` (a start token, then the text; at most ``max_length`` ids). Position
        ``t`` predicts id ``t + 1``; the NLL (natural log) is averaged over the text's real tokens, so
        every token of the text, the first included, is scored. Returns float32 ``[N]`` in the order
        of ``texts``; a text with no tokens gives NaN. NumPy reference from logits:
        :func:`unbackdoor.metrics.mean_token_nll`. Implementations batch all texts (length buckets,
        no Python loop per text) and may keep the loaded LM for later calls with the same ``path``.
        """

    def mlp_activations(self, model: Any, data: TextDataset, *, batch_size: int = 64,
                        max_length: int = 128) -> list[np.ndarray]:
        """Mean absolute activation of every feed-forward neuron on ``data`` (fine-pruning).

        One float32 array ``[intermediate_size]`` per layer, in layer order. The activation of a
        neuron is the input of the layer's output projection: Llama/Mistral/Qwen2 ``act(gate_proj x) *
        up_proj x`` (the input of ``mlp.down_proj``), BERT-style encoders the intermediate GELU output
        (the input of ``layer.{i}.output.dense``). ``|a|`` is averaged over every real (non-pad) token
        of every row, pooling mode and head ignored. Neuron ``j`` of layer ``i`` owns row ``j`` of
        ``gate_proj``/``up_proj`` (``intermediate.dense``) and column ``j`` of ``down_proj``
        (``output.dense``): see :func:`unbackdoor.surgery.ffn_layers`.
        """


@runtime_checkable
class DeviceBackend(Protocol):
    """Says where its models run; results.json records it as ``device``."""

    @property
    def device_name(self) -> str:
        """e.g. ``cpu``, ``cuda:0 (NVIDIA H200)``, jax's platform."""


@runtime_checkable
class PrecisionBackend(Protocol):
    """Runs its matmuls in the precision the runner sets (``--precision``, :data:`unbackdoor.specs.PRECISIONS`)."""

    #: ``fp32`` or ``bf16`` (bf16 matmuls; a LoRA model's frozen weights then held in bf16); the runner sets it
    #: before any model is loaded, and every method of the backend (train, predict, lm_nll, ...) follows it
    precision: str


@runtime_checkable
class AutoPrecisionBackend(Protocol):
    """Knows which precision its device runs fastest at the same accuracy (``--precision auto``)."""

    def auto_precision(self) -> str:
        """``bf16`` where the device multiplies bf16 natively (so bf16 is faster), else ``fp32``."""

    def native_bf16(self) -> bool:
        """Whether the device multiplies bf16 natively (else bf16 is emulated: many times slower than fp32)."""


@runtime_checkable
class CheckpointingBackend(Protocol):
    """Recomputes activations in the backward pass instead of storing them when asked (``--gradient-checkpointing``)."""

    #: set by the runner before any training; the same losses and gradients, less memory
    gradient_checkpointing: bool


@runtime_checkable
class AnchorBackend(Protocol):
    """Measures a fully trained model's parameter distance from base weights (the unlearning defenses'
    ``adapter=full``: RGA's ``||theta - theta_base||`` over every backbone parameter)."""

    def anchor(self, model: Any, path: str | Path) -> Any:
        """``model`` whose loss distance (``batch["parameter_distance"]``) is measured from the weights at ``path``
        (same architecture; before any adapter is added), returned for chaining."""


@runtime_checkable
class AdapterExportBackend(Protocol):
    """Hands out a LoRA model's adapter weights."""

    def export_adapter(self, model: Any) -> dict[str, np.ndarray]:
        """The adapter's weights as NumPy arrays under peft-style names (``...q_proj.lora_A.weight``)."""


@runtime_checkable
class TriggerBackend(Protocol):
    """The optional part of :class:`Backend` that trigger inversion needs: gradients with respect to the input
    embeddings of a few trigger positions (kept out of :class:`Backend` so a backend without it still is one)."""

    def trigger_logits(self, model: Any, batch: Mapping[str, np.ndarray], weights: np.ndarray,
                       target: np.ndarray | None = None) -> tuple[np.ndarray, float, np.ndarray | None]:
        """Logits of rows carrying a relaxed (soft) trigger and, with ``target``, the loss's gradient.

        Optional (the ``trigger-search`` auditor needs it). ``batch`` comes from
        :func:`unbackdoor.batching.trigger_batch`: ``input_ids``/``attention_mask`` ``[B, L]`` and
        ``trigger_at`` ``[B, k]``. ``weights`` ``[k, V]`` float32 holds one distribution over the first ``V``
        vocabulary ids per trigger slot; slot ``j`` of every row gets the input embedding
        ``weights[j] @ E[:V]`` (``E`` the model's input embedding matrix; a one-hot row gives exactly that
        token's embedding); every other position embeds its id as usual. Returns ``logits`` ``[B, C]``
        float32, and with ``target`` ``[B]`` ints the mean cross-entropy of the logits to ``target`` and its
        gradient with respect to ``weights`` ``[k, V]`` float32 (the model's weights get no gradient);
        without ``target``, NaN and None. Runs in evaluation mode (no dropout), float32.
        """


@runtime_checkable
class TriggerCacheBackend(Protocol):
    """The optional part of :class:`Backend` that lets trigger inversion skip recomputing what the trigger
    cannot change: in a causal decoder the states of the tokens before the trigger."""

    def trigger_prefix(self, model: Any, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """Every layer's attention keys and values of the rows in ``batch``, for later calls to reuse.

        ``batch`` holds ``input_ids``/``attention_mask`` ``[B, P]`` (right-padded, as
        :func:`unbackdoor.batching.pad_batch`): the tokens of each row before its trigger. Returns ``key`` and
        ``value`` ``[layers, B, P, kv_heads, head_dim]`` float32, keys rotated for positions ``0..P-1`` as the
        model's attention reads them (rows' padding positions hold anything), or None when a model's states
        depend on later tokens (an encoder, a soft prompt) and cannot be reused. :meth:`TriggerBackend.trigger_logits`
        reads them back from a batch of :func:`unbackdoor.batching.cached_trigger_batch`: there ``input_ids``
        holds only the trigger slots and the tokens after them, ``past_key``/``past_value`` the rows'
        cached states padded to a common length, ``past_mask`` ``[B, P]`` which of them are real and
        ``past_length`` ``[B]`` the position of each row's first uncached token. The logits and gradients
        must equal the uncached call's on the same rows (up to float32 rounding).
        """


@runtime_checkable
class LossGradBackend(Protocol):
    """The optional part of :class:`Backend` that :func:`unbackdoor.testing.check_loss` needs: a loss evaluated on
    given model outputs, with its gradients, exactly as the backend's training step evaluates it."""

    def loss_grads(self, loss: LossSpec, logits: np.ndarray, hidden: np.ndarray | None,
                   batch: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray, np.ndarray | None]:
        """The objective one training step minimises for ``loss`` and its gradients w.r.t. the outputs.

        ``logits`` ``[B, C]`` and ``hidden`` (``[B, D]`` pooled, or ``[B, L, D]`` for a loss that reads token
        states) float32; ``batch`` the per-row arrays (``labels``, ``attention_mask``, the loss's aux arrays,
        ``weight``) as the step sees them. No model: a loss that reads the model's parameters gets what it
        needs through ``batch``. Returns the value and ``d/d logits``, ``d/d hidden`` (zeros where the loss
        does not read it; None without ``hidden``), float32 NumPy, computed by the backend's own autodiff.
        """


@dataclass(frozen=True)
class BackendInfo:
    """A backend as a plugin registers it.

    Attributes:
        name: the value of ``--backend``.
        description: one line for ``unbackdoor list``.
        factory: ``"module:attribute"`` of a zero-argument callable returning a :class:`Backend`.
        gguf_converter: ``"module:attribute"`` of a ``(gguf_file, target_dir) -> None`` function that writes a GGUF
            model as a HF safetensors directory (the named models ship as GGUF), or None. Imported only when a
            GGUF model is first converted (:func:`unbackdoor.models.resolve_model`).
    """

    name: str
    description: str
    factory: str
    gguf_converter: str | None = None

    def create(self) -> Backend:
        """Import the framework and build the backend; a missing framework gives a clear error."""
        module_name, _, attr = self.factory.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise BackendUnavailableError(
                f"backend {self.name!r} cannot be imported ({exc}); "
                f"install its package, e.g. pip install unbackdoor-{self.name}"
            ) from exc
        make: Callable[[], Backend] = getattr(module, attr)
        return make()

    def converter(self) -> Callable[[Path, Path], None] | None:
        """The GGUF converter (imported now), or None when the backend has none or its framework is missing."""
        if self.gguf_converter is None:
            return None
        module_name, _, attr = self.gguf_converter.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]
        except ImportError:
            return None


def selected_backend_name(flag: str | None) -> str:
    """The backend name by precedence: explicit flag, then ``UNBACKDOOR_BACKEND``, then torch."""
    return flag or os.environ.get(BACKEND_ENV) or DEFAULT_BACKEND


def causal_lm_inputs(path: str | Path, texts: Sequence[str], max_length: int) -> tuple[list[np.ndarray], int]:
    """Token ids a backend scores with :meth:`Backend.lm_nll`, and the pad id.

    Each text's ids (the directory's ``tokenizer.json``) get a start token in front (tokenizer_config's
    ``bos_token``, else ``eos_token``, else ``pad_token``; none added when the tokenizer already puts it
    there) so the first word is predicted too; rows are cut to ``max_length`` ids (the end is dropped).
    Shared by every backend so they score the same ids.
    """
    encoder = TextEncoder.from_dir(path)
    start = _start_id(Path(path), encoder)
    rows = []
    for ids in encoder.encode(list(texts), max_length):
        if start is not None and not (len(ids) and ids[0] == start):
            ids = np.concatenate([np.asarray([start], np.int32), ids])[:max_length]
        rows.append(ids)
    return rows, encoder.pad_id


def _start_id(path: Path, encoder: TextEncoder) -> int | None:
    """The id of the first of :data:`START_TOKEN_KEYS` the tokenizer knows, else None."""
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    for key in START_TOKEN_KEYS:
        token = cfg.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token and encoder.tokenizer.token_to_id(token) is not None:
            return int(encoder.tokenizer.token_to_id(token))
    return None
