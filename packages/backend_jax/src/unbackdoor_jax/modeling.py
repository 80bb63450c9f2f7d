"""Sequence classifiers over the nnx backbones, pooled exactly like the torch backend's.

Read from and written to the core's classifier layout (:mod:`unbackdoor.layout`),
which the torch backend reads too.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unbackdoor import initial
from unbackdoor.errors import ConfigError, UnknownNameError
from unbackdoor.layout import HeadMeta, copy_tokenizer
from unbackdoor.models import check_model_dir
from unbackdoor.specs import PromptSpec

from . import checkpoint
from .bert import Bert
from .layers import Ctx, Linear, PromptParam
from .llama import Llama

Array = jax.Array
BACKBONES: dict[str, type[nnx.Module]] = {"bert": Bert, "llama": Llama, "mistral": Llama, "qwen2": Llama}
#: the head's activation after the projection g (:data:`unbackdoor.layout.PROJECTION_ACTIVATIONS`)
ACTIVATIONS = {"none": lambda x: x, "relu": jax.nn.relu, "tanh": jnp.tanh}


class SequenceClassifier(nnx.Module):
    """backbone -> pool -> [projection g] -> classifier.

    Decoders pool the final normed state of the last non-pad token (right
    padding); encoders use the pooler output (or the first token without a pooler).
    """

    def __init__(self, backbone: nnx.Module, meta: HeadMeta, head: dict[str, np.ndarray]) -> None:
        self.backbone, self.meta = backbone, meta  # meta is static: part of the compiled structure
        self.projection = nnx.data(_linear(head, "projection") if meta.projection_dim else None)
        self.classifier = _linear(head, "classifier")
        self.prompt = nnx.data(None)  # a PromptParam [P, D] once prompt tuning is added

    def __call__(self, input_ids: Array, attention_mask: Array, ctx: Ctx, tokens: bool = False,
                 inputs_embeds: Array | None = None, past: dict[str, Array] | None = None) -> tuple[Array, Array]:
        """``logits [B, C]`` and the pooled (projected) state ``[B, D]``; with ``tokens``, instead of the
        pooled state, the backbone's final state of every input position ``[B, L, D]`` (a soft prompt's
        virtual tokens left out). ``inputs_embeds`` ``[B, L, D]``, when given, replaces the embedding of
        ``input_ids`` (trigger inversion); ``past``, a decoder's cached states of earlier positions
        (:meth:`unbackdoor_jax.llama.Llama.__call__`), which ``attention_mask`` does not cover."""
        prompt = None if self.prompt is None else self.prompt[...]
        if prompt is not None:  # peft: the virtual tokens are always attended, so the last real token moves by P
            ones = jnp.ones((input_ids.shape[0], prompt.shape[0]), attention_mask.dtype)
            attention_mask = jnp.concatenate([ones, attention_mask], axis=1)
        extra = {} if past is None else {"past": past}  # (only a decoder reads cached states)
        states, pooled = self.backbone(input_ids, attention_mask, ctx, prompt, inputs_embeds, **extra)
        if self.meta.decoder:
            last = attention_mask.sum(axis=1) - 1
            pooled = states[jnp.arange(states.shape[0]), last]
        elif pooled is None:
            pooled = states[:, 0]
        if self.projection is not None:
            pooled = ACTIVATIONS[self.meta.projection_activation](self.projection(pooled, ctx))
        if tokens:
            return self.classifier(pooled, ctx), states[:, states.shape[1] - input_ids.shape[1]:]
        return self.classifier(pooled, ctx), pooled


def add_prompt(model: SequenceClassifier, spec: PromptSpec, seed: int) -> None:
    """Prompt tuning: ``spec.num_virtual_tokens`` trainable embeddings, N(0, 1) like peft's random init.

    Only ``"prompt-tuning"`` is implemented here; the other prompt methods raise a ConfigError.
    """
    if spec.method != "prompt-tuning":
        raise ConfigError(f"prompt-learning method {spec.method!r} is not implemented by the jax backend; "
                          "use 'prompt-tuning' or LoRA, or the torch backend")
    if model.prompt is not None:
        raise ConfigError("the model already has a soft prompt")
    width = int(model.backbone.hidden_size)
    model.prompt = PromptParam(jnp.asarray(initial.soft_prompt(spec.num_virtual_tokens, width, seed)))


def _linear(head: dict[str, np.ndarray], name: str) -> Linear:
    return Linear(head[f"{name}.weight"], head.get(f"{name}.bias"))


def load_backbone(path: Path) -> tuple[nnx.Module, dict[str, Any]]:
    """The nnx backbone of a HF directory and its config."""
    config = checkpoint.read_config(path)
    model_type = config.get("model_type", "")
    if model_type not in BACKBONES:
        raise UnknownNameError("model_type for the jax backend", model_type, BACKBONES)
    tensors = checkpoint.Tensors(checkpoint.read_tensors(path), str(path))
    return BACKBONES[model_type](tensors, config), config


def load_classifier(path: Path, num_labels: int, projection_dim: int | None, seed: int,
                    projection_activation: str = "none") -> SequenceClassifier:
    """Load a base HF model (new head, seeded) or a classifier saved by :func:`save_classifier`."""
    path = check_model_dir(Path(path))
    meta = HeadMeta.for_model(path, num_labels, projection_dim, projection_activation)
    backbone, config = load_backbone(path)
    head = initial.head_arrays(meta, int(config["hidden_size"]), float(config.get("initializer_range", 0.02)), seed)
    saved = checkpoint.read_head(path)
    for key, value in saved.items():
        if key in head and head[key].shape != value.shape:
            raise ValueError(f"{path / 'head.safetensors'}: {key} has shape {value.shape}, expected {head[key].shape}")
    return SequenceClassifier(backbone, meta, head | saved)


def head_tensors(model: SequenceClassifier) -> dict[str, np.ndarray]:
    """The head's arrays under the torch backend's names (``classifier.weight`` ``[out, in]`` ...)."""
    out = {}
    for name in ("projection", "classifier"):
        layer = getattr(model, name)
        if layer is not None:
            out[f"{name}.weight"] = np.asarray(layer.weight[...])
            if layer.bias is not None:
                out[f"{name}.bias"] = np.asarray(layer.bias[...])
    return out


def save_classifier(model: SequenceClassifier, source: Path, target: Path) -> None:
    """Write backbone (LoRA merged), config, head, meta and the tokenizer files of ``source`` into ``target``."""
    if model.prompt is not None:
        raise ValueError("a prompt-learning adapter cannot be merged into the weights; save a LoRA model instead")
    target.mkdir(parents=True, exist_ok=True)
    checkpoint.save_backbone(checkpoint.backbone_tensors(model.backbone, type(model.backbone).STACKED), target)
    if (source / "config.json").resolve() != (target / "config.json").resolve():
        shutil.copy(source / "config.json", target / "config.json")
    checkpoint.save_head(head_tensors(model), target)
    model.meta.write(target)
    copy_tokenizer(source, target)
