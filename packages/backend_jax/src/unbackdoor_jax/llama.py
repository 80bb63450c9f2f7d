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
from .layers import Ctx, Embedding, Linear, RMSNorm, activation, attention, prepend, scan_layers_with

Array = jax.Array


def rope_theta(config: dict[str, Any]) -> float:
    """RoPE base from ``rope_theta`` or transformers 5's ``rope_parameters``; only unscaled RoPE is supported."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"RoPE type {kind!r} is not supported by the jax backend; supported: 'default'")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def rope_tables(positions: Array, dim: int, theta: float) -> tuple[Array, Array]:
    """``cos, sin`` ``[..., dim]`` for integer ``positions`` ``[L]`` or ``[B, L]`` (HF: frequencies repeated,
    not interleaved)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate ``x [B, L, H, D]`` by position (``cos``/``sin`` ``[L, D]`` or per row ``[B, L, D]``):
    ``x cos + rotate_half(x) sin``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[..., None, :], sin[..., None, :]  # over the heads
    return x * cos + rotated * sin


class LlamaAttention(nnx.Module):
    """Grouped-query self-attention with RoPE (biases when the checkpoint has them, as Qwen2)."""

    def __init__(self, t: Tensors, config: dict[str, Any]) -> None:
        self.q_proj, self.k_proj = Linear.load(t.scope("q_proj")), Linear.load(t.scope("k_proj"))
        self.v_proj, self.o_proj = Linear.load(t.scope("v_proj")), Linear.load(t.scope("o_proj"))
        self.num_heads = int(config["num_attention_heads"])
        self.num_kv_heads = int(config.get("num_key_value_heads") or self.num_heads)
        self.head_dim = int(config.get("head_dim") or config["hidden_size"] // self.num_heads)
        self.dropout = float(config.get("attention_dropout", 0.0))

    def __call__(self, h: Array, rope: tuple[Array, Array], allowed: Array, ctx: Ctx,
                 past: tuple[Array, Array] | None = None) -> tuple[Array, tuple[Array, Array]]:
        """The attention's output and this call's rotated keys and values ``[B, L, K, D]`` (a cache's entries).

        ``past``: cached keys and values ``[B, P, K, D]`` of earlier positions, attended in front of this call's
        (``allowed`` then ``[B, 1, L, P + L]``).
        """
        b, length, _ = h.shape
        q = self.q_proj(h, ctx).reshape(b, length, self.num_heads, self.head_dim)
        k = self.k_proj(h, ctx).reshape(b, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(h, ctx).reshape(b, length, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        keys, values = (k, v) if past is None else (jnp.concatenate([past[0], k], 1), jnp.concatenate([past[1], v], 1))
        return self.o_proj(attention(q, keys, values, allowed, ctx, self.dropout), ctx), (k, v)


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

    def __call__(self, h: Array, rope: tuple[Array, Array], allowed: Array, ctx: Ctx,
                 past: tuple[Array, Array] | None = None) -> tuple[Array, tuple[Array, Array]]:
        """The new states and the attention's keys and values (:meth:`LlamaAttention.__call__`)."""
        attended, cached = self.self_attn(self.input_layernorm(h), rope, allowed, ctx, past)
        h = h + attended
        return h + self.mlp(self.post_attention_layernorm(h), ctx), cached


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
                 inputs_embeds: Array | None = None, past: dict[str, Array] | None = None) -> tuple[Array, None]:
        """Final normed states ``[B, P+L, D]`` (and no pooled output).

        ``prompt [P, D]`` goes in front of the token embeddings; ``attention_mask`` covers both.
        ``inputs_embeds [B, L, D]``, when given, replaces the embedding of ``input_ids`` (as in HF).
        ``past`` (no prompt then): every layer's cached ``key``/``value`` ``[layers, B, C, K, D]`` of the
        positions before the inputs (:meth:`cached_keys`), ``mask`` ``[B, C]`` which are real, and ``length``
        ``[B]`` each row's first input position; the states returned are the inputs' ``[B, L, D]``.
        """
        h = prepend(prompt, self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds)
        return self.norm(self._layers(h, attention_mask, ctx, past, keep=False)[0]), None

    def cached_keys(self, input_ids: Array, attention_mask: Array, ctx: Ctx) -> tuple[Array, Array]:
        """Every layer's rotated attention keys and values of the tokens ``[layers, B, L, K, D]``: what a later
        call reads as ``past`` (a KV cache)."""
        return self._layers(self.embed_tokens(input_ids), attention_mask, ctx, None, keep=True)[1]

    def _layers(self, h: Array, attention_mask: Array, ctx: Ctx, past: dict[str, Array] | None,
                keep: bool) -> tuple[Array, Any]:
        """The stacked layers over the embeddings ``h``; with ``keep`` also their keys and values."""
        # Causal order from the mask's running count (equal to the position on real tokens, right padding).
        # A constant tril mask gives the same result but made XLA's CPU compile several times slower.
        order = jnp.cumsum(attention_mask, axis=1)
        allowed = (order[:, None, :, None] >= order[:, None, None, :]) & (attention_mask[:, None, None, :] > 0)
        positions = jnp.arange(h.shape[1])
        cached = None
        if past is not None:  # every input may read the real cached positions, and moves past them
            positions = past["length"][:, None] + positions[None]
            seen = past["mask"][:, None, None, :] > 0
            allowed = jnp.concatenate([jnp.broadcast_to(seen, (*allowed.shape[:3], seen.shape[-1])), allowed], -1)
            cached = (past["key"], past["value"])
        rope = rope_tables(positions, self.layers.self_attn.head_dim, self.rope_theta)

        def step(layer: LlamaLayer, x: Array, c: Ctx, kv: tuple[Array, Array] | None) -> tuple[Array, Any]:
            x, new = layer(x, rope, allowed, c, kv)
            return x, new if keep else None

        return scan_layers_with(self.layers, h, ctx, step, cached)
