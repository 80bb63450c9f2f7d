"""Registers the jax backend; selecting it imports :mod:`unbackdoor_jax.backend` (and so jax), never torch."""

from __future__ import annotations

from unbackdoor.backend import BackendInfo
from unbackdoor.hookspecs import hookimpl


@hookimpl
def unbackdoor_backends() -> list[BackendInfo]:
    """The jax backend."""
    return [BackendInfo("jax", "JAX + Flax nnx + Optax (CPU, GPU or TPU; jit-compiled steps)",
                        "unbackdoor_jax.backend:JaxBackend")]
