"""A plugin that raises during a run fails the run with its name, and leaves the cache consistent."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import unbackdoor.plugins
from unbackdoor import cli
from unbackdoor.config import ExperimentConfig
from unbackdoor.defense import Defense, DefenseContext, DefenseOutcome
from unbackdoor.hookspecs import hookimpl
from unbackdoor.plugins import PluginManager
from unbackdoor.runner import run_experiment


@dataclass(frozen=True)
class Crash(Defense):
    """Starts building a cached artefact, then raises in the middle of it."""

    name: ClassVar[str] = "crash"
    description: ClassVar[str] = "raises half-way through building its artefact"

    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        def build(tmp):
            (tmp / "model.safetensors").write_bytes(b"half written")
            raise RuntimeError("disk on fire")

        ctx.cache.get_or_build("crash-artefact", {**ctx.cache_key, "victim": str(ctx.victim_path)}, build)
        raise AssertionError("unreachable")


class CrashPlugin:
    @hookimpl
    def unbackdoor_defenses(self) -> list[Defense]:
        return [Crash()]


def test_raising_defense_fails_with_its_name_and_keeps_the_cache(tiny_dirs, tmp_path, backend_name, capsys,
                                                                 monkeypatch) -> None:
    pm = PluginManager()
    pm.register(CrashPlugin(), "crash-plugin", package="crash-pkg", version="0.1")
    monkeypatch.setattr(unbackdoor.plugins, "_DEFAULT", pm)
    monkeypatch.setenv("UNBACKDOOR_QUIET", "1")
    cache, out = tmp_path / "cache", tmp_path / "out"
    kwargs = dict(backend=backend_name, model=str(tiny_dirs["llama"]), teacher="", attacker_rows=32, user_rows=32,
                  test_rows=16, attacker_epochs=1.0, user_epochs=1.0, lora_rank=4, max_length=32,
                  cache_dir=str(cache), out=str(out))
    argv = ["run", *[f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items()], "--defenses", "none,crash"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("unbackdoor: error: plugin 'crash-plugin' failed: defense 'crash' from plugin 'crash-plugin' "
                   "(crash-pkg 0.1) raised RuntimeError: disk on fire"), err
    assert "crash-plugin" in pm.failures
    assert not (out / "results.json").exists()
    # consistent: finished stages are whole, the failed one left nothing (no entry, no temporary directory)
    assert len(list(cache.glob("victim/*/_config.json"))) == 1
    assert len(list(cache.glob("defense/*/result.json"))) == 1  # the 'none' row, finished before the crash
    assert not (cache / "crash-artefact").exists() or not any((cache / "crash-artefact").iterdir())
    assert not [p for p in cache.rglob(".*")]
    for entry in cache.glob("*/*"):
        assert (entry / "_config.json").is_file(), f"incomplete cache entry {entry}"

    logs: list[str] = []
    results = run_experiment(ExperimentConfig(**kwargs, defenses=("none",)), pm=pm, log=logs.append)
    assert not any("stage victim: full fine-tune" in line for line in logs)
    assert sum("reusing cached" in line for line in logs) == 2  # released row and the 'none' row
    assert [r["defense"] for r in results["rows"]] == ["-", "none"]
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
