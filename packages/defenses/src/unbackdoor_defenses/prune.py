"""``prune``: fine-pruning (Liu, Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against Backdooring
Attacks on Deep Neural Networks", RAID 2018).

Neurons that stay dormant on clean inputs are the ones a backdoor can own: the feed-forward
neurons with the lowest mean activation on the user's clean rows are removed (their weights
zeroed in the saved model, in NumPy: :mod:`unbackdoor.surgery`), then the model is fine-tuned
with LoRA on the clean rows like ``none`` to recover accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unbackdoor.defense import Defense, DefenseContext, DefenseOutcome
from unbackdoor.errors import ConfigError, check_range
from unbackdoor.surgery import dormant_neurons, prune_neurons, read_classifier, write_classifier

from .common import derived_dir, load_or_tune, require_method


@dataclass(frozen=True)
class FinePrune(Defense):
    """Prune the most dormant feed-forward neurons, then fine-tune.

    Attributes:
        prune_ratio: share of each pruned layer's neurons removed, in [0, 1].
        layers: prune the last this many layers (0: every layer).
        finetune: then train the user's LoRA on the clean rows, like ``none``.
        batch_size: rows per forward while measuring activations.
    """

    settings = ("weight",)  # acts on the released model
    name = "prune"
    description = "fine-pruning: zero the feed-forward neurons least active on clean data, then LoRA like 'none'"
    prune_ratio: float = 0.2
    layers: int = 0
    finetune: bool = True
    batch_size: int = 32

    def __post_init__(self) -> None:
        check_range("defense 'prune' option prune_ratio", self.prune_ratio, 0.0, 1.0)
        if self.layers < 0:
            raise ConfigError(f"defense 'prune' option layers must be >= 0 (0: every layer), got {self.layers!r}")
        if self.batch_size < 1:
            raise ConfigError(f"defense 'prune' option batch_size must be >= 1, got {self.batch_size!r}")

    def neurons(self, ctx: DefenseContext) -> dict[int, np.ndarray]:
        """Layer index -> the neurons to prune, from the victim's activations on the clean rows."""
        victim = ctx.backend.load_classifier(ctx.victim_path, ctx.num_labels, seed=ctx.train.seed)
        acts = ctx.backend.mlp_activations(victim, ctx.clean_train, batch_size=self.batch_size,
                                           max_length=ctx.train.max_length)
        return dormant_neurons(acts, self.prune_ratio, self.layers)

    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        require_method(ctx, self.name, "mlp_activations")

        def build(tmp: Path) -> dict[str, Any]:
            chosen = self.neurons(ctx)
            write_classifier(prune_neurons(read_classifier(ctx.victim_path), chosen), ctx.victim_path, tmp)
            return {"pruned": {str(layer): idx.tolist() for layer, idx in chosen.items()}}

        path, made = derived_dir(ctx, self, "pruned", build)
        model, stats = load_or_tune(ctx, path, self.finetune, "prune: LoRA")
        counts = {layer: len(idx) for layer, idx in made["pruned"].items()}
        return DefenseOutcome(model, {**stats, "pruned_per_layer": counts})
