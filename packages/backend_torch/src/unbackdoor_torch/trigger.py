"""Soft triggers: logits and input-embedding gradients for trigger inversion (the ``trigger-search`` auditor).

On a decoder the states of each row's tokens before the trigger do not depend on it: :func:`trigger_prefix`
computes their attention keys and values once, and :func:`trigger_logits` then runs only the trigger and the
tokens after it over them (transformers' ``DynamicCache``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from unbackdoor.batching import trigger_weights

from .modeling import SequenceClassifier


def trigger_logits(module: SequenceClassifier, batch: Mapping[str, np.ndarray], weights: np.ndarray,
                   target: np.ndarray | None, device: torch.device) -> tuple[np.ndarray, float, np.ndarray | None]:
    """See :meth:`unbackdoor.backend.TriggerBackend.trigger_logits`: slot ``j`` embeds ``weights[j] @ E[:V]``;
    a batch with ``past_key`` (:func:`unbackdoor.batching.cached_trigger_batch`) runs over the cached states."""
    module.eval()
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long, device=device)
    mask = torch.as_tensor(batch["attention_mask"], dtype=torch.long, device=device)
    at = torch.as_tensor(batch["trigger_at"], dtype=torch.long, device=device)
    table = module.backbone.get_input_embeddings()
    weights = trigger_weights(weights, at.shape[1], table.weight.shape[0])
    soft = torch.as_tensor(weights, device=device).requires_grad_(target is not None)
    with torch.set_grad_enabled(target is not None):
        embeds = table(ids).float()
        trigger = soft @ table.weight[: soft.shape[1]].float()  # [k, D]
        rows = torch.arange(ids.shape[0], device=device)[:, None].expand_as(at)
        embeds = embeds.index_put((rows, at), trigger.unsqueeze(0).expand(ids.shape[0], -1, -1))
        if "past_key" in batch:
            logits = _cached_logits(module, batch, embeds, mask, device)
        else:
            logits = module(ids, mask, inputs_embeds=embeds)[0].float()
        if target is None:
            return logits.detach().cpu().numpy(), float("nan"), None
        loss = F.cross_entropy(logits, torch.as_tensor(target, dtype=torch.long, device=device))
        (grad,) = torch.autograd.grad(loss, soft)
    return logits.detach().cpu().numpy(), float(loss.detach()), grad.cpu().numpy()


def trigger_prefix(module: SequenceClassifier, batch: Mapping[str, np.ndarray],
                   device: torch.device) -> dict[str, np.ndarray] | None:
    """See :meth:`unbackdoor.backend.TriggerCacheBackend.trigger_prefix`: every layer's cached keys and values
    ``[layers, B, P, kv_heads, head_dim]``; None for an encoder or under a soft prompt (peft prompt learning)."""
    adapter = getattr(module.backbone, "active_peft_config", None)
    if not module.meta.decoder or (adapter is not None and adapter.is_prompt_learning):
        return None
    module.eval()
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long, device=device)
    mask = torch.as_tensor(batch["attention_mask"], dtype=torch.long, device=device)
    with torch.no_grad():
        out = module.backbone(input_ids=ids, attention_mask=mask, use_cache=True)
    layers = getattr(out, _cache_argument(module.backbone)).layers
    # transformers holds [B, kv_heads, P, head_dim] per layer
    return {key: torch.stack([getattr(layer, name) for layer in layers]).transpose(2, 3).float().cpu().numpy()
            for key, name in (("key", "keys"), ("value", "values"))}


def _cached_logits(module: SequenceClassifier, batch: Mapping[str, np.ndarray], embeds: torch.Tensor,
                   mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[B, C]`` float32 logits of the uncached tokens ``embeds`` ``[B, S, D]`` after the batch's cached states."""
    cache = DynamicCache()
    keys, values = (torch.as_tensor(batch[k], device=device) for k in ("past_key", "past_value"))
    for layer in range(keys.shape[0]):
        cache.update(keys[layer].transpose(1, 2), values[layer].transpose(1, 2), layer)
    past = torch.as_tensor(batch["past_mask"], dtype=torch.long, device=device)
    start = torch.as_tensor(batch["past_length"], dtype=torch.long, device=device)
    positions = start[:, None] + torch.arange(mask.shape[1], device=device)[None]
    out = module.backbone(inputs_embeds=embeds, attention_mask=torch.cat([past, mask], dim=1),
                          position_ids=positions, use_cache=True, **{_cache_argument(module.backbone): cache})
    states = out.last_hidden_state
    last = mask.sum(dim=1) - 1  # right padding: the row's last uncached token
    return module.head(states[torch.arange(states.shape[0], device=device), last])[0].float()


def _cache_argument(backbone: torch.nn.Module) -> str:
    """What the backbone's ``forward`` and output call the KV cache: ``cache`` (transformers >= 5.24, which
    deprecates the older name) or ``past_key_values``."""
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
