"""Soft triggers: logits and input-embedding gradients for trigger inversion (the ``trigger-search`` auditor)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from unbackdoor.batching import trigger_weights

from .modeling import SequenceClassifier


def trigger_logits(module: SequenceClassifier, batch: Mapping[str, np.ndarray], weights: np.ndarray,
                   target: np.ndarray | None, device: torch.device) -> tuple[np.ndarray, float, np.ndarray | None]:
    """See :meth:`unbackdoor.backend.TriggerBackend.trigger_logits`: slot ``j`` embeds ``weights[j] @ E[:V]``."""
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
        logits = module(ids, mask, inputs_embeds=embeds)[0].float()
        if target is None:
            return logits.detach().cpu().numpy(), float("nan"), None
        loss = F.cross_entropy(logits, torch.as_tensor(target, dtype=torch.long, device=device))
        (grad,) = torch.autograd.grad(loss, soft)
    return logits.detach().cpu().numpy(), float(loss.detach()), grad.cpu().numpy()
