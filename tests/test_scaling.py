"""Data-parallel training on CPU: torch DDP (torchrun, gloo, 2 processes) equals one process on the same
global batch, within fp32 tolerance (only the order of the gradient sums differs); the experiment runner
under torchrun gives one process's results, with rank 0 alone writing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ddp_train import train

HERE = Path(__file__).parent


def test_torch_ddp_two_processes_match_one(tiny_dirs, tmp_path) -> None:
    out = tmp_path / "ddp.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNBACKDOOR_QUIET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "ddp_train.py"), str(tiny_dirs["llama"]), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, start_new_session=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ddp = dict(np.load(out))
    assert bool(ddp.pop("ddp")), "the ranks did not train through unbackdoor_torch.parallel"
    losses, weights = train(str(tiny_dirs["llama"]))
    assert len(losses) == 4
    np.testing.assert_allclose(ddp.pop("losses"), losses, rtol=1e-5, atol=1e-6)
    assert set(ddp) == set(weights)
    for name, value in weights.items():
        # AdamW divides by sqrt(v): a weight whose gradient is near zero moves by an amount that the order of the
        # gradient sums sways (seen: 4.8e-6 on 1 of 2,048 elements, each step moving a weight by up to lr = 1e-3)
        np.testing.assert_allclose(ddp[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


# -- the experiment runner under torchrun (`torchrun -m unbackdoor run ...`) ------------------------------------

#: what must match between the 2-rank and the 1-process run: rates over rows (exact) and training figures
EXACT = ("stage", "defense", "CA", "ASR", "PACC", "triggered_confusion", "n", "ci95")
#: losses differ by the order of the gradient sums only, grown over the victim's 160 steps at lr 2e-3 (measured:
#: up to 2.2e-4 relative on an AVX-512 CPU, the victim's final loss 1e-4; on an AVX2-only one, whose GEMM kernels
#: sum in another order, a defense's final loss 1.2e-3); every rate above is equal
LOSS_RTOL = 3e-3
#: torchrun's output is the ranks' interleaved output; these lines must appear once (rank 0 logs, the others not)
ONCE = ("stage victim: full fine-tune", "stage defense: none (poisoned + defense)",
        "stage defense: finetune (poisoned + defense)", "stage defense: merge (poisoned + defense)",
        "stage defense: reusing cached result (none)",
        "| poisoned + defense | finetune |")


def _run_flags(tiny_dirs: dict[str, Path], out: Path, cache: Path, batch: int = 16) -> list[str]:
    """A weight-setting run where DDP is exact: per-example-mean CE, no dropout, rows a multiple of the batch;
    the attacker trains enough for the tiny model's predictions to differ between rows (not one class for all)."""
    return ["--backend", "torch", "--model", str(tiny_dirs["llama"]), "--teacher", "", "--defenses", "none,finetune,merge",
            "--defense-option", "finetune.lr=1e-3", "--clean-baseline", "true", "--attacker-rows", "320",
            "--poison-rate", "0.3", "--user-rows", "64", "--test-rows", "32", "--attacker-epochs", "8",
            "--user-epochs", "2", "--attacker-lr", "2e-3", "--attacker-batch-size", str(batch),
            "--user-batch-size", str(batch),
            "--lora-rank", "4", "--lora-dropout", "0", "--max-length", "32", "--out", str(out), "--cache-dir", str(cache)]


def _torchrun(args: list[str], timeout: int = 150) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNBACKDOOR_QUIET": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True)


def _copy_clean_entry(cache: Path, into: Path) -> None:
    """Seed ``into`` with the clean student's cached row only (a stage an earlier run finished)."""
    entry = next(p.parent for p in cache.glob("defense/*/result.json")
                 if json.loads(p.read_text())["stage"] == "clean student")
    shutil.copytree(entry, into / "defense" / entry.name)


def test_cli_under_torchrun_matches_one_process_and_rank_0_alone_writes(tiny_dirs, tmp_path) -> None:
    """``torchrun --nproc-per-node 2 -m unbackdoor run`` (gloo): the same rows as one process; rank 0 writes.

    The 2-rank run starts from a cache holding one finished stage (the clean student, as after a killed
    run or from an earlier experiment): every rank reads it, then the ranks train the victim (full
    fine-tune, saved by rank 0 and loaded by both), evaluate it, and train ``none`` (LoRA) and
    ``finetune`` on it together; ``merge`` trains its clean reference together (rank 0 saves it) and
    rank 0 alone merges the weights while rank 1 waits. An audit hook records every write of each
    rank under out/ and cache/.
    """
    from unbackdoor.cli import main as cli_main

    one = tmp_path / "one"
    assert cli_main(["run", *_run_flags(tiny_dirs, one / "out", one / "cache")]) == 0
    single = json.loads((one / "out" / "results.json").read_text())
    two, logs = tmp_path / "two", tmp_path / "writes"
    logs.mkdir()
    _copy_clean_entry(one / "cache", two / "cache")
    seeded = {str(p.relative_to(two)) for p in (two / "cache").glob("*/*")}
    roots = f"{two / 'out'},{two / 'cache'}"
    done = _torchrun([str(HERE / "rank_writes.py"), str(logs), roots, "run",
                      *_run_flags(tiny_dirs, two / "out", two / "cache")])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ddp = json.loads((two / "out" / "results.json").read_text())
    assert (ddp["world_size"], single["world_size"]) == (2, 1)
    assert len(ddp["rows"]) == len(single["rows"]) == 5
    for got, want in zip(ddp["rows"], single["rows"], strict=True):
        assert {k: got[k] for k in EXACT} == {k: want[k] for k in EXACT}, got["defense"]
        if "train" in want.get("stats", {}):
            g, w = got["stats"]["train"], want["stats"]["train"]
            assert (g["steps"], g["samples"]) == (w["steps"], w["samples"])
            assert g["first_loss"] == pytest.approx(w["first_loss"], rel=LOSS_RTOL)
            assert g["final_loss"] == pytest.approx(w["final_loss"], rel=LOSS_RTOL)
    assert any(min(row) > 0 for row in single["rows"][1]["triggered_confusion"]["badnet"]), "one class for all rows"
    victim = [json.loads(next((d / "cache").glob("victim/*/train.json")).read_text()) for d in (one, two)]
    assert (victim[1]["steps"], victim[1]["samples"]) == (victim[0]["steps"], victim[0]["samples"]) == (160, 2560)
    assert victim[1]["final_loss"] == pytest.approx(victim[0]["final_loss"], rel=LOSS_RTOL)
    for line in ONCE:
        assert done.stdout.count(line) == 1, (line, done.stdout[-3000:])

    assert json.loads((logs / "rank1.json").read_text()) == [], "rank 1 wrote under out/ or cache/"
    renamed = [Path(path).relative_to(two) for event, path in json.loads((logs / "rank0.json").read_text())
               if event == "os.rename"]
    finished = sorted(str(p) for p in renamed if not any(part.startswith(".") for part in p.parts))
    entries = {str(p.relative_to(two)) for p in (two / "cache").glob("*/*")} - seeded
    assert finished == sorted({"out/run.json", "out/results.json", "out/results.md", *entries}), finished
    # victim, released, none, finetune, merge, merge's reference and merged model; the clean student was only read
    assert len(entries) == 7, entries
    assert sum(name.endswith("hidden-pca.png") for name in os.listdir(two / "out" / "plots")) == 5


def test_torchrun_refuses_a_batch_the_ranks_cannot_share(tiny_dirs, tmp_path) -> None:
    """An odd global batch over 2 ranks: a one-line ConfigError on each rank before anything is written."""
    done = _torchrun(["-m", "unbackdoor", "run", *_run_flags(tiny_dirs, tmp_path / "out", tmp_path / "cache", 15)])
    assert done.returncode != 0
    assert ("unbackdoor: error: attacker_batch_size (--attacker-batch-size) 15 must be divisible by the 2 "
            "data-parallel ranks") in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_torchrun_refuses_the_jax_backend(tiny_dirs, tmp_path) -> None:
    """jax splits batches over the devices of one process; two torchrun ranks would each train alone."""
    flags = _run_flags(tiny_dirs, tmp_path / "out", tmp_path / "cache")
    done = _torchrun(["-m", "unbackdoor", "run", *flags[2:], "--backend", "jax"])
    assert done.returncode != 0
    assert "unbackdoor: error: backend 'jax' cannot run under a launcher's 2 processes (WORLD_SIZE=2)" in done.stderr, \
        done.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_ranks_of_a_backend(monkeypatch) -> None:
    """One process needs nothing from the backend; a launcher's several need its ranks, the same number of them."""
    from unbackdoor.errors import ConfigError
    from unbackdoor.ranks import ONE_PROCESS, OneProcess, check_batch_sizes, ranks_of

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ranks_of(object(), "plain") is ONE_PROCESS
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="backend 'plain' cannot run under a launcher's 2 processes"):
        ranks_of(object(), "plain")
    with pytest.raises(ConfigError, match="backend 'torch' sees 1; it did not join"):
        ranks_of(OneProcess(), "torch")
    assert ranks_of(OneProcess(1, 2), "torch") == OneProcess(1, 2)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' must be an integer"):
        ranks_of(object(), "plain")
    check_batch_sizes({"user_batch_size": 16}, 4)
    with pytest.raises(ConfigError, match=r"user_batch_size 16 must be divisible by the 3 .* choose e.g. 15"):
        check_batch_sizes({"user_batch_size": 16}, 3)


def test_a_rank_waits_for_the_model_rank_0_converts(tmp_path) -> None:
    """Under torchrun rank 0 converts a named GGUF model; another rank waits for the file, then a clear timeout."""
    import threading

    from unbackdoor.errors import ConfigError
    from unbackdoor.models import _wait_for

    file = tmp_path / "models" / "smollm2-135m" / "model.safetensors"
    later = threading.Timer(0.3, lambda: (file.parent.mkdir(parents=True), file.write_bytes(b"x")))
    later.start()
    _wait_for(file, "model 'smollm2-135m'", timeout=30)
    later.join()
    with pytest.raises(ConfigError, match=r"model 'x': rank 0 waited 0 s for rank 0 to write .*same cache directory"):
        _wait_for(tmp_path / "missing", "model 'x'", timeout=0.0)
