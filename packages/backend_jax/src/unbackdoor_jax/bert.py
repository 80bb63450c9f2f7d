"""A BERT encoder in flax.nnx with its pooler, following HF's ``BertModel`` (post-norm, absolute positions).

Attribute names (``self``, ``LayerNorm``) are HF's so parameter paths are checkpoint keys.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from .checkpoint import Tensors
from .layers import Ctx, Embedding, LayerNorm, Linear, activation, attention, prepend, scan_layers

Array = jax.Array


def _eps(config: dict[str, Any]) -> float:
    return float(config.get("layer_norm_eps", 1e-12))


class BertEmbeddings(nnx.Module):
    """Word + token-type (all type 0) + position embeddings, LayerNorm, dropout."""

    def __init__(self, t: Tensors, config: dict[str, Any]) -> None:
        self.word_embeddings = Embedding(t.scope("word_embeddings"))
        self.token_type_embeddings = Embedding(t.scope("token_type_embeddings"))
        self.position_embeddings = Embedding(t.scope("position_embeddings"))
        self.LayerNorm = LayerNorm(t.scope("LayerNorm"), _eps(config))
        self.dropout = float(config.get("hidden_dropout_prob", 0.1))

    def __call__(self, input_ids: Array, ctx: Ctx, prompt: Array | None = None,
                 inputs_embeds: Array | None = None) -> Array:
        """``inputs_embeds [B, L, D]``, when given, replaces the word embeddings of ``input_ids`` (as in HF:
        position and token-type embeddings are still added)."""
        words = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        words = prepend(prompt, words)  # a soft prompt gets positions 0..P-1
        positions = jnp.arange(words.shape[1])
        h = words + self.token_type_embeddings(jnp.zeros_like(positions))[None]
        h = h + self.position_embeddings(positions)[None]
        return ctx.dropout(self.LayerNorm(h), self.dropout)


class BertSelfAttention(nnx.Module):
    """Multi-head self-attention over the non-pad tokens."""

    def __init__(self, t: Tensors, config: dict[str, Any]) -> None:
        self.query, self.key = Linear.load(t.scope("query")), Linear.load(t.scope("key"))
        self.value = Linear.load(t.scope("value"))
        self.num_heads = int(config["num_attention_heads"])
        self.dropout = float(config.get("attention_probs_dropout_prob", 0.1))

    def __call__(self, h: Array, allowed: Array, ctx: Ctx) -> Array:
        b, length, width = h.shape
        shape = (b, length, self.num_heads, width // self.num_heads)
        q, k, v = (proj(h, ctx).reshape(shape) for proj in (self.query, self.key, self.value))
        return attention(q, k, v, allowed, ctx, self.dropout)


class BertAddNorm(nnx.Module):
    """``LayerNorm(residual + dropout(dense(x)))``: BERT's ``SelfOutput`` and ``Output``."""

    def __init__(self, t: Tensors, config: dict[str, Any]) -> None:
        self.dense = Linear.load(t.scope("dense"))
        self.LayerNorm = LayerNorm(t.scope("LayerNorm"), _eps(config))
        self.dropout = float(config.get("hidden_dropout_prob", 0.1))

    def __call__(self, x: Array, residual: Array, ctx: Ctx) -> Array:
        return self.LayerNorm(ctx.dropout(self.dense(x, ctx), self.dropout) + residual)


class BertAttention(nnx.Module):
    """Self-attention then add & norm."""

    def __init__(self, t: Tensors, config: dict[str, Any]) -> None:
        self.self = BertSelfAttention(t.scope("self"), config)
        self.output = BertAddNorm(t.scope("output"), config)

    def __call__(self, h: Array, allowed: Array, ctx: Ctx) -> Array:
        return self.output(self.self(h, allowed, ctx), h, ctx)


class BertIntermediate(nnx.Module):
    """The feed-forward expansion ``act(dense(x))``."""

    def __init__(self, t: Tensors, config: dict[str, Any]) -> None:
        self.dense = Linear.load(t.scope("dense"))
        self.act = config.get("hidden_act", "gelu")
        activation(self.act)  # an unknown activation fails at load time, not inside jit

    def __call__(self, x: Array, ctx: Ctx) -> Array:
        neurons = activation(self.act)(self.dense(x, ctx))
        ctx.observe(neurons)
        return neurons


class BertLayer(nnx.Module):
    """Attention block then feed-forward block, each post-norm."""

    def __init__(self, t: Tensors, config: dict[str, Any]) -> None:
        self.attention = BertAttention(t.scope("attention"), config)
        self.intermediate = BertIntermediate(t.scope("intermediate"), config)
        self.output = BertAddNorm(t.scope("output"), config)

    def __call__(self, h: Array, allowed: Array, ctx: Ctx) -> Array:
        h = self.attention(h, allowed, ctx)
        return self.output(self.intermediate(h, ctx), h, ctx)


class BertEncoder(nnx.Module):
    """The stack of :class:`BertLayer` (stacked weights, scanned)."""

    def __init__(self, t: Tensors, config: dict[str, Any]) -> None:
        self.layer = BertLayer(t.stacked("layer", int(config["num_hidden_layers"])), config)

    def __call__(self, h: Array, allowed: Array, ctx: Ctx) -> Array:
        return scan_layers(self.layer, h, ctx, lambda layer, x, c: layer(x, allowed, c))


class BertPooler(nnx.Module):
    """``tanh(dense(h[:, 0]))``: the [CLS] state through a dense layer."""

    def __init__(self, t: Tensors) -> None:
        self.dense = Linear.load(t.scope("dense"))

    def __call__(self, states: Array, ctx: Ctx) -> Array:
        return jnp.tanh(self.dense(states[:, 0], ctx))


class Bert(nnx.Module):
    """Embeddings, encoder and (when the checkpoint has one) the pooler."""

    STACKED: ClassVar[str] = "encoder.layer"

    def __init__(self, t: Tensors, config: dict[str, Any]) -> None:
        self.embeddings = BertEmbeddings(t.scope("embeddings"), config)
        self.encoder = BertEncoder(t.scope("encoder"), config)
        self.pooler = nnx.data(BertPooler(t.scope("pooler")) if t.has("pooler.dense.weight") else None)
        self.hidden_size = int(config["hidden_size"])
        #: rows of the position table: no input may be longer
        self.max_positions = int(self.embeddings.position_embeddings.weight.shape[0])

    def input_embeddings(self) -> Embedding:
        """The word embedding table ``[vocab, D]`` (HF's ``get_input_embeddings``)."""
        return self.embeddings.word_embeddings

    def __call__(self, input_ids: Array, attention_mask: Array, ctx: Ctx, prompt: Array | None = None,
                 inputs_embeds: Array | None = None) -> tuple[Array, Array | None]:
        """Last states ``[B, P+L, D]`` and the pooled output ``[B, D]`` (None without a pooler).

        ``prompt [P, D]`` goes in front of the word embeddings; ``attention_mask`` covers both.
        ``inputs_embeds [B, L, D]``, when given, replaces the word embeddings of ``input_ids``.
        """
        allowed = attention_mask[:, None, None, :] > 0
        states = self.encoder(self.embeddings(input_ids, ctx, prompt, inputs_embeds), allowed, ctx)
        return states, None if self.pooler is None else self.pooler(states, ctx)
