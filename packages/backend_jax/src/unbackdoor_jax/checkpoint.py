"""HF checkpoints in and out: ``config.json`` + ``*.safetensors`` (read with ``safetensors.numpy``).

Module attributes mirror the HF names, so an nnx parameter path is its HF key
with the layer index taken out (per-layer weights are stacked on a leading
axis). Linear weights stay ``[out, in]``, as HF stores them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from unbackdoor.errors import ConfigError, check_choice
from unbackdoor.layout import HEAD_FILE

from .layers import AdapterParam, Linear

# Task models (LlamaForCausalLM, BertForSequenceClassification...) nest the backbone under these.
BACKBONE_PREFIXES = ("model.", "bert.")
WEIGHTS_FILE = "model.safetensors"


def read_config(path: Path) -> dict[str, Any]:
    """The model's ``config.json``."""
    return dict(json.loads((path / "config.json").read_text()))


#: safetensors' dtype codes as numpy dtypes (bf16 from ml_dtypes, which jax ships; ``safetensors.numpy`` has none)
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}


def load_safetensors(file: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, bf16 included, as read-only views of the memory-mapped file
    (an 8B checkpoint is not read into memory twice; building the model copies what it keeps)."""
    with open(file, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    if not header:
        return {}
    data = np.memmap(file, np.uint8, "r", offset=8 + size)
    out = {}
    for name, info in header.items():
        dtype = np.dtype(SAFETENSORS_DTYPES[check_choice(f"dtype of tensor {name!r} in {file}", info["dtype"],
                                                         SAFETENSORS_DTYPES)]).newbyteorder("<")
        start, end = info["data_offsets"]
        out[name] = data[start:end].view(dtype).reshape(info["shape"])
    return out


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every backbone tensor of a HF directory (all shards, the head file excluded), backbone prefix stripped."""
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(path.glob("*.safetensors")):
        if file.name != HEAD_FILE:
            tensors.update(load_safetensors(file))
    for prefix in BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
            break
    return tensors


class Tensors:
    """A view of checkpoint tensors under a key prefix; in a stacked view ``{i}`` runs over the layers."""

    def __init__(self, arrays: dict[str, np.ndarray], source: str, prefix: str = "", depth: int | None = None) -> None:
        self.arrays, self.source, self.prefix, self.depth = arrays, source, prefix, depth

    def scope(self, name: str) -> Tensors:
        """The tensors under ``name.``."""
        return Tensors(self.arrays, self.source, f"{self.prefix}{name}.", self.depth)

    def stacked(self, name: str, depth: int) -> Tensors:
        """The tensors of layers ``name.0`` ... ``name.{depth-1}``, each ``get`` stacking them."""
        return Tensors(self.arrays, self.source, f"{self.prefix}{name}.{{i}}.", depth)

    def _keys(self, name: str) -> list[str]:
        key = self.prefix + name
        return [key.replace("{i}", str(i)) for i in range(self.depth)] if self.depth else [key]

    def has(self, name: str) -> bool:
        """Whether the checkpoint holds ``name`` (in every layer for a stacked view)."""
        return all(k in self.arrays for k in self._keys(name))

    def get(self, name: str) -> np.ndarray:
        """``name`` as float32 (stacked on axis 0 in a stacked view)."""
        missing = [k for k in self._keys(name) if k not in self.arrays]
        if missing:
            raise ConfigError(f"checkpoint {self.source!r} has no tensor {missing[0]!r}")
        values = [np.asarray(self.arrays[k], np.float32) for k in self._keys(name)]
        return np.stack(values) if self.depth else values[0]


def backbone_tensors(backbone: nnx.Module, stacked: str) -> dict[str, np.ndarray]:
    """The backbone as HF-named arrays, LoRA merged, the ``stacked`` layers split again by index: float32, but
    bf16 where the model holds a frozen weight in bf16 (:func:`~unbackdoor_jax.layers.hold_frozen`), as torch
    saves it (a merged weight is float32)."""
    merged = {path: layer.merged_weight() for path, layer in nnx.iter_graph(backbone)
              if isinstance(layer, Linear) and layer.lora_a is not None}
    out: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(nnx.state(backbone, nnx.All(nnx.Param, nnx.Not(AdapterParam)))):
        value = merged[path[:-1]] if path[-1] == "weight" and path[:-1] in merged else var[...]
        kept = value.dtype if value.dtype == jnp.bfloat16 else np.float32
        out.update(_hf_keys(".".join(map(str, path)), np.asarray(value, kept), stacked))
    return out


def _hf_keys(key: str, value: np.ndarray, stacked: str) -> Iterator[tuple[str, np.ndarray]]:
    if not key.startswith(stacked + "."):
        yield key, np.ascontiguousarray(value)
        return
    rest = key.removeprefix(stacked + ".")
    for i, layer in enumerate(value):
        yield f"{stacked}.{i}.{rest}", np.ascontiguousarray(layer)


def save_backbone(tensors: dict[str, np.ndarray], target: Path) -> None:
    """Write ``model.safetensors`` (HF names, the layout ``save_pretrained`` writes)."""
    save_file(tensors, str(target / WEIGHTS_FILE), metadata={"format": "pt"})


def read_head(path: Path) -> dict[str, np.ndarray]:
    """``head.safetensors`` of a saved classifier (empty for a base model)."""
    file = path / HEAD_FILE
    return {k: np.asarray(v, np.float32) for k, v in load_safetensors(file).items()} if file.is_file() else {}


def save_head(tensors: dict[str, np.ndarray], target: Path) -> None:
    """Write ``head.safetensors`` (``classifier.*``, ``projection.*``; weights ``[out, in]``)."""
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(target / HEAD_FILE))
