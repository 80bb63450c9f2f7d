"""The JAX + Flax (nnx) + Optax backend of unbackdoor (not implemented yet)."""

__version__ = "0.1.0"
