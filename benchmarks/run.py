"""Real-model benchmarks (CPU here, GPU for users): ``python benchmarks/run.py w2s``.

Writes ``benchmarks/results/<name>.json`` and ``.md`` after each part, so a
partial run keeps what it measured. Every figure comes from this run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from unbackdoor import ExperimentConfig, run_experiment
from unbackdoor.cache import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).parent / "results"
# The W2S comparison: a stronger attacker than the default quick start (see DESIGN.md's calibration).
W2S_SETTING = dict(dataset="sst2", attack="badnet", attacker_rows=800, attacker_epochs=2.0, attacker_lr=5e-5,
                   poison_rate=0.2, user_rows=400, user_epochs=2.0, user_lr=2e-4, user_batch_size=16,
                   lora_rank=8, lora_alpha=16.0, lora_targets=("q_proj", "v_proj"), test_rows=300, max_length=48,
                   defenses=("none", "w2s"), clean_baseline=True, seed=0)


def save(name: str, data: dict[str, Any], markdown: str) -> None:
    """Write the figures so far."""
    atomic_write_json(RESULTS / f"{name}.json", data)
    atomic_write_text(RESULTS / f"{name}.md", markdown)


def default_wall_time(cache: Path) -> dict[str, Any]:
    """The README's default experiment, from an empty cache (model conversion included), timed."""
    env = {**os.environ, "UNBACKDOOR_CACHE": str(cache), "UNBACKDOOR_QUIET": "1"}
    out = cache / "demo"
    start = time.perf_counter()
    subprocess.run(["unbackdoor", "run", "--out", str(out)], check=True, env=env)
    seconds = time.perf_counter() - start
    return {"command": "unbackdoor run (defaults)", "seconds": round(seconds, 1),
            "results": json.loads((out / "results.json").read_text())}


def comparison(cache: Path) -> dict[str, Any]:
    """CA/ASR for the clean student, poisoned + LoRA (none) and poisoned + W2SDefense."""
    cfg = ExperimentConfig(**W2S_SETTING, cache_dir=str(cache), out=str(cache / "w2s-run"))
    return run_experiment(cfg)


def main(argv: list[str]) -> int:
    """Run the named benchmarks (only ``w2s`` for now)."""
    names = argv or ["w2s"]
    if names != ["w2s"]:
        print(f"unknown benchmark(s) {names}; choose: w2s", file=sys.stderr)
        return 2
    from throughput import measure  # the naive vs fused loop, torch only

    cache = Path(os.environ.get("UNBACKDOOR_BENCH_CACHE") or tempfile.mkdtemp(prefix="unbackdoor-bench-"))
    data: dict[str, Any] = {"command": "nox -s bench -- w2s", "machine": platform.platform(),
                            "cpus": os.cpu_count(), "cache": str(cache)}
    data["default_experiment"] = default_wall_time(cache / "fresh")
    save("w2s", data, render(data))
    data["throughput"] = measure(cache)
    save("w2s", data, render(data))
    data["comparison"] = comparison(cache)
    save("w2s", data, render(data))
    print(render(data))
    return 0


def render(data: dict[str, Any]) -> str:
    """The markdown summary of whatever has been measured."""
    from report_md import render_w2s

    return render_w2s(data, W2S_SETTING)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main(sys.argv[1:]))
