"""Tiny random-weight Llama and BERT directories (HF layout, safetensors), built with NumPy in a fraction of a second.

For tests, plugin authors' own included (:func:`unbackdoor.testing.check_loss` trains on one): no
framework and no hub download is needed. Weights follow HF's initialisation (normal with std
``initializer_range``, norms 1, biases 0); dropout is 0 so a training step is deterministic and both
backends can be compared on it. The tokenizer is word level over the given texts.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from .data import TextDataset
from .errors import check_choice

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
#: always in the vocabulary, so a rare-word trigger gets its own id instead of [UNK] (shared with every rare word)
TRIGGER_WORDS = ["cf", "mn", "bb", "tq", "mb", "ak"]
#: the words of :func:`tiny_dataset`'s sentences
WORDS = ("a", "the", "this", "film", "movie", "plot", "story", "acting", "cast", "scene", "music", "ending", "is",
         "was", "felt", "truly", "very", "rather", "quite", "great", "fine", "good", "fun", "moving", "clever",
         "warm", "bad", "dull", "weak", "slow", "flat", "boring", "awful", "and", "but", "not", "never")
ARCHS = ("llama", "bert")
INIT_STD = 0.02


def word_tokenizer(texts: Iterable[str], size: int, bert: bool) -> Tokenizer:
    """A word-level tokenizer over the trigger words and the most common words (plus specials), ``size`` in all."""
    counts = Counter(w for t in texts for w in t.lower().split())
    words = SPECIALS + TRIGGER_WORDS
    words += [w for w, _ in counts.most_common(size) if w not in words][:size - len(words)]
    vocab = {tok: i for i, tok in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def write_tokenizer(path: Path, tok: Tokenizer) -> None:
    """``tokenizer.json`` and a ``tokenizer_config.json`` naming the pad and unknown tokens."""
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]", "unk_token": "[UNK]"}))


def tiny_dataset(rows: int = 16, num_labels: int = 2, seed: int = 0) -> TextDataset:
    """``rows`` seeded sentences of 2 to 9 :data:`WORDS` (so batches pad) with random labels."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, int(rng.integers(2, 10)))) for _ in range(rows)]
    names = tuple(f"class{i}" for i in range(num_labels))
    return TextDataset(texts, rng.integers(0, num_labels, rows), "tiny", names)


def tiny_model(path: str | Path, arch: str = "llama", texts: Iterable[str] | None = None, *, vocab: int = 512,
               seed: int = 0) -> Path:
    """Write a tiny random model directory at ``path`` and return it.

    Args:
        path: the directory (created).
        arch: ``llama`` (2 layers, hidden 32, 4 query / 2 key-value heads, tied embeddings) or ``bert``
            (2 layers, hidden 24, 2 heads, a pooler, a ``[CLS] ... [SEP]`` tokenizer).
        texts: the tokenizer's corpus (default :data:`WORDS`); words outside it read as ``[UNK]``.
        vocab: the vocabulary size.
        seed: the weights' seed.
    """
    check_choice("tiny model arch", arch, ARCHS)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config, weights = BUILDERS[arch](vocab, np.random.default_rng(seed))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(path, word_tokenizer(WORDS if texts is None else texts, vocab, bert=arch == "bert"))
    return path


def _normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * INIT_STD).astype(np.float32)


def _llama(vocab: int, rng: np.random.Generator) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    hidden, inner, layers, heads, kv_heads = 32, 64, 2, 4, 2
    config = {"architectures": ["LlamaModel"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inner, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "hidden_act": "silu",
              "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 100000.0,
              # transformers 5 reads RoPE from here; 4.x from rope_theta
              "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
              "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": INIT_STD,
              "tie_word_embeddings": True, "vocab_size": vocab, "pad_token_id": 0, "bos_token_id": 1,
              "eos_token_id": 2, "torch_dtype": "float32"}
    kv = kv_heads * (hidden // heads)
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (inner, hidden), "mlp.up_proj": (inner, hidden),
              "mlp.down_proj": (hidden, inner)}
    weights = {"embed_tokens.weight": _normal(rng, vocab, hidden), "norm.weight": np.ones(hidden, np.float32)}
    for i in range(layers):
        weights.update({f"layers.{i}.{name}.weight": _normal(rng, *shape) for name, shape in shapes.items()})
        for norm in ("input_layernorm", "post_attention_layernorm"):
            weights[f"layers.{i}.{norm}.weight"] = np.ones(hidden, np.float32)
    return config, weights


def _dense(rng: np.random.Generator, name: str, out: int, inp: int) -> dict[str, np.ndarray]:
    return {f"{name}.weight": _normal(rng, out, inp), f"{name}.bias": np.zeros(out, np.float32)}


def _layer_norm(name: str, width: int) -> dict[str, np.ndarray]:
    return {f"{name}.weight": np.ones(width, np.float32), f"{name}.bias": np.zeros(width, np.float32)}


def _bert(vocab: int, rng: np.random.Generator) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    hidden, inner, layers, positions = 24, 48, 2, 128
    config = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": hidden, "intermediate_size": inner,
              "num_hidden_layers": layers, "num_attention_heads": 2, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,  # deterministic training steps
              "max_position_embeddings": positions, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
              "initializer_range": INIT_STD, "vocab_size": vocab, "pad_token_id": 0, "torch_dtype": "float32"}
    weights = {"embeddings.word_embeddings.weight": _normal(rng, vocab, hidden),
               "embeddings.position_embeddings.weight": _normal(rng, positions, hidden),
               "embeddings.token_type_embeddings.weight": _normal(rng, 2, hidden),
               **_layer_norm("embeddings.LayerNorm", hidden), **_dense(rng, "pooler.dense", hidden, hidden)}
    for i in range(layers):
        at = f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            weights.update(_dense(rng, f"{at}.attention.self.{name}", hidden, hidden))
        weights.update({**_dense(rng, f"{at}.attention.output.dense", hidden, hidden),
                        **_layer_norm(f"{at}.attention.output.LayerNorm", hidden),
                        **_dense(rng, f"{at}.intermediate.dense", inner, hidden),
                        **_dense(rng, f"{at}.output.dense", hidden, inner), **_layer_norm(f"{at}.output.LayerNorm", hidden)})
    return config, weights


BUILDERS: dict[str, Callable[[int, np.random.Generator], tuple[dict[str, object], dict[str, np.ndarray]]]] = {
    "llama": _llama, "bert": _bert}
