"""Registers the torch backend through the ``unbackdoor`` entry-point group.

Importing this module must not import torch: the factory is a string.
"""

from __future__ import annotations

from unbackdoor.backend import BackendInfo
from unbackdoor.hookspecs import hookimpl


@hookimpl
def unbackdoor_backends() -> list[BackendInfo]:
    """The torch backend."""
    return [BackendInfo("torch", "PyTorch + transformers + PEFT (CPU or CUDA)", "unbackdoor_torch.backend:TorchBackend",
                        gguf_converter="unbackdoor_torch.convert:convert_gguf")]
