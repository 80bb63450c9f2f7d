"""The JAX + Flax (nnx) + Optax backend of unbackdoor: own nnx BERT and Llama, LoRA, jitted fused steps."""

__version__ = "0.1.0"
