"""The loss contract's cost (issue 20): this checkout against the code before it, measured in one run.

Before commit 15c784e each backend held its own code of every loss (torch functions, jax functions under
``jit``); since then every loss is written once against the array API and both backends evaluate that one
definition (``unbackdoor.lossdef``). This compares the two on the same machine in one run:

1. the fused W2S step (``step_time.torch_steps`` / ``jax_steps``: SmolLM2-135M, LoRA r=8 on q/v, 16 x 48
   tokens, fp32, W2S a=1 b=0.2 c=0.2 T=2; the median of 10 steps after 2 warm-up steps), each in its own
   process, the trees alternating, :data:`ROUNDS` times;
2. the default experiment (``unbackdoor run`` defaults: none and w2s on SST-2 BadNet) on each backend, once
   per tree: its CA/ASR rows must be identical.

The code before is :data:`BEFORE`'s tree (``git archive``, no worktree); a process runs a tree by putting
its packages' ``src`` first on ``sys.path`` (the venv's editable installs point at this checkout). Its
core's plugin module (``unbackdoor.plugin``, added by the contract) does not exist there: that one entry
point fails to load, harmlessly (it registers the losses, which the old backends did not look up).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

from unbackdoor.models import resolve_model

#: the last commit before the loss contract (15c784e moved cross-entropy, label reset and W2S to it)
BEFORE = "b23b526"
ROUNDS = 3
BACKENDS = ("torch", "jax")
PACKAGES = ("core", "attacks", "defenses", "backend_torch", "backend_jax")
ROOT = Path(__file__).resolve().parents[1]

#: a child process: ``tree backend cache what out``; prints one JSON line (``PACKAGES`` is filled in)
CHILD = """
import json, sys
from pathlib import Path
tree, backend, cache, what, out = sys.argv[1:6]
sys.path[:0] = [f"{tree}/packages/{p}/src" for p in PACKAGES] + [f"{tree}/benchmarks"]
import unbackdoor
assert unbackdoor.__file__.startswith(tree), unbackdoor.__file__
if what == "step":
    import step_time
    from unbackdoor.models import resolve_model
    path = resolve_model("smollm2-135m", Path(cache))
    print(json.dumps((step_time.torch_steps if backend == "torch" else step_time.jax_steps)(path)))
else:
    from unbackdoor.cli import main
    code = main(["run", "--backend", backend, "--cache-dir", cache, "--out", out])
    print(json.dumps({"exit": code}))
"""


def before_tree(cache: Path) -> Path:
    """:data:`BEFORE`'s packages and benchmarks, unpacked once under ``cache``."""
    tree = cache / f"tree-{BEFORE}"
    if not (tree / "packages" / "core" / "src" / "unbackdoor").is_dir():
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE, "packages", "benchmarks"],
                                 check=True, capture_output=True).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(tree, filter="data")
    return tree


def child(tree: Path, backend: str, cache: Path, what: str, out: Path | None = None) -> dict[str, Any]:
    """Run :data:`CHILD` for one tree and backend; its last stdout line as JSON."""
    env = {**os.environ, "UNBACKDOOR_QUIET": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD.replace("PACKAGES", repr(PACKAGES)), str(tree), backend, str(cache),
                           what, str(out or "")], check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_cache(cache: Path, label: str, models: Path) -> Path:
    """An empty stage cache for one run that shares the converted models (``models/``)."""
    path = cache / f"runs-{label}"
    path.mkdir(parents=True, exist_ok=True)
    if not (path / "models").exists():
        (path / "models").symlink_to(models)
    return path


def step_times(trees: dict[str, Path], cache: Path) -> dict[str, Any]:
    """Each backend's fused W2S step in each tree, the trees alternating, :data:`ROUNDS` rounds."""
    out: dict[str, Any] = {}
    for backend in BACKENDS:
        rounds: dict[str, list[float]] = {name: [] for name in trees}
        for _ in range(ROUNDS):
            for name, tree in trees.items():
                rounds[name].append(child(tree, backend, cache, "step")["step_s"])
        medians = {name: statistics.median(times) for name, times in rounds.items()}
        out[backend] = {"rounds": rounds, "median_s": medians, "after_over_before": medians["after"] / medians["before"]}
    return out


def experiments(trees: dict[str, Path], cache: Path) -> dict[str, Any]:
    """The default experiment per backend and tree, each from an empty stage cache: wall time and its rows."""
    models = resolve_model("smollm2-135m", cache).parent
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out: dict[str, Any] = {}
    for backend in BACKENDS:
        for name, tree in trees.items():
            label = f"{name}-{backend}-{stamp}"
            where = run_cache(cache, label, models)
            start = time.perf_counter()
            child(tree, backend, where, "run", where / "out")
            results = json.loads((where / "out" / "results.json").read_text())
            out[f"{name}-{backend}"] = {"seconds": round(time.perf_counter() - start, 1),
                                        "rows": [{k: r.get(k) for k in ("stage", "defense", "CA", "ASR")}
                                                 for r in results["rows"]]}
        out[f"identical-{backend}"] = out[f"before-{backend}"]["rows"] == out[f"after-{backend}"]["rows"]
    return out


def measure(cache: Path) -> dict[str, Any]:
    """Everything :mod:`loss_contract` compares, as one JSON-able dict."""
    cache = cache / "loss-contract"
    cache.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "packages"], check=True,
                           capture_output=True, text=True).stdout.strip()
    trees = {"before": before_tree(cache), "after": ROOT}
    after = f"{head} (this checkout{', with uncommitted changes under packages/' if dirty else ''})"
    return {"command": "nox -s bench -- loss-contract", "machine": platform.platform(), "cpus": os.cpu_count(),
            "before": BEFORE, "after": after,
            "step": step_times(trees, cache), "experiment": experiments(trees, cache)}


def render(data: dict[str, Any]) -> str:
    """The results page."""
    lines = ["# The loss contract's cost: every loss written once (after) vs each backend's own loss code (before)",
             "", f"Command: `{data['command']}`. Machine: {data['machine']}, {data['cpus']} CPUs. Before: commit "
             f"`{data['before']}` (the last one before the contract); after: `{data['after']}`.", "",
             "## Fused W2S step (SmolLM2-135M, LoRA r=8 q/v, 16 x 48 tokens, fp32; median of 10 steps per process, "
             f"{ROUNDS} processes per tree, alternating)", "",
             "| backend | before (s) | after (s) | after / before | every round before | every round after |",
             "|---|---:|---:|---:|---|---|"]
    for backend, s in data.get("step", {}).items():
        rounds = {k: ", ".join(f"{t:.4f}" for t in v) for k, v in s["rounds"].items()}
        lines.append(f"| {backend} | {s['median_s']['before']:.4f} | {s['median_s']['after']:.4f} | "
                     f"{s['after_over_before']:.3f} | {rounds['before']} | {rounds['after']} |")
    lines += ["", "## The default experiment (`unbackdoor run` defaults), each from an empty stage cache", "",
              "| backend | tree | wall time (s) | rows (stage, defense: CA / ASR) |", "|---|---|---:|---|"]
    exp = data.get("experiment", {})
    for backend in BACKENDS:
        for name in ("before", "after"):
            run = exp.get(f"{name}-{backend}")
            if run:
                rows = "; ".join(f"{r['stage']}, {r['defense']}: {r['CA']:.2f} / {r['ASR']:.2f}" for r in run["rows"])
                lines.append(f"| {backend} | {name} | {run['seconds']} | {rows} |")
        if f"identical-{backend}" in exp:
            same = "yes" if exp[f"identical-{backend}"] else "NO"
            lines.append(f"| {backend} | identical before and after? | | **{same}** |")
    return "\n".join(lines) + "\n"
