"""Building blocks of the nnx BERT and Llama: linear layers (with an optional LoRA), norms, attention.

Every block is built from HF checkpoint tensors (:class:`~unbackdoor_jax.checkpoint.Tensors`)
and names its attributes like the HF modules, so a parameter's nnx path is its
HF key. Per-layer blocks hold stacked weights (leading layer axis) and run
under :func:`scan_layers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unbackdoor.errors import check_choice

if TYPE_CHECKING:
    from .checkpoint import Tensors

Array = jax.Array


class AdapterParam(nnx.Param):
    """A PEFT parameter: once an adapter is added, these and the head are all that train."""


class LoRAParam(AdapterParam):
    """A LoRA matrix (A or B) of one linear layer."""


class PromptParam(AdapterParam):
    """Soft-prompt embeddings put in front of every input (prompt tuning)."""


class Ctx:
    """What one forward pass needs besides the weights: matmul dtype, dropout key, analysis mask, remat.

    ``key=None`` means inference (no dropout). ``remat``: the scanned layers recompute their activations
    in the backward pass instead of keeping them (gradient checkpointing, ``jax.checkpoint``). Keys are derived lazily, only
    where a dropout runs (a fold of the site counter and the layer index),
    so a model without dropout compiles no random-number code at all. With
    ``token_mask`` ``[B, L]`` (covering any soft prompt too) the feed-forward
    blocks append their per-neuron activation sums to ``observed``.
    """

    def __init__(self, dtype: Any = jnp.float32, key: Array | None = None, layer: Array | None = None,
                 token_mask: Array | None = None, remat: bool = False) -> None:
        self.dtype, self.key, self.layer, self._count, self.remat = dtype, key, layer, 0, remat
        self.token_mask = token_mask  # set: feed-forward blocks report their neurons' |activation| sums
        self.observed: list[Array] = []

    def next_key(self) -> Array:
        """A key no other dropout site of this forward pass uses."""
        assert self.key is not None, "next_key needs a training key"
        self._count += 1
        key = jax.random.fold_in(self.key, self._count)
        return key if self.layer is None else jax.random.fold_in(key, self.layer)

    def for_layer(self, layer: Array) -> Ctx:
        """The same settings for scanned layer ``layer`` (its own dropout masks)."""
        return Ctx(self.dtype, self.key, layer, self.token_mask, self.remat)

    def observe(self, neurons: Array) -> None:
        """With a token mask: record ``sum over real tokens of |neurons|`` ``[I]`` (fine-pruning statistics)."""
        if self.token_mask is None:
            return
        self.observed.append(jnp.einsum("bli,bl->i", jnp.abs(neurons.astype(jnp.float32)), self.token_mask))

    def dropout(self, x: Array, rate: float) -> Array:
        """Inverted dropout while training; identity at inference or rate 0."""
        if self.key is None or rate <= 0.0:
            return x
        keep = jax.random.bernoulli(self.next_key(), 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)

    def einsum(self, spec: str, a: Array, b: Array) -> Array:
        """``einsum`` in the compute dtype with a float32 result (bf16 autocast semantics)."""
        out = jnp.einsum(spec, a.astype(self.dtype), b.astype(self.dtype))
        return out.astype(jnp.float32)


class Linear(nnx.Module):
    """``y = x W^T + b`` with W ``[out, in]`` as HF stores it, plus ``scaling * B A x`` once LoRA is added."""

    def __init__(self, weight: Any, bias: Any = None) -> None:
        self.weight = nnx.Param(jnp.asarray(weight, jnp.float32))
        self.bias = nnx.data(None if bias is None else nnx.Param(jnp.asarray(bias, jnp.float32)))
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.scaling = 0.0
        self.lora_dropout = 0.0

    @classmethod
    def load(cls, t: Tensors) -> Linear:
        """The ``weight`` (and ``bias`` when present) under ``t``'s prefix."""
        return cls(t.get("weight"), t.get("bias") if t.has("bias") else None)

    def __call__(self, x: Array, ctx: Ctx) -> Array:
        y = ctx.einsum("...i,oi->...o", x, self.weight[...])
        if self.bias is not None:
            y = y + self.bias[...]
        if self.lora_a is not None:  # peft: base(x) + B(A(dropout(x))) * scaling
            low = ctx.einsum("...i,ri->...r", ctx.dropout(x, self.lora_dropout), self.lora_a[...])
            y = y + ctx.einsum("...r,or->...o", low, self.lora_b[...]) * self.scaling
        return y

    def add_lora(self, a: np.ndarray, alpha: float, dropout: float) -> None:
        """Attach ``A`` (``[..., r, in]``, stacked like the weight) and ``B = 0``; scaling ``alpha / r``."""
        *lead, out_dim, in_dim = self.weight.shape
        rank = a.shape[-2]
        if a.shape != (*lead, rank, in_dim):
            raise ValueError(f"LoRA A has shape {a.shape}, expected {(*lead, rank, in_dim)}")
        self.lora_a = LoRAParam(jnp.asarray(a, jnp.float32))
        self.lora_b = LoRAParam(jnp.zeros((*lead, out_dim, rank), jnp.float32))
        self.scaling, self.lora_dropout = alpha / rank, dropout

    def merge_lora(self) -> None:
        """Fold the adapter into the weight and drop it: the layer becomes a plain linear again."""
        self.weight[...] = self.merged_weight()
        self.lora_a, self.lora_b, self.scaling, self.lora_dropout = None, None, 0.0, 0.0

    def merged_weight(self) -> Array:
        """``W + scaling * B A`` (just W without an adapter): what the saved model holds."""
        w = self.weight[...]
        if self.lora_a is None:
            return w
        delta = jnp.einsum("...or,...ri->...oi", self.lora_b[...], self.lora_a[...],
                           precision=jax.lax.Precision.HIGHEST)
        return w + self.scaling * delta


class Embedding(nnx.Module):
    """A lookup table ``[vocab, hidden]``."""

    def __init__(self, t: Tensors) -> None:
        self.weight = nnx.Param(jnp.asarray(t.get("weight")))

    def __call__(self, ids: Array) -> Array:  # float32 out, also from a bf16 table (:func:`hold_frozen`)
        return jnp.take(self.weight[...], ids, axis=0).astype(jnp.float32)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis (float32)."""

    def __init__(self, t: Tensors, eps: float) -> None:
        self.weight = nnx.Param(jnp.asarray(t.get("weight")))
        self.bias = nnx.Param(jnp.asarray(t.get("bias")))
        self.eps = float(eps)

    def __call__(self, x: Array) -> Array:
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]


class RMSNorm(nnx.Module):
    """Llama's RMSNorm: ``w * x / sqrt(mean(x^2) + eps)`` (float32)."""

    def __init__(self, t: Tensors, eps: float) -> None:
        self.weight = nnx.Param(jnp.asarray(t.get("weight")))
        self.eps = float(eps)

    def __call__(self, x: Array) -> Array:
        x = x.astype(jnp.float32)
        return self.weight[...] * (x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps))


def hold_frozen(module: nnx.Module, dtype: Any) -> None:
    """Store every linear and embedding weight of ``module`` (frozen under an adapter) in ``dtype``.

    :meth:`Ctx.einsum` casts weights to the compute dtype anyway, so in bf16 this halves their memory and
    changes no product; embedding lookups come back float32. Norms, biases and adapters stay float32.
    """
    for _, node in nnx.iter_graph(module):
        if isinstance(node, (Linear, Embedding)):
            node.weight.set_value(node.weight.get_value().astype(dtype))


def prepend(prompt: Array | None, h: Array) -> Array:
    """Put the soft prompt ``[P, D]`` in front of every row of ``h [B, L, D]`` (peft's prompt tuning)."""
    if prompt is None:
        return h
    return jnp.concatenate([jnp.broadcast_to(prompt[None], (h.shape[0], *prompt.shape)), h], axis=1)


def attention(q: Array, k: Array, v: Array, allowed: Array, ctx: Ctx, dropout: float) -> Array:
    """Scaled dot-product attention with grouped key/value heads.

    Args:
        q: ``[B, L, H, D]`` queries.
        k, v: ``[B, M, K, D]`` with K dividing H (query head h reads kv head ``h // (H/K)``, as HF's repeat_kv);
            ``M = L`` but for cached keys in front.
        allowed: ``[B, 1, L, M]`` (or broadcastable) booleans, True where a query may attend a key.
        ctx: dtype and dropout key.
        dropout: attention-probability dropout rate while training.

    Returns:
        ``[B, L, H*D]``.
    """
    b, length, heads, dim = q.shape
    rep = heads // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    scores = ctx.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dim)
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = ctx.dropout(jax.nn.softmax(scores, axis=-1), dropout)
    return ctx.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, heads * dim)


def activation(name: str) -> Callable[[Array], Array]:
    """The HF ``hidden_act`` by name."""
    acts: dict[str, Callable[[Array], Array]] = {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
    }
    return acts[check_choice("hidden_act", name, acts)]


def scan_layers(layers: nnx.Module, h: Array, ctx: Ctx, step: Callable[[Any, Array, Ctx], Array]) -> Array:
    """Run stacked ``layers`` over ``h`` with ``lax.scan``: one traced layer, so compile time is flat in depth.

    ``step(layer, h, ctx)`` applies one layer (its parameters sliced off the stack).
    """
    return scan_layers_with(layers, h, ctx, lambda layer, x, c, _: (step(layer, x, c), None), None)[0]


def scan_layers_with(layers: nnx.Module, h: Array, ctx: Ctx, step: Callable[[Any, Array, Ctx, Any], tuple[Array, Any]],
                     xs: Any) -> tuple[Array, Any]:
    """:func:`scan_layers` with per-layer inputs and outputs: ``step(layer, h, ctx, x)`` returns ``(h, y)``, ``x``
    the layer's slice of ``xs`` (a pytree with a leading layer axis, or None); returns ``h`` and the ``y``s stacked."""
    graphdef, state = nnx.split(layers)
    depth = jax.tree.leaves(state)[0].shape[0]

    def body(carry: Array, inputs: tuple[Any, Array, Any]) -> tuple[Array, tuple[list[Array], Any]]:
        layer_state, index, x = inputs
        layer_ctx = ctx.for_layer(index)
        out, y = step(nnx.merge(graphdef, layer_state), carry, layer_ctx, x)
        return out, (layer_ctx.observed, y)  # what the layer observed comes out stacked over layers

    h, (observed, ys) = jax.lax.scan(jax.checkpoint(body) if ctx.remat else body, h, (state, jnp.arange(depth), xs))
    ctx.observed.extend(observed)
    return h, ys
