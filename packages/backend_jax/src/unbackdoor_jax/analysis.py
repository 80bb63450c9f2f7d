"""Model analysis for defenses: causal-LM perplexity (ONION) and feed-forward activations (fine-pruning).

Both batch every row with the core's length buckets and the training loop's
padded shapes (:func:`unbackdoor_jax.train.fill_batch`); no Python loop per row.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unbackdoor.batching import iter_batches, num_batches
from unbackdoor.errors import ConfigError
from unbackdoor.models import check_model_dir
from unbackdoor.progress import progress

from . import checkpoint
from .layers import Ctx, Linear
from .llama import Llama
from .lora import merged_copy
from .modeling import SequenceClassifier, load_backbone
from .train import fill_batch

Array = jax.Array


class CausalLM(nnx.Module):
    """A decoder backbone with its LM head (the tied input embeddings unless the checkpoint has ``lm_head``)."""

    def __init__(self, backbone: Llama, lm_head: Any) -> None:
        self.backbone, self.lm_head = backbone, Linear(lm_head)

    def __call__(self, input_ids: Array, attention_mask: Array, ctx: Ctx) -> Array:
        """Next-token logits ``[B, L, V]``."""
        return self.lm_head(self.backbone(input_ids, attention_mask, ctx)[0], ctx)


def load_causal_lm(path: Path) -> CausalLM:
    """The causal LM of a HF decoder directory (safetensors only)."""
    path = check_model_dir(Path(path))
    backbone, config = load_backbone(path)
    if not isinstance(backbone, Llama):
        raise ConfigError(f"{path} is a {config.get('model_type')!r} model, not a causal LM (llama, mistral, qwen2)")
    if config.get("tie_word_embeddings", False):  # the Llama-family default is untied, as in transformers
        return CausalLM(backbone, backbone.embed_tokens.weight[...])
    head = checkpoint.Tensors(checkpoint.read_tensors(path), str(path))
    return CausalLM(backbone, head.get("lm_head.weight"))


@partial(jax.jit, static_argnames=("graphdef", "dtype"))
def _token_nll(graphdef: Any, state: Any, input_ids: Array, attention_mask: Array, dtype: Any) -> Array:
    """Mean NLL of each row's real tokens after the first (position t predicts t + 1) ``[B]``; NaN if none."""
    logits = nnx.merge(graphdef, state)(input_ids, attention_mask, Ctx(dtype)).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    weight = attention_mask[:, 1:].astype(jnp.float32)
    return (nll * weight).sum(-1) / weight.sum(-1)


def lm_nll(model: CausalLM, ids: list[np.ndarray], pad_id: int, batch_size: int, dtype: Any,
           desc: str = "lm nll") -> np.ndarray:
    """Mean next-token NLL of each id row (start token first) ``[N]``; NaN for rows with one token or none."""
    out = np.full(len(ids), np.nan, np.float32)
    lengths = np.array([len(x) for x in ids])
    scored = np.flatnonzero(lengths > 0)  # an empty row has nothing to feed the model
    graphdef, state = nnx.split(model)
    rows = min(batch_size, max(len(scored), 1))
    for batch in progress(iter_batches([ids[i] for i in scored], pad_id, batch_size), desc,
                          num_batches(len(scored), batch_size)):
        full = fill_batch(batch, rows, int(lengths.max()), pad_id)
        nll = _token_nll(graphdef, state, jnp.asarray(full["input_ids"]), jnp.asarray(full["attention_mask"]), dtype)
        out[scored[batch["index"]]] = np.asarray(nll)[: len(batch["index"])]
    return out


@partial(jax.jit, static_argnames=("graphdef", "dtype"))
def _ffn_sums(graphdef: Any, state: Any, input_ids: Array, attention_mask: Array, weight: Array,
              dtype: Any) -> tuple[Array, Array]:
    """Per layer, ``sum over real tokens of |neuron|`` ``[layers, I]``, and the number of real tokens."""
    model = nnx.merge(graphdef, state)
    token_mask = attention_mask.astype(jnp.float32)
    if model.prompt is not None:  # a soft prompt's virtual tokens sit in front and count as real (as in torch)
        token_mask = jnp.concatenate([jnp.ones((len(token_mask), model.prompt.shape[0])), token_mask], axis=1)
    ctx = Ctx(dtype, token_mask=token_mask * weight[:, None])  # filler rows count for nothing
    model(input_ids, attention_mask, ctx)
    return ctx.observed[0], ctx.token_mask.sum()


def mlp_activations(module: SequenceClassifier, batches: list[dict[str, np.ndarray]], rows: int, max_length: int,
                    pad_id: int, dtype: Any, desc: str = "ffn activations") -> list[np.ndarray]:
    """Mean ``|input|`` of each feed-forward output layer over the real tokens of ``batches``, per layer."""
    graphdef, state = nnx.split(merged_copy(module))
    sums, tokens = 0.0, 0.0
    for batch in progress(batches, desc, len(batches)):
        full = {k: jnp.asarray(v) for k, v in fill_batch(batch, rows, max_length, pad_id).items()}
        layer_sums, count = _ffn_sums(graphdef, state, full["input_ids"], full["attention_mask"], full["weight"], dtype)
        sums, tokens = sums + np.asarray(layer_sums, np.float64), tokens + float(count)
    return [np.asarray(s / tokens, np.float32) for s in np.atleast_2d(sums)]
