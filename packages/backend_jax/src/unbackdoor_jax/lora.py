"""LoRA for the nnx backbones, with peft's conventions (targets, init, scaling, names).

An adapted :class:`~unbackdoor_jax.layers.Linear` computes
``W x + b + (alpha / r) * B A dropout(x)``; A starts ``U(+-1/sqrt(in))``
(peft's ``kaiming_uniform_(a=sqrt(5))``, drawn by :func:`unbackdoor.initial.lora_a`
so both backends start alike), B at zero, so the model's outputs
are unchanged until it trains. Training then updates only the
:class:`~unbackdoor_jax.layers.LoRAParam` matrices and the head.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unbackdoor import initial
from unbackdoor.errors import ConfigError
from unbackdoor.specs import LoRASpec

from .layers import Linear, LoRAParam


def linear_layers(backbone: nnx.Module) -> Iterator[tuple[str, Linear]]:
    """``(dotted path, layer)`` of every linear layer in the backbone (paths without layer indices)."""
    for path, node in nnx.iter_graph(backbone):
        if isinstance(node, Linear):
            yield ".".join(map(str, path)), node


def add_lora(backbone: nnx.Module, spec: LoRASpec, seed: int) -> list[str]:
    """Attach seeded adapters to the targeted linear layers; returns their paths."""
    layers = dict(linear_layers(backbone))
    chosen = spec.chosen(layers)
    if any(layer.lora_a is not None for layer in layers.values()):
        raise ConfigError("the model already has a LoRA adapter")
    stacked = str(type(backbone).STACKED)
    for name in chosen:  # core's numpy draws, per peft name: the torch backend starts from the same A
        layer = layers[name]
        keys = _peft_keys(name, stacked, layer)
        a = np.stack([initial.lora_a(key, spec.rank, layer.weight.shape[-1], seed) for key in keys])
        layer.add_lora(a.reshape(*layer.weight.shape[:-2], spec.rank, -1), spec.alpha, spec.dropout)
    return chosen


def merged_copy(module: nnx.Module) -> nnx.Module:
    """A copy with every adapter folded into its weight (``module`` unchanged).

    Its structure equals the plain model's, so inference reuses the plain
    model's compiled forward instead of compiling one per adapter layout.
    """
    if not has_lora(module):
        return module
    copy = nnx.clone(module)
    for _, layer in linear_layers(copy):
        if layer.lora_a is not None:
            layer.merge_lora()
    return copy


class Anchor(nnx.Variable):  # type: ignore[misc]
    """Base weights a fully trained backbone's distance is measured from (never trained)."""


def anchor(backbone: nnx.Module, base: nnx.Module, source: str) -> None:
    """Record ``base``'s parameters (the same architecture, read from ``source``) on ``backbone``, so
    :func:`delta_norm` is ``||theta - theta_base||_2`` over every backbone parameter (full-parameter unlearning)."""
    if has_lora(backbone):
        raise ConfigError("a backbone with LoRA measures its distance by the adapter; anchor it before adding LoRA")
    own, ref = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (backbone, base))
    shapes = [jax.tree.map(jnp.shape, tree) for tree in (own, ref)]
    if shapes[0] != shapes[1]:
        raise ConfigError(f"the anchor {source!r} does not have the model's parameters and shapes")
    backbone.anchor = Anchor(jax.tree.map(jnp.asarray, ref))


def delta_norm(backbone: nnx.Module) -> jax.Array:
    """The L2 distance the weights moved: ``sqrt(sum_layers ||scaling * B A||_F^2)`` with LoRA, else from the
    :func:`anchor` if any, else 0.

    Uses ``||B A||_F^2 = sum((B^T B) * (A A^T))`` per (stacked) layer, two ``r x r`` Gram matrices instead
    of the ``out x in`` product; the gradient at a zero norm (LoRA's init, B = 0) is taken as 0.
    """
    sq, adapted = jnp.zeros((), jnp.float32), False
    for _, layer in linear_layers(backbone):
        if layer.lora_a is not None:
            a, b = layer.lora_a[...], layer.lora_b[...]
            grams = jnp.einsum("...or,...os->...rs", b, b) * jnp.einsum("...ri,...si->...rs", a, a)
            sq, adapted = sq + layer.scaling ** 2 * grams.sum(), True
    base = getattr(backbone, "anchor", None)
    if base is not None and not adapted:
        own = nnx.to_pure_dict(nnx.state(backbone, nnx.Param))
        sq = sq + sum(jax.tree.leaves(jax.tree.map(lambda w, w0: jnp.square(w - w0).sum(), own, base.get_value())))
    return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def has_lora(module: nnx.Module) -> bool:
    """Whether any LoRA matrix is attached."""
    return bool(jax.tree.leaves(nnx.state(module, LoRAParam)))


def _peft_keys(name: str, stacked: str, layer: Linear) -> list[str]:
    """peft's key prefixes for one (possibly stacked) layer: ``backbone.layers.0.self_attn.q_proj`` ..."""
    if not name.startswith(stacked + "."):
        return [f"backbone.{name}"]
    rest = name.removeprefix(stacked + ".")
    return [f"backbone.{stacked}.{i}.{rest}" for i in range(layer.weight.shape[0])]


def export_adapter(backbone: nnx.Module, stacked: str) -> dict[str, np.ndarray]:
    """Adapter weights as numpy under peft-style names (``...q_proj.lora_A.weight`` ``[r, in]``, ``lora_B`` ``[out, r]``)."""
    out: dict[str, np.ndarray] = {}
    for name, layer in linear_layers(backbone):
        if layer.lora_a is None:
            continue
        a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
        stacks = (a, b) if a.ndim == 3 else (a[None], b[None])
        for i, key in enumerate(_peft_keys(name, stacked, layer)):
            out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = stacks[0][i], stacks[1][i]
    return out


def import_adapter(backbone: nnx.Module, stacked: str, arrays: dict[str, np.ndarray]) -> None:
    """Set the adapter weights from :func:`export_adapter`'s names (every adapted layer must be present)."""
    for name, layer in linear_layers(backbone):
        if layer.lora_a is None:
            continue
        keys = _peft_keys(name, stacked, layer)
        for attr, suffix in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            missing = [k for k in keys if f"{k}.{suffix}.weight" not in arrays]
            if missing:
                raise KeyError(f"adapter arrays lack {missing[0]}.{suffix}.weight")
            values = np.stack([arrays[f"{k}.{suffix}.weight"] for k in keys])
            var = getattr(layer, attr)
            var[...] = jnp.asarray(values.reshape(var.shape), jnp.float32)
