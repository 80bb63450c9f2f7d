"""Resume and determinism: a run SIGKILLed in its defense stage, resumed with ``--resume``, matches a clean run.

The killed run is a real subprocess (``python -m unbackdoor.cli run``); it is killed as soon as it logs the
start of the defense stage, after the victim is cached. The resumed run (in-process, ``run --resume``) must
reuse the cached victim, redo the defense and give the same results as an uninterrupted run with the same
seed in fresh directories (a second, independent training of every stage: same seed and backend, same
metrics and losses). The subprocess runs in an empty working directory, which must stay empty.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from unbackdoor import cli
from unbackdoor.config import ExperimentConfig
from unbackdoor.runner import run_experiment

MARKER = "stage defense: none"
VOLATILE = {"seconds", "samples_per_second"}  # wall-clock figures, the only things allowed to differ


def _flags(tiny_dirs: dict[str, Path], backend: str, out: Path, cache: Path) -> list[str]:
    return ["--backend", backend, "--model", str(tiny_dirs["llama"]), "--teacher", "", "--defenses", "none",
            "--attacker-rows", "64", "--user-rows", "64", "--test-rows", "32", "--attacker-epochs", "1",
            "--user-epochs", "3", "--attacker-lr", "3e-3", "--lora-rank", "4", "--max-length", "32",
            "--out", str(out), "--cache-dir", str(cache)]


def _kill_in_defense_stage(argv: list[str], cwd: Path) -> str:
    """Start ``unbackdoor run`` and SIGKILL it when it logs :data:`MARKER`; returns its output up to then."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "UNBACKDOOR_QUIET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "unbackdoor.cli", "run", *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, deadline = [], time.monotonic() + 240
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            seen.append(line)
            if MARKER in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(seen)
    assert MARKER in output, f"the run never reached the defense stage:\n{output[-3000:]}"
    assert proc.returncode == -signal.SIGKILL, output[-3000:]
    return output


def _stable(value):
    """``value`` without wall-clock figures."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def test_sigkill_in_defense_stage_then_resume_matches_uninterrupted(tiny_dirs, tmp_path, backend_name,
                                                                     capsys) -> None:
    out, cache, work = tmp_path / "out", tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    _kill_in_defense_stage(_flags(tiny_dirs, backend_name, out, cache), work)
    victims = list((cache / "victim").glob("*/_config.json"))
    assert len(victims) == 1, "the victim stage should have finished and been cached before the kill"
    assert not list(cache.glob("defense/*/result.json")), "the killed defense stage must not be cached"
    assert not (out / "results.json").exists() and (out / "run.json").is_file()
    assert not any(work.iterdir()), f"wrote into the working directory: {list(work.iterdir())}"

    assert cli.main(["run", "--resume", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "stage victim: full fine-tune" not in log, "the cached victim should have been reused"
    assert MARKER in log
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["config"]["cache_dir"] == str(cache)

    kwargs = dict(backend=backend_name, model=str(tiny_dirs["llama"]), teacher="", defenses=("none",),
                  attacker_rows=64, user_rows=64, test_rows=32, attacker_epochs=1.0, user_epochs=3.0,
                  attacker_lr=3e-3, lora_rank=4, max_length=32)
    fresh = run_experiment(ExperimentConfig(**kwargs, out=str(tmp_path / "out2"), cache_dir=str(tmp_path / "c2")),
                           log=lambda _: None)
    assert _stable(resumed["rows"]) == _stable(fresh["rows"])
    train = resumed["rows"][-1]["stats"]["train"]
    assert train["steps"] == 12 and train["final_loss"] == fresh["rows"][-1]["stats"]["train"]["final_loss"]
    victim_stats = json.loads((victims[0].parent / "train.json").read_text())
    fresh_victim = next((tmp_path / "c2" / "victim").glob("*/train.json"))
    assert _stable(victim_stats) == _stable(json.loads(fresh_victim.read_text()))
