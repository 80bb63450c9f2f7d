"""Model analysis for defenses: causal-LM perplexity (ONION) and feed-forward activations (fine-pruning).

Both batch every row with the core's length buckets; no Python loop per row.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from unbackdoor.batching import iter_batches, num_batches
from unbackdoor.models import check_model_dir
from unbackdoor.progress import progress

from .train import autocast, to_tensors

# The layer that reads a feed-forward block's neurons: Llama family down_proj, BERT family output.dense.
_FFN_OUT = re.compile(r"(?:^|\.)layers?\.(\d+)\.(?:mlp\.down_proj|output\.dense)$")


def load_causal_lm(path: Path, device: torch.device) -> nn.Module:
    """A HF causal LM from a safetensors directory, fp32, in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(check_model_dir(Path(path)), dtype=torch.float32,
                                                 use_safetensors=True)
    return model.to(device).eval()


@torch.inference_mode()
def lm_nll(model: nn.Module, ids: list[np.ndarray], pad_id: int, batch_size: int, device: torch.device,
           precision: str = "fp32", desc: str = "lm nll") -> np.ndarray:
    """Mean next-token NLL of each id row (start token first) ``[N]``; NaN for rows with one token or none."""
    out = np.full(len(ids), np.nan, np.float32)
    for batch in progress(iter_batches(ids, pad_id, batch_size), desc, num_batches(len(ids), batch_size)):
        t = to_tensors(batch, device)
        with autocast(precision, device):
            logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        nll = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), t["input_ids"][:, 1:],
                                          reduction="none")
        mask = t["attention_mask"][:, 1:].float()
        out[batch["index"]] = ((nll * mask).sum(1) / mask.sum(1)).cpu().numpy()
    return out


def ffn_output_layers(backbone: nn.Module) -> list[nn.Module]:
    """The module reading each layer's feed-forward neurons, in layer order (peft wrappers included)."""
    found = {int(m[1]): module for name, module in backbone.named_modules() if (m := _FFN_OUT.search(name))}
    if not found:
        raise ValueError(f"no feed-forward layers (mlp.down_proj / layer.N.output.dense) in {type(backbone).__name__}")
    return [found[i] for i in sorted(found)]


@torch.inference_mode()
def mlp_activations(model: nn.Module, batches: list[dict[str, np.ndarray]], device: torch.device,
                    precision: str = "fp32", desc: str = "ffn activations") -> list[np.ndarray]:
    """Mean ``|input|`` of each feed-forward output layer over the real tokens of ``batches``, per layer."""
    layers = ffn_output_layers(model.backbone)
    sums: list[torch.Tensor | float] = [0.0] * len(layers)
    state: dict[str, torch.Tensor] = {}
    handles = [layer.register_forward_pre_hook(_accumulate(i, sums, state)) for i, layer in enumerate(layers)]
    tokens = 0.0
    try:
        for batch in progress(batches, desc, len(batches)):
            t = to_tensors(batch, device)
            state["mask"] = t["attention_mask"].float()
            with autocast(precision, device):
                model(t["input_ids"], t["attention_mask"])
            tokens += float(state["mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
    return [(s / tokens).cpu().numpy().astype(np.float32) for s in sums]  # type: ignore[union-attr]


def _accumulate(i: int, sums: list[torch.Tensor | float], state: dict[str, torch.Tensor]) -> Callable[..., None]:
    """A pre-hook adding ``sum over real tokens of |x|`` ``[intermediate]`` to ``sums[i]``."""

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x, mask = args[0].float().abs(), state["mask"]
        if x.shape[1] != mask.shape[1]:  # virtual tokens of a soft prompt sit in front of the input
            mask = nn.functional.pad(mask, (x.shape[1] - mask.shape[1], 0), value=1.0)
        sums[i] = sums[i] + torch.einsum("bli,bl->i", x, mask)

    return hook
