"""Seeded starting values, drawn once in NumPy so every backend starts from the same numbers.

A new classification head, a LoRA ``A`` matrix and a soft prompt are the
only random parameters a run creates (the backbone comes from the weights
file; LoRA ``B`` starts at zero). Drawing them here instead of with each
framework's RNG makes ``--backend torch`` and ``--backend jax`` train from
identical initial models, so their results differ only by floating-point
order and dropout, not by a different random start.

Each LoRA matrix gets its own stream keyed by its peft-style name
(``backbone.layers.3.self_attn.q_proj``), so the values do not depend on
the order in which a backend visits its layers or on whether it stacks
them.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from .layout import HeadMeta


def head_arrays(meta: HeadMeta, hidden: int, std: float, seed: int) -> dict[str, np.ndarray]:
    """A new head under the saved layout's names: weights ``N(0, std)`` ``[out, in]``, zero biases.

    Decoders have no classifier bias (like HF's ``*ForSequenceClassification``).
    """
    rng = np.random.default_rng(seed)
    head: dict[str, np.ndarray] = {}
    width = hidden
    if meta.projection_dim:
        head["projection.weight"] = rng.normal(0.0, std, (meta.projection_dim, hidden)).astype(np.float32)
        head["projection.bias"] = np.zeros(meta.projection_dim, np.float32)
        width = meta.projection_dim
    head["classifier.weight"] = rng.normal(0.0, std, (meta.num_labels, width)).astype(np.float32)
    if not meta.decoder:
        head["classifier.bias"] = np.zeros(meta.num_labels, np.float32)
    return head


def lora_a(key: str, rank: int, in_dim: int, seed: int) -> np.ndarray:
    """LoRA ``A`` ``[rank, in_dim]`` for the layer named ``key``: ``U(+-1/sqrt(in_dim))``.

    That is the distribution of peft's default ``kaiming_uniform_(a=sqrt(5))``.
    """
    if rank < 1 or in_dim < 1:
        raise ValueError(f"LoRA A for {key}: rank and input size must be >= 1, got rank={rank}, in={in_dim}")
    bound = 1.0 / math.sqrt(in_dim)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return rng.uniform(-bound, bound, (rank, in_dim)).astype(np.float32)


def soft_prompt(num_virtual_tokens: int, width: int, seed: int) -> np.ndarray:
    """Prompt-tuning embeddings ``[tokens, width]`` drawn ``N(0, 1)`` (peft's random init)."""
    return np.random.default_rng(seed).standard_normal((num_virtual_tokens, width)).astype(np.float32)
