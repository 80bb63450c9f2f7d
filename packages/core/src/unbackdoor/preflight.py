"""What a run checks before any training, and the record that lets ``unbackdoor run --resume`` find it again.

Before the first stage: the output and cache directories must be usable directories (resolved; an
existing file there is an error), the student and teacher (when a chosen defense distils from one)
must be loadable safetensors model directories, and the LoRA targets must name linear layers of the
student (``auto`` becomes its family's attention projections there). A bad input thus fails in
seconds with one line and leaves nothing behind.

Once those checks pass, ``<out>/run.json`` records the run's full config. Every stage is cached under a
hash of its own config (:mod:`unbackdoor.cache`), so rerunning the same config skips the finished stages;
``--resume`` (:func:`resume_config`) reads that record, so a killed run restarts with
``unbackdoor run --resume --out DIR`` without repeating its flags. A stage killed part-way restarts from
its beginning (stage-level resume: there are no mid-stage checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from .cache import atomic_write_json, default_cache_dir
from .config import ExperimentConfig
from .errors import ConfigError, UnbackdoorError
from .models import resolve_model
from .paths import output_dir, user_path
from .specs import resolve_targets
from .surgery import linear_layers
from .text import TextEncoder

RUN_FILE = "run.json"


def check_run_inputs(cfg: ExperimentConfig, uses_teacher: bool = True) -> tuple[ExperimentConfig, Path, Path]:
    """The config with concrete LoRA targets, and the resolved output and cache directories, after
    checking them and the models (raises ConfigError); ``uses_teacher=False`` (no chosen defense distils
    from one) leaves the teacher unchecked."""
    out = output_dir("output directory (out)", cfg.out)
    cache = output_dir("cache directory (cache_dir)", cfg.cache_dir or default_cache_dir())
    if cache == out:
        raise ConfigError(f"out and cache_dir are the same directory {str(out)!r}; give each its own")
    for role, model in (("model", cfg.model), ("teacher", cfg.teacher if uses_teacher else "")):
        if model or role == "model":  # an empty teacher means none
            try:
                path = resolve_model(model, cache)
                TextEncoder.from_dir(path)
                if role == "model":  # the user's LoRA adapts the model: its layers decide what auto means
                    targets = resolve_targets(cfg.lora_targets, linear_layers(path), "lora_targets (--lora-targets)")
                    cfg = dataclasses.replace(cfg, lora_targets=targets)
            except UnbackdoorError as exc:
                raise ConfigError(f"{role}: {exc}") from None
    return cfg, out, cache


def record_run(cfg: ExperimentConfig, out: Path) -> None:
    """Write ``<out>/run.json``: the config a later ``--resume`` reruns."""
    atomic_write_json(out / RUN_FILE, {"config": cfg.to_dict(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")})


def resume_config(out: str | Path) -> dict[str, Any]:
    """The config recorded in ``<out>/run.json`` (a ConfigError when there is no run to resume there)."""
    file = user_path("output directory (out)", out) / RUN_FILE
    if not file.is_file():
        raise ConfigError(f"nothing to resume: {str(file)!r} does not exist (pass the --out of the run to resume)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))["config"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot resume from {str(file)!r}: it is not a run record ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"cannot resume from {str(file)!r}: its 'config' is not a table")
    return config
