"""The benchmark suite markdown (benchmarks/report_md.py): the papers' comparison shape over a suite's runs."""

from __future__ import annotations

from typing import Any

import pytest
from bench_import import bench_module


@pytest.fixture(scope="module")
def render_suite() -> Any:
    return bench_module("report_md").render_suite


def _run(dataset: str, attack: str, asr: float, model: str = "m/smollm2-135m", seed: int = 0) -> dict[str, Any]:
    rows = [{"stage": "poisoned + defense", "defense": "none", "CA": 85.0, "ASR": asr}]
    return {"change": {"dataset": dataset, "attack": attack, "defenses": ("none",)},
            "results": {"config": {"dataset": dataset, "attack": attack, "model": model, "seed": seed},
                        "backend": "torch", "rows": rows, "timings_s": {"total": 1.0}}}


def _suite(runs: dict[str, Any]) -> dict[str, Any]:
    return {"title": "t", "command": "c", "machine": "x", "cpus": 2, "base": {"lora_targets": ("q_proj",)}, "runs": runs}


def test_comparison_table_when_runs_differ_in_setting(render_suite, tmp_path) -> None:
    text = render_suite(_suite({"a": _run("sst2", "badnet", 96.0), "b": _run("cr", "insent", 87.5)}), tmp_path)
    assert "### Comparison (CA / ASR, %)" in text
    assert "| badnet | none | 85.00 | 96.00 | - | - |" in text and "| insent | none | - | - | 85.00 | 87.50 |" in text
    assert "('none',)" not in text and "['none']" in text  # tuples read as the saved JSON does (--render)


def test_comparison_table_averages_runs_that_differ_by_seed(render_suite, tmp_path) -> None:
    runs = {"seed0": _run("sst2", "badnet", 96.0), "seed1": _run("sst2", "badnet", 90.0, seed=1)}
    text = render_suite(_suite(runs), tmp_path)
    assert "| badnet | none | 2 | 85.00 +- 0.00 | 93.00 +- 4.24 |" in text
    assert "| seed1 | badnet | none | 85.00 | 90.00 |" in text  # the summary keeps each run


def test_comparison_table_per_model(render_suite, tmp_path) -> None:
    text = render_suite(_suite({"small": _run("sst2", "badnet", 96.0), "big": _run("sst2", "badnet", 20.0, "m/llama")}),
                        tmp_path)
    assert "| smollm2-135m CA | smollm2-135m ASR | llama CA | llama ASR |" in text
    assert "| badnet | none | 85.00 | 96.00 | 85.00 | 20.00 |" in text


def test_a_run_made_elsewhere_says_where(render_suite, tmp_path) -> None:
    """A run merged in from a GPU device run names its machine under its heading; the others do not."""
    runs = {"cpu": _run("sst2", "badnet", 96.0), "gpu": {**_run("sst2", "badnet", 90.0, seed=1), "machine": "an H200"}}
    text = render_suite(_suite(runs), tmp_path)
    assert text.count("Ran on ") == 1 and "## gpu\n\nRan on an H200, not the machine above." in text


def test_merging_a_suite_run_elsewhere_adds_only_what_is_missing() -> None:
    """``run.py --merge``: runs made on another machine join in the suite's order, each naming that machine;
    a run we have, or one the other machine made with another change, is left alone."""
    merged_runs = bench_module("run").merged_runs
    suite = {"a": {"seed": 1}, "b": {"seed": 2}, "c": {"seed": 3}, "d": {"seed": 4}}

    def run(change: dict[str, Any], **results: Any) -> dict[str, Any]:
        return {"change": change, "results": results}

    ours = {"runs": {"c": run({"seed": 3}, mine=True), "old": run({"seed": 9})}}
    theirs = {"machine": "Linux-gpu", "cpus": 16,
              "runs": {"a": run({"seed": 1}, device="cuda:0 (H200)"), "b": run({"seed": 5}), "c": run({"seed": 3}),
                       "d": run({"seed": 4})}}
    assert merged_runs(ours, theirs, suite) == ["a", "d"]
    assert list(ours["runs"]) == ["a", "c", "d", "old"]  # the suite's order; a run it no longer has, last
    assert ours["runs"]["a"]["machine"] == "cuda:0 (H200) (Linux-gpu, 16 CPUs)"
    assert ours["runs"]["d"]["machine"] == "Linux-gpu, 16 CPUs" and ours["runs"]["c"]["results"] == {"mine": True}


def test_merge_with_a_bad_suite_or_file_is_a_clear_error(tmp_path, capsys) -> None:
    main = bench_module("run").main
    assert main(["--merge", "nope", str(tmp_path)]) == 2
    assert main(["--merge", "rga-10", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("--merge takes a suite name and a JSON file of it; suites: ") == 2 and "rga-10" in err


def test_demo_verdict_says_which_targets_are_met() -> None:
    """demo.md: the released model's backdoor survives, and a defense removes it only at CA within 3 of `none`."""
    demo_verdict = bench_module("report_md").demo_verdict
    rows = [{"stage": "poisoned (released)", "defense": "-", "CA": 83.3, "ASR": 98.7},
            {"stage": "poisoned + defense", "defense": "none", "CA": 87.0, "ASR": 98.7},
            {"stage": "poisoned + defense", "defense": "w2s", "CA": 85.7, "ASR": 98.7},
            {"stage": "poisoned + defense", "defense": "psim", "CA": 85.7, "ASR": 5.3},
            {"stage": "poisoned + defense", "defense": "onion", "CA": 80.0, "ASR": 10.0}]
    lines = demo_verdict(rows)
    assert lines[0].startswith("- released model: CA 83.30, ASR 98.70") and ": met;" in lines[0]
    assert "`psim`: CA 85.70 (-1.30 vs `none`), ASR 5.30: removes it" in lines[2]
    assert "does not meet" in lines[1] and "does not meet" in lines[3]  # w2s keeps ASR; onion costs 7 points of CA
    weak = [{**rows[0], "CA": 53.0}, *rows[1:]]
    assert ": missed;" in demo_verdict(weak)[0]


def test_suite_pages_carry_intervals_where_runs_recorded_their_counts(render_suite, tmp_path) -> None:
    counted = _run("sst2", "badnet", 96.03)
    counted["results"]["data"] = {"test": 300, "asr_test": 151}
    page = render_suite(_suite({"counted": counted, "old": _run("sst2", "insent", 90.0)}), tmp_path)
    assert "| counted | badnet | none | 85.00 [80.5, 88.6] | 96.03 [91.6, 98.2] | - | - | - |" in page  # summary
    assert "| old | insent | none | 85.00 | 90.00 | - | - | - |" in page  # a run without counts: plain rates
    assert "| poisoned + defense | none | 85.00 [80.5, 88.6] | 96.03 [91.6, 98.2] | - |" in page  # its own table


def test_a_suite_run_borrows_only_rows_of_the_same_victim(render_suite, tmp_path) -> None:
    """``cube``'s runs take ReTrain and RGA from rga-10's run of the same victim (setting, seed, released row);
    never from another seed or victim, never a row whose defense ran with options, never one the run has."""
    import json

    borrowed = bench_module("run").borrowed

    def results(seed: int, released_ca: float, *defenses: str, **options: Any) -> dict[str, Any]:
        rows = [{"stage": "poisoned (released)", "defense": "-", "CA": released_ca, "ASR": 90.0, "PACC": 50.0}]
        rows += [{"stage": "poisoned + defense", "defense": d, "CA": 80.0 + i, "ASR": 10.0, "PACC": 75.0 + seed}
                 for i, d in enumerate(defenses)]
        return {"config": {"dataset": "sst2", "attack": "style", "seed": seed, "lr": 1e-4,
                           "defense_options": options}, "rows": rows, "timings_s": {"total": 1.0}}

    saved = {"runs": {"s0": {"results": results(0, 76.0, "retrain", "rga", "ga")},
                      "s1-other-victim": {"results": results(1, 70.0, "retrain", "rga")},
                      "s1": {"results": results(1, 80.0, "retrain", "rga", rga={"alpha": 1.0})}}}
    (tmp_path / "old.json").write_text(json.dumps(saved))
    fresh = results(0, 76.0, "cube+rga")
    fresh["config"]["lora_targets"] = ("q_proj", "v_proj")  # a fresh run's tuple, saved as a list
    for run in saved["runs"].values():
        run["results"]["config"]["lora_targets"] = ["q_proj", "v_proj"]
    (tmp_path / "old.json").write_text(json.dumps(saved))
    ours = borrowed(fresh, ("retrain", "rga"), ("old", "missing"), tmp_path)
    assert [r["defense"] for r in ours["rows"]] == ["-", "retrain", "rga", "cube+rga"]
    assert ours["rows"][1]["borrowed"] == "old.json run s0" and ours["rows"][1]["CA"] == 80.0
    # seed 1: the run with seed 1's victim gave RGA options, so only its ReTrain is taken; the other victim's none
    one = borrowed(results(1, 80.0, "cube+rga"), ("retrain", "rga"), ("old",), tmp_path)
    assert [(r["defense"], r.get("borrowed")) for r in one["rows"]] == [
        ("-", None), ("retrain", "old.json run s1"), ("cube+rga", None)]
    # another setting (its learning rate), or a row the run trained itself: nothing taken
    other = results(0, 76.0, "cube+rga")
    other["config"]["lr"] = 2e-4
    assert borrowed(other, ("retrain", "rga"), ("old",), tmp_path) == other
    own = results(0, 76.0, "retrain", "cube+rga")
    assert [(r["defense"], r.get("borrowed")) for r in borrowed(own, ("retrain", "rga"), ("old",), tmp_path)["rows"]] \
        == [("-", None), ("rga", "old.json run s0"), ("retrain", None), ("cube+rga", None)]
    # the page marks what was taken and says from where
    text = render_suite(_suite({"sst2-style-seed0": {"change": {}, "results": ours}}), tmp_path / "plots")
    assert "| sst2-style-seed0 | style | retrain\u2021 |" in text
    assert "not trained in this run: taken from the saved run of the same victim" in text
    assert "retrain (old.json run s0), rga (old.json run s0)" in text
