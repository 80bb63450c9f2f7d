"""``quantize``: weight-only INT4 group-wise quantization of the released model (a baseline).

Rounding every linear weight to a few bits moves it by up to half a quantization step, which may or
may not disturb a planted backdoor (quantization can even be the trigger: Egashira et al., "Exploiting
LLM Quantization", NeurIPS 2024). Groups of 128 inputs share a scale, as in GPTQ/AWQ INT4 checkpoints.
The round trip is done once in NumPy (:mod:`unbackdoor.surgery`), so every backend evaluates the same
weights; the model is then optionally fine-tuned with LoRA like ``none``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unbackdoor.defense import Defense, DefenseContext, DefenseOutcome
from unbackdoor.surgery import check_quantization, quantize_weights, read_classifier, write_classifier

from .common import derived_dir, load_or_tune


@dataclass(frozen=True)
class Quantize(Defense):
    """Quantize-dequantize every linear weight (embeddings, norms, biases and the head stay fp32).

    Attributes:
        bits: integer width, 2..8 (4: INT4).
        group_size: inputs sharing one scale (>= 1; 128 as in GPTQ/AWQ checkpoints).
        symmetric: zero-centred scale (Q4_0-like) or min/max scale with an offset (Q4_1-like).
        finetune: then train the user's LoRA on the clean rows, like ``none``.
    """

    settings = ("weight",)  # acts on the released model
    name = "quantize"
    description = "weight-only INT4 group-wise quantize-dequantize of the released model, then LoRA like 'none'"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    finetune: bool = True

    def __post_init__(self) -> None:
        check_quantization(self.bits, self.group_size)

    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        def build(tmp: Path) -> dict[str, Any]:
            weights, names = quantize_weights(read_classifier(ctx.victim_path), bits=self.bits,
                                              group_size=self.group_size, symmetric=self.symmetric)
            write_classifier(weights, ctx.victim_path, tmp)
            return {"quantized_tensors": len(names)}

        path, made = derived_dir(ctx, self, "quantized", build)
        model, stats = load_or_tune(ctx, path, self.finetune, "quantize: LoRA")
        return DefenseOutcome(model, {**stats, **made})
