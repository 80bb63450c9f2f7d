"""``benchmarks/run.py --keep``: a suite that resumes keeps every saved run on disk while it measures the others."""

from __future__ import annotations

import json
from typing import Any

import pytest
from bench_import import bench_module


@pytest.fixture(scope="module")
def run() -> Any:
    return bench_module("run")


def _change(seed: int) -> dict[str, Any]:
    return {"dataset": "sst2", "attack": "badnet", "seed": seed, "defenses": ["none"]}


def _results(seed: int, asr: float) -> dict[str, Any]:
    return {"config": {"dataset": "sst2", "attack": "badnet", "model": "m/smollm2-135m", "seed": seed},
            "backend": "torch", "timings_s": {"total": 1.0},
            "rows": [{"stage": "poisoned + defense", "defense": "none", "CA": 85.0, "ASR": asr}]}


def test_a_resumed_suite_keeps_the_saved_runs_it_has_not_reached(run, tmp_path, monkeypatch) -> None:
    """The run measured in the middle is written beside BOTH kept ones, in the suite's order, so stopping the bench
    there loses nothing; the page's notes stay; a saved run whose change differs is measured again."""
    saved = {"a": {"change": _change(0), "results": _results(0, 96.0)},
             "c": {"change": _change(2), "results": _results(2, 90.0)},
             "d": {"change": _change(3), "results": _results(3, 80.0)}}
    (tmp_path / "s.json").write_text(json.dumps({"runs": saved}))
    (tmp_path / "s.md").write_text("# old page\n\n## Notes\n\nhand-written\n")
    suite = {"a": _change(0), "b": _change(1), "c": _change(2), "d": {**_change(3), "attack": "insent"}}
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    monkeypatch.setitem(run.SUITES, "s", ("t", suite))
    on_disk: list[list[str]] = []

    def measure(cfg: Any) -> dict[str, Any]:
        on_disk.append(list(json.loads((tmp_path / "s.json").read_text())["runs"]))
        return _results(cfg.seed, 50.0)

    monkeypatch.setattr(run, "run_experiment", measure)
    data = run.suite("s", tmp_path / "cache", keep=True)
    assert on_disk == [["a", "c", "d"], ["a", "b", "c"]]  # while b trains all are kept; d's change differs
    written = json.loads((tmp_path / "s.json").read_text())["runs"]
    assert list(written) == list(data["runs"]) == ["a", "b", "c", "d"]
    assert written["c"]["results"]["rows"][0]["ASR"] == 90.0 and written["d"]["results"]["rows"][0]["ASR"] == 50.0
    assert (tmp_path / "s.md").read_text().endswith("## Notes\n\nhand-written\n")
