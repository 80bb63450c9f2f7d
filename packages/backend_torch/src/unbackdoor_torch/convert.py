"""Convert a GGUF checkpoint once into an fp32 safetensors HF directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def convert_gguf(gguf_file: Path, target: Path) -> None:
    """Dequantise ``gguf_file`` with transformers and save model + tokenizer to ``target`` atomically.

    transformers undoes llama.cpp's q/k permutation, so the result uses HF's
    ``rotate_half`` RoPE layout that both backends read.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    print(f"converting {gguf_file} to fp32 safetensors in {target} (once, ~20 s)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantised already; save them as plain fp32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
