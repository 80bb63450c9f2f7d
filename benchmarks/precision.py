"""fp32 vs bf16 on the real SmolLM2-135M: step time and memory of a LoRA step and of the fused W2S step, both
backends (``step_time.py``'s steps).

The setting is W2SDefense's released one (``--config w2s-paper``): LoRA r=512, alpha 512 on q_proj/v_proj,
batch 32 x 128 tokens of packed SST-2 rows (no padding), the released objective's weights for the W2S step
(5 CE + 0.001 KD + 0.001 A, pooled alignment here: the step's cost barely depends on the alignment), random
teacher outputs. Every case runs in its own process, so each peak is its own: ``weights_mb`` is what the
model's parameters hold (bf16: the frozen base in bf16), ``peak_mb`` the host's peak resident memory over the
timed steps (Linux ``VmHWM``, reset after set-up), which includes the activations, gradients, AdamW state and
the framework's own buffers.

Run: ``python benchmarks/precision.py [--case BACKEND PRECISION STEP]``; ``run.py precision`` runs it before
the suite's experiments (the default experiment in fp32 and in bf16 on each backend).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from step_time import jax_steps, packed_batch, torch_steps

from unbackdoor.errors import check_choice
from unbackdoor.models import resolve_model
from unbackdoor.specs import CrossEntropy, LoRASpec, W2SLoss
from unbackdoor.text import TextEncoder

ROWS, LENGTH, WARMUP, STEPS = 32, 128, 2, 4
LORA = LoRASpec(512, 512.0, 0.0, ("q_proj", "v_proj"))
STEPS_BY_NAME = {"lora": CrossEntropy(), "w2s": W2SLoss(5.0, 0.001, 0.001, 2.0)}
BACKENDS, PRECISIONS = ("torch", "jax"), ("fp32", "bf16")
SETTING = (f"SmolLM2-135M, LoRA r={LORA.rank} alpha {LORA.alpha:g} on q_proj/v_proj (dropout 0 so the steps "
           f"compare), batch {ROWS} x {LENGTH} tokens of packed SST-2 rows; `lora`: cross-entropy, `w2s`: the fused "
           f"step 5 CE + 0.001 KD(T=2) + 0.001 A; {WARMUP} warm-up steps, median of {STEPS} timed steps")


def case(backend: str, precision: str, step: str, cache: Path | None = None) -> dict[str, Any]:
    """One measurement in this process."""
    loss = STEPS_BY_NAME[check_choice("step", step, STEPS_BY_NAME)]
    path = resolve_model("smollm2-135m", cache)
    width = json.loads((path / "config.json").read_text())["hidden_size"]
    batch = packed_batch(TextEncoder.from_dir(path), width, ROWS, LENGTH)
    timed = torch_steps if check_choice("backend", backend, BACKENDS) == "torch" else jax_steps
    kw = {"device": "cpu"} if backend == "torch" else {}
    out = timed(path, batch, check_choice("precision", precision, PRECISIONS), warmup=WARMUP, steps=STEPS, loss=loss,
                lora=LORA, **kw)
    return {"backend": backend, "precision": precision, "step": step, **out,
            "samples_per_s": ROWS / out["step_s"]}


def measure(cache: Path | None = None) -> dict[str, Any]:
    """Every case, each in a fresh process (this script with ``--case``)."""
    cases = []
    for backend in BACKENDS:
        for step in STEPS_BY_NAME:
            for precision in PRECISIONS:
                cmd = [sys.executable, __file__, "--case", backend, precision, step,
                       *(["--cache", str(cache)] if cache else [])]
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd[1:])} failed:\n{done.stderr[-3000:]}")
                cases.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {"setting": SETTING, "cases": cases}


def table(steps: dict[str, Any]) -> list[str]:
    """The markdown of :func:`measure`'s figures: one row per case, bf16's speed-up and memory against fp32."""
    by = {(c["backend"], c["step"], c["precision"]): c for c in steps["cases"]}
    out = [steps["setting"] + ".", "",
           "| backend | step | precision | step (s, median) | samples/s | bf16 speed-up | weights (MB) | "
           "peak memory over the steps (MB) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for c in steps["cases"]:
        fp32 = by.get((c["backend"], c["step"], "fp32"))
        speedup = f"{fp32['step_s'] / c['step_s']:.2f}x" if fp32 and c["precision"] == "bf16" else ""
        peak = "-" if c.get("peak_mb") is None else f"{c['peak_mb']:,.0f}"
        out.append(f"| {c['backend']} | {c['step']} | {c['precision']} | {c['step_s']:.2f} | {c['samples_per_s']:.2f} "
                   f"| {speedup} | {c['weights_mb']:,.0f} | {peak} |")
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["--case"] and len(argv) in (4, 6):
        cache = Path(argv[5]) if len(argv) == 6 and argv[4] == "--cache" else None
        print(json.dumps(case(*argv[1:4], cache=cache)))
        return 0
    if argv:
        print("usage: precision.py [--case BACKEND PRECISION STEP [--cache DIR]]", file=sys.stderr)
        return 2
    print("\n".join(table(measure())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
