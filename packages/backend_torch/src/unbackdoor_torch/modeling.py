"""Sequence classifiers over any HF backbone, with explicit pooling.

Saved in the core's layout (:mod:`unbackdoor.layout`), which the JAX backend reads too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel

from unbackdoor import initial
from unbackdoor.layout import HEAD_FILE, HeadMeta, copy_tokenizer
from unbackdoor.models import check_model_dir
from unbackdoor.text import TextEncoder

#: the head's activation after the projection g (:data:`unbackdoor.layout.PROJECTION_ACTIVATIONS`)
ACTIVATIONS = {"none": lambda x: x, "relu": torch.relu, "tanh": torch.tanh}


class SequenceClassifier(nn.Module):
    """backbone -> pool -> [projection g] -> classifier.

    Decoders pool the last non-pad token of the final (normed) hidden states;
    encoders use the backbone's pooled output (or the first token).
    """

    def __init__(self, backbone: nn.Module, meta: HeadMeta) -> None:
        super().__init__()
        self.backbone, self.meta = backbone, meta
        hidden = backbone.config.hidden_size
        self.projection = nn.Linear(hidden, meta.projection_dim) if meta.projection_dim else None
        self.classifier = nn.Linear(meta.projection_dim or hidden, meta.num_labels, bias=not meta.decoder)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tokens: bool = False,
                inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``logits [B, C]`` and the pooled (projected) state ``[B, D]``; with ``tokens``, instead of
        the pooled state, the backbone's final state of every input position ``[B, L, D]`` (virtual tokens
        of a soft prompt left out). ``inputs_embeds`` ``[B, L, D]``, when given, replaces the embedding of
        ``input_ids`` (trigger inversion)."""
        if inputs_embeds is None:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        else:
            out = self.backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        logits, pooled = self.head(self._pool(out, attention_mask))
        if tokens:
            states = out.last_hidden_state  # type: ignore[attr-defined]
            return logits, states[:, states.shape[1] - input_ids.shape[1]:]
        return logits, pooled

    def head(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits [B, C]`` of the backbone's pooled state ``[B, H]``, and that state after g (when there is one)."""
        if self.projection is not None:
            pooled = ACTIVATIONS[self.meta.projection_activation](self.projection(pooled))
        return self.classifier(pooled), pooled

    def _pool(self, out: object, attention_mask: torch.Tensor) -> torch.Tensor:
        states = out.last_hidden_state  # type: ignore[attr-defined]
        if self.meta.decoder:  # right padding: the last real token sits at length - 1
            offset = states.shape[1] - attention_mask.shape[1]  # virtual tokens a soft prompt put in front
            last = attention_mask.sum(dim=1) - 1 + offset
            return states[torch.arange(states.shape[0], device=states.device), last]
        pooler = getattr(out, "pooler_output", None)
        return pooler if pooler is not None else states[:, 0]


def hold_frozen(backbone: nn.Module, dtype: torch.dtype) -> None:
    """Store every linear and embedding weight of ``backbone`` (frozen under an adapter) in ``dtype``.

    Under bf16 autocast a linear layer multiplies in bf16 whatever it stores, so holding its weight in bf16
    halves the memory and changes no product. Embedding lookups are cast back to float32 (a hook), so the
    residual stream stays float32 as with float32 weights; only the table's values are rounded. Norms and
    biases (vectors, a few MB even at 8B) stay float32. Adapters added later start in float32.
    """
    for module in backbone.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.dtype != dtype:
            module.weight.data = module.weight.data.to(dtype)
            if isinstance(module, nn.Embedding):
                module.register_forward_hook(lambda _m, _inputs, out: out.float())


def held_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the backbone holds its weights in (:func:`hold_frozen`), float32 unless changed."""
    return next((p.dtype for p in module.parameters() if p.dtype != torch.float32), torch.float32)


def upcast_adapted(backbone: nn.Module) -> None:
    """Float32 base weights under every LoRA layer, so merging the adapter adds its update in float32
    (merged into a bf16 weight, an update much smaller than the weight would round away)."""
    for module in backbone.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Linear) and base.weight.dtype != torch.float32:
            base.weight.data = base.weight.data.float()


def load_backbone(path: Path) -> nn.Module:
    """The HF backbone (no head) of a HF directory, float32."""
    return AutoModel.from_pretrained(check_model_dir(Path(path)), dtype=torch.float32, use_safetensors=True)


def load_classifier(path: Path, num_labels: int, projection_dim: int | None, seed: int,
                    projection_activation: str = "none") -> SequenceClassifier:
    """Load a base HF model (new head, seeded) or a classifier saved by :func:`save_classifier`."""
    path = check_model_dir(Path(path))
    config = AutoConfig.from_pretrained(path)
    meta = HeadMeta.for_model(path, num_labels, projection_dim, projection_activation)
    backbone = load_backbone(path)
    model = SequenceClassifier(backbone, meta)
    std = float(getattr(config, "initializer_range", 0.02))
    head = initial.head_arrays(meta, backbone.config.hidden_size, std, seed)  # the jax backend draws the same
    if (path / HEAD_FILE).is_file():
        head |= {k: v.numpy() for k, v in load_file(path / HEAD_FILE).items()}
    model.load_state_dict({k: torch.from_numpy(v) for k, v in head.items()}, strict=False)
    return model


def head_state(model: SequenceClassifier) -> dict[str, torch.Tensor]:
    """The head's tensors (classifier and projection), contiguous, on CPU."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("backbone.")}


def save_classifier(model: SequenceClassifier, source: Path, target: Path) -> None:
    """Write backbone, head, meta and the tokenizer files of ``source`` into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(target, safe_serialization=True)
    save_file(head_state(model), target / HEAD_FILE)
    model.meta.write(target)
    copy_tokenizer(source, target)


def load_encoder(path: Path) -> TextEncoder:
    """The shared core tokenizer of a model directory."""
    return TextEncoder.from_dir(path)
