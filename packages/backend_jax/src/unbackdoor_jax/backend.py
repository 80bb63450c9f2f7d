"""Placeholder until the JAX backend lands: selecting it fails with a clear message."""

from __future__ import annotations

from unbackdoor.errors import BackendUnavailableError


def JaxBackend() -> None:  # noqa: N802 - stands where the backend class will be
    """Raise: the JAX backend is not implemented yet."""
    raise BackendUnavailableError("backend 'jax' is not implemented yet; use --backend torch")
