"""The comparison report: markdown tables over runs, PNG plots and ``unbackdoor report --plots``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from unbackdoor.cli import main
from unbackdoor.plots import (
    option_sweeps,
    pca_2d,
    plot_defense_bars,
    plot_hidden_states,
    plot_score_histogram,
    plot_sweep,
    report_plots,
)
from unbackdoor.report import comparison_report, comparison_table, detection_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(stage: str, defense: str, ca: float, asr: float, **extra: Any) -> dict[str, Any]:
    return {"stage": stage, "defense": defense, "CA": ca, "ASR": asr, "seconds": 1.0, **extra}


def _strip_row(ca: float, asr: float) -> dict[str, Any]:
    return _row("poisoned + defense", "strip", ca, asr, CA_model=ca + 1, ASR_model=90.0,
                detection={"precision": 0.9, "recall": 0.8, "f1": 0.847, "auroc": 0.93},
                detector_scores={"clean": [-0.6, -0.5, -0.7, -0.4], "triggered": [-0.1, -0.05, -0.3]},
                model_confidence={"clean": [0.6, 0.7, 0.9, 0.8], "triggered": [0.99, 0.97, 0.95]},
                hidden_pca={"clean": [[0.0, 1.0], [1.0, 0.5]], "triggered": [[3.0, 3.0]]},
                threshold_sweep=[{"threshold": t, "precision": 1.0, "recall": 0.5, "f1": 0.67, "CA": 80.0 - t,
                                  "ASR": 50.0 + 100 * t} for t in (-0.4, -0.3, -0.2)],
                stats={"strip": {"threshold": -0.35}})


def results(attack: str, model: str, rows: list[dict[str, Any]], dataset: str = "sst2") -> dict[str, Any]:
    """A results.json as the runner writes it (the fields the report reads)."""
    return {"config": {"attack": attack, "dataset": dataset, "model": model}, "backend": "torch", "rows": rows}


@pytest.fixture
def runs() -> list[dict[str, Any]]:
    """badnet and insent on one model, badnet on a second model (a path), with a clean baseline and a detector."""
    base = [_row("poisoned (released)", "-", 85.0, 98.0), _row("poisoned + defense", "none", 86.0, 96.5)]
    return [
        results("badnet", "smollm2-135m", [_row("clean student", "none", 84.0, 12.0), *base,
                                           _row("poisoned + defense", "prune", 83.5, 40.25), _strip_row(80.0, 20.0)]),
        results("insent", "smollm2-135m", [*base, _row("poisoned + defense", "prune", 84.0, 70.0)]),
        results("badnet", "/models/qwen-tiny", [*base[:1], _row("poisoned + defense", "none", 70.0, 99.0)]),
    ]


def test_comparison_table_has_a_row_per_attack_and_defense_and_columns_per_model(runs) -> None:
    table = comparison_table(runs)
    lines = table.splitlines()
    assert lines[2] == "| attack | defense | smollm2-135m CA | smollm2-135m ASR | qwen-tiny CA | qwen-tiny ASR |"
    body = [line for line in lines[4:] if line.startswith("| ")]
    assert body == [
        "| badnet | clean model (none) | 84.00 | 12.00 | - | - |",
        "| badnet | released (no fine-tune) | 85.00 | 98.00 | 85.00 | 98.00 |",
        "| badnet | none | 86.00 | 96.50 | 70.00 | 99.00 |",
        "| badnet | prune | 83.50 | 40.25 | - | - |",
        "| badnet | strip* | 80.00 | 20.00 | - | - |",
        "| insent | released (no fine-tune) | 85.00 | 98.00 | - | - |",
        "| insent | none | 86.00 | 96.50 | - | - |",
        "| insent | prune | 84.00 | 70.00 | - | - |",
    ]
    assert "detection defense" in lines[-1]


def test_columns_name_the_dataset_and_backend_only_when_they_vary(runs) -> None:
    runs[1]["config"]["dataset"] = "cr"
    runs[2]["backend"] = "jax"
    header = comparison_table(runs).splitlines()[2]
    assert "smollm2-135m / sst2 / torch CA" in header and "smollm2-135m / cr / torch ASR" in header
    assert "qwen-tiny / sst2 / jax CA" in header


def test_runs_differing_only_by_seed_share_a_cell_as_mean_and_std(runs) -> None:
    again = results("insent", "smollm2-135m", [_row("poisoned + defense", "prune", 80.0, 60.0)])
    runs[1]["config"]["seed"], again["config"]["seed"] = 0, 1
    twin = results("insent", "smollm2-135m", [_row("poisoned + defense", "prune", 1.0, 1.0)])
    twin["config"]["seed"] = 1  # a second run of seed 1 holds the same cached row: the first is kept
    lines = comparison_table([*runs, again, twin]).splitlines()
    assert lines[2].startswith("| attack | defense | seeds | smollm2-135m CA |")
    assert "| insent | prune | 2 | 82.00 +- 2.83 | 65.00 +- 7.07 | - | - |" in lines
    assert "| badnet | prune | 1 | 83.50 | 40.25 | - | - |" in lines
    assert "| badnet | none | 1 | 86.00 | 96.50 | 70.00 | 99.00 |" in lines
    runs[2]["config"]["seed"] = 0
    other_seed = results("badnet", "/models/qwen-tiny", [_row("poisoned + defense", "none", 72.0, 97.0)])
    other_seed["config"]["seed"] = 1
    lines = comparison_table([*runs, again, twin, other_seed]).splitlines()
    assert "| badnet | none | 1 / 2 | 86.00 | 96.50 | 71.00 +- 1.41 | 98.00 +- 1.41 |" in lines  # counts per column
    assert "Cells over several seeds: mean +- sample std." in lines


def test_gradient_checkpointing_changes_no_figure_so_it_splits_no_cell() -> None:
    def run(ca: float, seed: int, **config: Any) -> dict[str, Any]:
        out = results("badnet", "smollm2-135m", [_row("poisoned + defense", "none", ca, 50.0)])
        out["config"].update(seed=seed, **config)
        return out

    # runs saved before the option existed lack it; later ones record False or True
    table = comparison_table([run(80.0, 0), run(82.0, 1, gradient_checkpointing=False),
                              run(84.0, 2, gradient_checkpointing=True)])
    body = [line for line in table.splitlines() if line.startswith("| badnet")]
    assert body == ["| badnet | none | 3 | 82.00 +- 2.00 | 50.00 +- 0.00 |"]


def test_runs_differing_in_a_setting_are_named_not_hidden() -> None:
    def run(asr: float, **config: Any) -> dict[str, Any]:
        out = results("badnet", "smollm2-135m", [_row("poisoned + defense", "w2s", 84.0, asr)])
        out["config"].update(seed=0, **config)
        return out

    table = comparison_table([run(15.0, defense_options={"w2s": {"beta": 2.0, "teacher_lr": 1e-4}}),
                              run(93.0, defense_options={"w2s": {"beta": 0.0, "teacher_lr": 1e-4}}),
                              run(13.0, lora_rank=4, defense_options={"w2s": {"beta": 2.0, "teacher_lr": 1e-4}})])
    body = [line for line in table.splitlines() if line.startswith("| badnet")]
    assert body == ["| badnet | w2s (lora_rank=-, beta=2.0) | 84.00 | 15.00 |",
                    "| badnet | w2s (lora_rank=-, beta=0.0) | 84.00 | 93.00 |",
                    "| badnet | w2s (lora_rank=4, beta=2.0) | 84.00 | 13.00 |"]


def test_detection_table_lists_only_detectors(runs) -> None:
    table = detection_table(runs)
    assert table.splitlines()[-1] == "| badnet | strip | smollm2-135m | 81.00 | 90.00 | 0.90 | 0.80 | 0.85 | 0.93 |"
    assert len([line for line in table.splitlines() if line.startswith("| badnet")]) == 1
    assert detection_table(runs[1:]) == ""
    assert "### Detection" in comparison_report(runs) and "### Detection" not in comparison_report(runs[1:])


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_report_plots_writes_bars_histograms_and_sweeps(runs, tmp_path) -> None:
    written = report_plots(runs, tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert names == ["00-badnet-sst2-smollm2-135m-ca-asr.png",
                     "00-badnet-sst2-smollm2-135m-poisoned-defense-strip-hidden-pca.png",
                     "00-badnet-sst2-smollm2-135m-strip-scores.png", "00-badnet-sst2-smollm2-135m-strip-threshold.png",
                     "00-badnet-sst2-smollm2-135m-strip-victim-confidence.png", "01-insent-sst2-smollm2-135m-ca-asr.png",
                     "02-badnet-sst2-qwen-tiny-ca-asr.png"]
    assert all(_is_png(p) for p in written)


def test_a_loss_weight_varied_across_runs_is_plotted_as_a_sweep(tmp_path) -> None:
    def run(asr: float, seed: int = 0, rank: int = 8, **w2s: Any) -> dict[str, Any]:
        out = results("badnet", "smollm2-135m", [_row("poisoned + defense", "w2s", 84.0, asr)])
        out["config"].update(seed=seed, lora_rank=rank, defense_options={"w2s": {"teacher_lr": 1e-4, **w2s}})
        return out

    runs = [run(90.0, beta=0.0), run(20.0, beta=1.0), run(15.0, beta=2.0),
            run(10.0, beta=3.0, gamma=1.0),  # another gamma: not a point of this sweep
            run(50.0, seed=1, beta=0.0), run(40.0, seed=1, beta=1.0),  # seed 1 has two values only
            run(5.0, rank=4, beta=5.0)]  # another experiment
    sweeps = option_sweeps(runs)
    assert [(key[:4], points) for key, points in sweeps.items()] == [
        (("badnet", "poisoned + defense", "w2s", "beta"), [(0.0, 84.0, 90.0), (1.0, 84.0, 20.0), (2.0, 84.0, 15.0)])]
    written = report_plots(runs, tmp_path)
    assert tmp_path / "sweep-badnet-poisoned-defense-w2s-beta.png" in written
    assert (tmp_path / "sweep-badnet-poisoned-defense-w2s-beta.png").read_bytes().startswith(PNG_MAGIC)


def test_a_sweep_reads_the_options_each_row_ran_with_defaults_included() -> None:
    def run(asr: float, beta: float) -> dict[str, Any]:  # beta=0.2 left at its default: only the row names it
        row = _row("poisoned + defense", "w2s", 84.0, asr, options={"alpha": 1.0, "beta": beta, "teacher_lr": 1e-4})
        out = results("badnet", "smollm2-135m", [row])
        out["config"].update(seed=0, defense_options={"w2s": {"beta": beta}} if beta != 0.2 else {})
        return out

    sweeps = option_sweeps([run(90.0, 0.0), run(30.0, 0.2), run(15.0, 2.0)])
    assert list(sweeps.values()) == [[(0.0, 84.0, 90.0), (0.2, 84.0, 30.0), (2.0, 84.0, 15.0)]]


def test_single_plots(tmp_path) -> None:
    rng = np.random.default_rng(0)
    clean, triggered = rng.normal(size=(30, 16)), rng.normal(size=(20, 16)) + 3
    assert _is_png(plot_hidden_states(clean, triggered, tmp_path / "pca.png", "last-token states, none"))
    sweep = [(0.2, 86.0, 90.0), (0.0, 85.0, 96.0), (1.0, 80.0, 30.0), (0.5, 84.0, 60.0)]
    assert _is_png(plot_sweep(sweep, tmp_path / "sweep.png", "W2S beta sweep", xlabel="beta"))
    assert _is_png(plot_defense_bars([("none", 86.0, 96.5), ("prune", 83.5, 40.0)], tmp_path / "bars.png", "t"))
    assert _is_png(plot_score_histogram([0.1, 0.2], [0.8, 0.9], tmp_path / "h.png", "scores", threshold=0.5))


def test_pca_2d_finds_the_directions_of_largest_variance() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5)) * np.array([10.0, 0.1, 3.0, 0.1, 0.1]) + 7
    proj = pca_2d(x)
    assert proj.shape == (200, 2)
    np.testing.assert_allclose(proj.mean(0), 0, atol=1e-9)
    var = proj.var(0)
    assert var[0] > var[1] > 5 and abs(np.corrcoef(proj[:, 0], x[:, 0])[0, 1]) > 0.99
    assert pca_2d(np.ones((3, 1))).shape == (3, 2)  # fewer than two dimensions: padded


def test_cli_report_prints_the_comparison_and_writes_plots(runs, tmp_path, capsys) -> None:
    paths = []
    for i, run in enumerate(runs):
        (tmp_path / f"run{i}").mkdir()
        (tmp_path / f"run{i}" / "results.json").write_text(json.dumps(run))
        paths.append(str(tmp_path / f"run{i}"))
    assert main(["report", *paths, "--plots", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "| badnet | prune | 83.50 | 40.25 | - | - |" in out
    assert "| poisoned + defense | prune |" in out  # each run's own table comes first
    assert "wrote 7 plots to" in out
    assert len(list((tmp_path / "plots").glob("*.png"))) == 7


def test_plots_without_matplotlib_give_a_clear_error(monkeypatch, tmp_path) -> None:
    import sys

    from unbackdoor.errors import ConfigError

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what an uninstalled package looks like
    with pytest.raises(ConfigError, match="plots need matplotlib: pip install matplotlib"):
        plot_sweep([(0.0, 1.0, 2.0)], tmp_path / "x.png", "t")


def test_wilson_interval_known_values() -> None:
    from unbackdoor.metrics import wilson_interval

    low, high = wilson_interval(50.0, 100)
    assert (round(low, 1), round(high, 1)) == (40.4, 59.6)
    low, high = wilson_interval(0.0, 151)  # never 0-width at the edge
    assert low == 0.0 and 2.0 < high < 3.0
    assert wilson_interval(100.0, 151)[1] == pytest.approx(100.0)


def test_results_md_opens_with_verdicts_backed_by_intervals() -> None:
    from unbackdoor.report import markdown_table, verdicts

    rows = [{"stage": "poisoned (released)", "defense": "-", "CA": 83.33, "ASR": 98.68},
            {"stage": "poisoned + defense", "defense": "none", "CA": 87.0, "ASR": 98.68},
            {"stage": "poisoned + defense", "defense": "w2s", "CA": 85.67, "ASR": 96.69},
            {"stage": "poisoned + defense", "defense": "psim", "CA": 70.0, "ASR": 5.3}]
    results = {"config": {"attack": "insent", "dataset": "sst2"}, "rows": rows, "data": {"test": 300, "asr_test": 151}}
    lines = verdicts(results)
    assert lines[2] == ("- The backdoor survived the user's fine-tune (`none`): ASR 98.68 [95.3, 99.6] released, "
                        "98.68 [95.3, 99.6] after `none` (CA 87.00).")
    assert lines[3].startswith("- `w2s`: ASR 96.69 [") and "not different from `none`" in lines[3]
    assert "fell by 93.38 points" in lines[4] and "CA 70.00 (-17.00 vs `none`)" in lines[4]  # a real CA cost
    table = markdown_table(results)
    assert table.index("What happened") < table.index("| stage | defense | CA (n=300) | ASR (n=151) |")
    assert "| poisoned + defense | psim | 70.00 [64.6, 74.9] | 5.30 [2.7, 10.1] | - |" in table
    weakened = {**results, "rows": [rows[0], {**rows[1], "ASR": 40.0}]}
    assert "The backdoor was weakened by the user's fine-tune" in verdicts(weakened)[2]
    assert verdicts({**results, "data": {}}) == []  # no counts (an older results.json): no verdicts, no intervals
    assert "| poisoned + defense | psim | 70.00 | 5.30 | - |" in markdown_table({**results, "data": {}})


def test_comparison_cells_and_bars_carry_intervals_where_counts_are_recorded(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from unbackdoor.plots import plot_defense_bars

    rows = [{"stage": "poisoned + defense", "defense": "none", "CA": 85.0, "ASR": 96.03}]
    counted = {"config": {"attack": "badnet", "model": "m", "seed": 0}, "rows": rows,
               "data": {"test": 300, "asr_test": 151}}
    table = comparison_table([counted])
    assert "| badnet | none | 85.00 [80.5, 88.6] | 96.03 [91.6, 98.2] |" in table
    assert "| badnet | none | 85.00 | 96.03 |" in comparison_table([{**counted, "data": {}}])  # no counts recorded
    bars = [("none", 85.0, 96.03), ("w2s", 86.0, 20.0)]
    with_bars = plot_defense_bars(bars, tmp_path / "a.png", "t", (300, 151)).read_bytes()
    assert with_bars != plot_defense_bars(bars, tmp_path / "b.png", "t").read_bytes()
