"""Tiny random-config BERT and Llama directories (HF layout), built in seconds for tests.

The tokenizer is a word-level ``tokenizer.json`` over the given texts, so the
models never need a hub download.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
#: always in the vocabulary, so a rare-word trigger gets its own id instead of [UNK] (shared with every rare word)
TRIGGER_WORDS = ["cf", "mn", "bb", "tq", "mb", "ak"]


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


def _write_tokenizer(path: Path, tok: Tokenizer) -> None:
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]", "unk_token": "[UNK]"}))


def make_tiny_llama(path: Path, texts: Iterable[str], vocab: int = 512, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32, GQA 4/2 heads) with a word-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=100000.0, tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(seed)
    LlamaModel(config).save_pretrained(path)
    _write_tokenizer(path, word_tokenizer(texts, vocab, bert=False))
    return path


def make_tiny_bert(path: Path, texts: Iterable[str], vocab: int = 512, seed: int = 0) -> Path:
    """A 2-layer BERT (hidden 24) with a pooler and a [CLS] ... [SEP] word-level tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    path.mkdir(parents=True, exist_ok=True)
    config = BertConfig(vocab_size=vocab, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)
    _write_tokenizer(path, word_tokenizer(texts, vocab, bert=True))
    return path


def moved_copy(source: Path, target: Path, seed: int) -> float:
    """``source`` with N(0, 0.01) added to every weight, written to ``target`` (a model that moved away from
    ``source``); returns the L2 norm added, ``||theta_target - theta_source||_2``."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, target)
    rng = np.random.default_rng(seed)
    tensors = load_file(str(source / "model.safetensors"))
    noise = {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in tensors.items()}
    save_file({k: v + noise[k] for k, v in tensors.items()}, str(target / "model.safetensors"), metadata={"format": "pt"})
    return float(np.sqrt(sum(np.square(n.astype(np.float64)).sum() for n in noise.values())))
