"""A Llama-family decoder in flax.nnx (Llama, Mistral, Qwen2): RMSNorm, RoPE, grouped-query attention, SwiGLU.

Follows HF's ``LlamaModel``: RoPE in the ``rotate_half`` layout, right padding,
causal attention, the final norm applied; no LM head (classifiers pool a state).
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from unbackdoor.errors import ConfigError

from .checkpoint import Tensors
from .layers import Ctx, Embedding, Linear, RMSNorm, activation, attention, prepend, scan_layers

Array = jax.Array


def rope_theta(config: dict[str, Any]) -> float:
    """RoPE base from ``rope_theta`` or transformers 5's ``rope_parameters``; only unscaled RoPE is supported."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"RoPE type {kind!r} is not supported by the jax backend; supported: 'default'")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def rope_tables(length: int, dim: int, theta: float) -> tuple[Array, Array]:
    """``cos, sin`` ``[L, dim]`` for positions ``0..L-1`` (HF: frequencies repeated, not interleaved)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate ``x [B, L, H, D]`` by position: ``x cos + rotate_half(x) sin``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


class LlamaAttention(nnx.Module):
    """Grouped-query self-attention with RoPE (biases when the checkpoint has them, as Qwen2)."""

    def __init__(self, t: Tensors, config: dict[str, Any]) -> None:
        self.q_proj, self.k_proj = Linear.load(t.scope("q_proj")), Linear.load(t.scope("k_proj"))
        self.v_proj, self.o_proj = Linear.load(t.scope("v_proj")), Linear.load(t.scope("o_proj"))
        self.num_heads = int(config["num_attention_heads"])
        self.num_kv_heads = int(config.get("num_key_value_heads") or self.num_heads)
        self.head_dim = int(config.get("head_dim") or config["hidden_size"] // self.num_heads)
        self.dropout = float(config.get("attention_dropout", 0.0))

    def __call__(self, h: Array, rope: tuple[Array, Array], allowed: Array, ctx: Ctx) -> Array:
        b, length, _ = h.shape
        q = self.q_proj(h, ctx).reshape(b, length, self.num_heads, self.head_dim)
        k = self.k_proj(h, ctx).reshape(b, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(h, ctx).reshape(b, length, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.o_proj(attention(q, k, v, allowed, ctx, self.dropout), ctx)


class LlamaMLP(nnx.Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, t: Tensors, config: dict[str, Any]) -> None:
        self.gate_proj, self.up_proj = Linear.load(t.scope("gate_proj")), Linear.load(t.scope("up_proj"))
        self.down_proj = Linear.load(t.scope("down_proj"))
        self.act = config.get("hidden_act", "silu")
        activation(self.act)  # an unknown activation fails at load time, not inside jit

    def __call__(self, x: Array, ctx: Ctx) -> Array:
        neurons = activation(self.act)(self.gate_proj(x, ctx)) * self.up_proj(x, ctx)
        ctx.observe(neurons)
        return self.down_proj(neurons, ctx)


class LlamaLayer(nnx.Module):
    """Pre-norm block: ``h += attn(norm(h)); h += mlp(norm(h))``."""

    def __init__(self, t: Tensors, config: dict[str, Any]) -> None:
        eps = float(config.get("rms_norm_eps", 1e-6))
        self.input_layernorm = RMSNorm(t.scope("input_layernorm"), eps)
        self.self_attn = LlamaAttention(t.scope("self_attn"), config)
        self.post_attention_layernorm = RMSNorm(t.scope("post_attention_layernorm"), eps)
        self.mlp = LlamaMLP(t.scope("mlp"), config)

    def __call__(self, h: Array, rope: tuple[Array, Array], allowed: Array, ctx: Ctx) -> Array:
        h = h + self.self_attn(self.input_layernorm(h), rope, allowed, ctx)
        return h + self.mlp(self.post_attention_layernorm(h), ctx)


class Llama(nnx.Module):
    """Token embeddings, a scanned stack of :class:`LlamaLayer`, the final RMSNorm."""

    STACKED: ClassVar[str] = "layers"

    def __init__(self, t: Tensors, config: dict[str, Any]) -> None:
        depth = int(config["num_hidden_layers"])
        self.embed_tokens = Embedding(t.scope("embed_tokens"))
        self.layers = LlamaLayer(t.stacked("layers", depth), config)
        self.norm = RMSNorm(t.scope("norm"), float(config.get("rms_norm_eps", 1e-6)))
        self.hidden_size = int(config["hidden_size"])
        #: the longest input the model was made for (RoPE itself has no table to run past; HF's default 2048)
        self.max_positions = int(config.get("max_position_embeddings", 2048))
        self.rope_theta = rope_theta(config)

    def input_embeddings(self) -> Embedding:
        """The token embedding table ``[vocab, D]`` (HF's ``get_input_embeddings``)."""
        return self.embed_tokens

    def __call__(self, input_ids: Array, attention_mask: Array, ctx: Ctx, prompt: Array | None = None,
                 inputs_embeds: Array | None = None) -> tuple[Array, None]:
        """Final normed states ``[B, P+L, D]`` (and no pooled output).

        ``prompt [P, D]`` goes in front of the token embeddings; ``attention_mask`` covers both.
        ``inputs_embeds [B, L, D]``, when given, replaces the embedding of ``input_ids`` (as in HF).
        """
        h = prepend(prompt, self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds)
        length = h.shape[1]
        rope = rope_tables(length, self.layers.self_attn.head_dim, self.rope_theta)
        # Causal order from the mask's running count (equal to the position on real tokens, right padding).
        # A constant tril mask gives the same result but made XLA's CPU compile several times slower.
        order = jnp.cumsum(attention_mask, axis=1)
        allowed = (order[:, None, :, None] >= order[:, None, None, :]) & (attention_mask[:, None, None, :] > 0)
        h = scan_layers(self.layers, h, ctx, lambda layer, x, c: layer(x, rope, allowed, c))
        return self.norm(h), None
