"""Weight surgery on saved classifiers, in NumPy, shared by every backend.

Defenses that edit weights (quantization, merging, pruning) read a classifier
directory (:mod:`unbackdoor.layout`: HF backbone safetensors + ``head.safetensors``
+ ``unbackdoor.json``), change the arrays here and write a new directory with the
same layout, which any backend then loads. Linear weights are HF's ``[out, in]``.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .errors import ConfigError, check_range
from .layout import HEAD_FILE

WEIGHTS_FILE = "model.safetensors"
#: files of a source directory that are not copied (the weights are rewritten)
SKIPPED_FILES = ("model.safetensors.index.json", "_config.json")
#: 2-D ``*.weight`` tensors whose name contains one of these are not linear layers
NOT_LINEAR = ("embed", "norm", "wte", "wpe")
Arrays = dict[str, np.ndarray]


@dataclass
class ClassifierWeights:
    """The tensors of a classifier directory.

    Attributes:
        backbone: HF backbone tensors by name (all ``*.safetensors`` shards but the head).
        head: ``head.safetensors`` tensors (empty for a base model without a head).
        metadata: the backbone file's safetensors metadata (``{"format": "pt"}`` for HF).
    """

    backbone: Arrays
    head: Arrays = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def map(self, fn: Callable[[str, np.ndarray], np.ndarray], *, head: bool = False) -> ClassifierWeights:
        """A copy with ``fn(name, array)`` applied to each backbone tensor (and head tensor when ``head``)."""
        new_head = {k: fn(k, v) for k, v in self.head.items()} if head else dict(self.head)
        return ClassifierWeights({k: fn(k, v) for k, v in self.backbone.items()}, new_head, dict(self.metadata))


def read_classifier(path: str | Path) -> ClassifierWeights:
    """Every tensor of a classifier (or base model) directory as float arrays."""
    path = Path(path)
    files = sorted(p for p in path.glob("*.safetensors") if p.name != HEAD_FILE)
    if not files:
        raise ConfigError(f"model directory {str(path)!r} has no .safetensors weights")
    backbone: Arrays = {}
    metadata: dict[str, str] = {}
    for file in files:
        tensors, meta = _read_file(file)
        backbone.update(tensors)
        metadata.update(meta)
    head = _read_file(path / HEAD_FILE)[0] if (path / HEAD_FILE).is_file() else {}
    return ClassifierWeights(backbone, head, metadata)


def _read_file(file: Path) -> tuple[Arrays, dict[str, str]]:
    try:
        with safe_open(str(file), framework="np") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118
    except TypeError as exc:  # numpy has no bfloat16
        raise ConfigError(f"{str(file)!r} holds a dtype NumPy cannot read ({exc}); save the model in float32") from None


def write_classifier(weights: ClassifierWeights, source: str | Path, target: str | Path) -> Path:
    """Write ``weights`` to ``target`` with ``source``'s config, tokenizer and head meta (same layout)."""
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name not in SKIPPED_FILES:
            shutil.copy(item, target / item.name)
    save_file(_contiguous(weights.backbone), str(target / WEIGHTS_FILE), metadata=weights.metadata or {"format": "pt"})
    if weights.head:
        save_file(_contiguous(weights.head), str(target / HEAD_FILE))
    return target


def _contiguous(arrays: Mapping[str, np.ndarray]) -> Arrays:
    return {k: np.ascontiguousarray(v) for k, v in arrays.items()}


# -------------------------------------------------------------------------------------------- quantization


def is_linear_weight(name: str, array: np.ndarray) -> bool:
    """A 2-D ``*.weight`` that is not an embedding or a norm: the weight of a linear layer ``[out, in]``."""
    return _is_linear(name, array.shape)


def _is_linear(name: str, shape: tuple[int, ...] | list[int]) -> bool:
    return len(shape) == 2 and name.endswith(".weight") and not any(part in name for part in NOT_LINEAR)


def linear_layers(path: str | Path) -> list[str]:
    """Dotted paths of a model directory's linear layers (backbone only), read from the safetensors
    headers: no tensor is loaded."""
    paths: list[str] = []
    for file in sorted(p for p in Path(path).glob("*.safetensors") if p.name != HEAD_FILE):
        with safe_open(str(file), framework="np") as handle:
            paths += [k.removesuffix(".weight") for k in handle.keys()  # noqa: SIM118
                      if _is_linear(k, handle.get_slice(k).get_shape())]
    return paths


def check_quantization(bits: int, group_size: int) -> None:
    """Raise :class:`ConfigError` unless ``2 <= bits <= 8`` and ``group_size >= 1``."""
    if not 2 <= bits <= 8:
        raise ConfigError(f"quantization bits must be in 2..8, got {bits!r}")
    if group_size < 1:
        raise ConfigError(f"quantization group_size must be >= 1 (e.g. 32, 64, 128), got {group_size!r}")


def _grouped(w: np.ndarray, group_size: int) -> np.ndarray:
    """``[out, in]`` -> ``[out, groups, group_size]``; a short last group is padded with its edge value.

    Edge padding leaves each group's min, max and absolute max unchanged.
    """
    out, width = w.shape
    pad = -width % group_size
    padded = np.pad(w, ((0, 0), (0, pad)), mode="edge") if pad else w
    return padded.reshape(out, -1, group_size)


def group_scales(w: np.ndarray, *, bits: int = 4, group_size: int = 128, symmetric: bool = True) -> np.ndarray:
    """The quantization step of each group of ``w [out, in]``: ``[out, ceil(in / group_size)]``.

    Symmetric: ``absmax / (2^(bits-1) - 1)``; asymmetric: ``(max - min) / (2^bits - 1)``.
    The round-trip error of every weight is at most half its group's step.
    """
    check_quantization(bits, group_size)
    return _scales(_grouped(np.asarray(w, np.float64), group_size), bits, symmetric)


def _scales(g: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    if symmetric:
        return np.abs(g).max(-1) / (2 ** (bits - 1) - 1)  # type: ignore[no-any-return]
    return (g.max(-1) - g.min(-1)) / (2**bits - 1)  # type: ignore[no-any-return]


def quantize_dequantize(w: np.ndarray, *, bits: int = 4, group_size: int = 128, symmetric: bool = True) -> np.ndarray:
    """Round ``w [out, in]`` to ``bits``-bit integers per group of ``group_size`` inputs and back.

    Symmetric (llama.cpp Q4_0-like): ``q = round(w / s)`` in ``[-(2^(b-1)-1), 2^(b-1)-1]``, ``w' = q * s``.
    Asymmetric (Q4_1-like): ``q = round((w - min) / s)`` in ``[0, 2^b - 1]``, ``w' = q * s + min``.
    The scale (and min) stay in float; constant groups come back exactly. Same dtype as ``w``.
    """
    check_quantization(bits, group_size)
    g = _grouped(np.asarray(w, np.float64), group_size)
    scale = _scales(g, bits, symmetric)[..., None]
    safe = np.where(scale > 0, scale, 1.0)
    if symmetric:
        top = 2 ** (bits - 1) - 1
        deq = np.clip(np.round(g / safe), -top, top) * scale
    else:
        low = g.min(-1, keepdims=True)
        deq = np.clip(np.round((g - low) / safe), 0, 2**bits - 1) * scale + low
    return deq.reshape(w.shape[0], -1)[:, : w.shape[1]].astype(w.dtype)


def quantize_weights(weights: ClassifierWeights, *, bits: int = 4, group_size: int = 128,
                     symmetric: bool = True) -> tuple[ClassifierWeights, list[str]]:
    """Quantize-dequantize every linear weight of the backbone; returns the new weights and the names changed.

    Embeddings, norms, biases and the classification head stay in full precision (weight-only
    quantization, as deployed INT4 checkpoints keep them).
    """
    check_quantization(bits, group_size)
    changed: list[str] = []

    def one(name: str, array: np.ndarray) -> np.ndarray:
        if not is_linear_weight(name, array):
            return array
        changed.append(name)
        return quantize_dequantize(array, bits=bits, group_size=group_size, symmetric=symmetric)

    return weights.map(one), changed


# -------------------------------------------------------------------------------------------- merging


def merge_weights(first: ClassifierWeights, second: ClassifierWeights, weight: float) -> ClassifierWeights:
    """``weight * first + (1 - weight) * second`` for every backbone and head tensor (names and shapes must match).

    Backbone names are compared without a task prefix (``model.``, ``bert.``...), so a base HF
    checkpoint merges with a saved classifier; the result uses ``first``'s names. When ``second``
    has no head (a base model), ``first``'s head is kept as it is.
    """
    check_range("merge weight", weight, 0.0, 1.0)
    other = _aligned(first.backbone, second.backbone, "backbone")
    head = _aligned(first.head, second.head, "head") if second.head else first.head

    def mix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (weight * a.astype(np.float64) + (1 - weight) * b.astype(np.float64)).astype(a.dtype)

    backbone = {k: mix(v, other[k]) for k, v in first.backbone.items()}
    return ClassifierWeights(backbone, {k: mix(v, head[k]) for k, v in first.head.items()}, dict(first.metadata))


TASK_PREFIXES = ("model.", "bert.", "roberta.", "base_model.")


def _strip(name: str) -> str:
    for prefix in TASK_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _aligned(first: Arrays, second: Arrays, what: str) -> Arrays:
    """``second``'s tensors under ``first``'s names; a clear error on any missing name or shape mismatch."""
    by_name = {_strip(k): v for k, v in second.items()}
    out: Arrays = {}
    for name, array in first.items():
        match = by_name.get(_strip(name))
        if match is None:
            raise ConfigError(f"cannot merge: the other model's {what} has no tensor {name!r}")
        if match.shape != array.shape:
            raise ConfigError(f"cannot merge {what} tensor {name!r}: shapes {array.shape} and {match.shape} differ")
        out[name] = match
    return out


# -------------------------------------------------------------------------------------------- pruning

_LLAMA = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_BERT = re.compile(r"(?:^|\.)layer\.(\d+)\.(intermediate|output)\.dense\.(weight|bias)$")


@dataclass
class FFNLayer:
    """The tensors that hold one layer's feed-forward neurons.

    Attributes:
        rows: tensors whose entry (row, or element for a bias) ``j`` belongs to neuron ``j``
            (``gate_proj``, ``up_proj``; BERT ``intermediate.dense`` weight and bias).
        columns: tensors whose column ``j`` reads neuron ``j`` (``down_proj``; BERT ``output.dense``).
    """

    rows: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)


def ffn_layers(names: list[str] | tuple[str, ...] | Mapping[str, object]) -> dict[int, FFNLayer]:
    """Each layer's feed-forward tensors by layer index, from HF names (Llama family or BERT family)."""
    layers: dict[int, FFNLayer] = {}
    for name in names:
        if m := _LLAMA.search(name):
            layer = layers.setdefault(int(m[1]), FFNLayer())
            (layer.columns if m[2] == "down_proj" else layer.rows).append(name)
        elif m := _BERT.search(name):
            layer = layers.setdefault(int(m[1]), FFNLayer())
            if m[2] == "intermediate":
                layer.rows.append(name)
            elif m[3] == "weight":  # output.dense.bias is per hidden unit, not per neuron
                layer.columns.append(name)
    return dict(sorted(layers.items()))


def dormant_neurons(activations: list[np.ndarray], ratio: float, layers: int = 0) -> dict[int, np.ndarray]:
    """The ``round(ratio * width)`` least active neurons of each of the last ``layers`` layers (0: all).

    Args:
        activations: per layer, mean ``|activation|`` of each neuron ``[intermediate_size]``.
        ratio: share of each chosen layer's neurons to prune, in [0, 1].
        layers: how many of the last layers to prune (0 or more than there are: every layer).

    Returns:
        layer index -> sorted neuron indices (ties broken by index, so the choice is deterministic).
    """
    check_range("prune_ratio", ratio, 0.0, 1.0)
    if layers < 0:
        raise ConfigError(f"prune layers must be >= 0 (0: every layer), got {layers!r}")
    first = 0 if layers == 0 else max(0, len(activations) - layers)
    chosen = {}
    for i in range(first, len(activations)):
        act = np.asarray(activations[i])
        count = round(ratio * len(act))
        chosen[i] = np.sort(np.argsort(act, kind="stable")[:count])
    return chosen


def prune_neurons(weights: ClassifierWeights, neurons: Mapping[int, np.ndarray]) -> ClassifierWeights:
    """Zero every weight of the given feed-forward neurons (their rows in and their columns out)."""
    layers = ffn_layers(weights.backbone)
    missing = sorted(set(neurons) - set(layers))
    if missing:
        raise ConfigError(f"cannot prune layer {missing[0]}: no feed-forward weights found for it "
                          f"(recognised layers: {sorted(layers) or 'none; a Llama- or BERT-style model is needed'})")
    backbone = dict(weights.backbone)
    for index, chosen in neurons.items():
        idx = np.asarray(chosen, np.int64)
        for name in layers[index].rows:
            backbone[name] = backbone[name].copy()
            backbone[name][idx] = 0
        for name in layers[index].columns:
            backbone[name] = backbone[name].copy()
            backbone[name][:, idx] = 0
    return ClassifierWeights(backbone, dict(weights.head), dict(weights.metadata))
