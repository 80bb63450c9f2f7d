"""Tiny random-config BERT and Llama directories (HF layout), built in seconds for tests.

The tokenizer is a word-level ``tokenizer.json`` over the given texts (the core's
:mod:`unbackdoor.tinymodels` helpers), so the models never need a hub download.
These are built with transformers' own initialisation; :func:`unbackdoor.testing.tiny_model`
builds the same shapes with NumPy alone (for plugin authors, and :func:`~unbackdoor.testing.check_loss`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from unbackdoor.tinymodels import word_tokenizer, write_tokenizer


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
    write_tokenizer(path, word_tokenizer(texts, vocab, bert=False))
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
    write_tokenizer(path, word_tokenizer(texts, vocab, bert=True))
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
