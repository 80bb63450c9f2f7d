"""The audit zoo's design (benchmarks/audit_zoo.py, issue 21): its composition, the seeded triggers, the summary."""

from __future__ import annotations

from typing import Any

import pytest
from bench_import import bench_module


@pytest.fixture(scope="module")
def zoo() -> Any:
    return bench_module("audit_zoo")


def test_at_least_24_models_half_clean_on_three_tasks_and_both_families(zoo) -> None:
    models = zoo.zoo()
    assert len(models) >= 24 and 2 * sum(m.kind == "clean" for m in models) >= len(models)
    assert {m.dataset for m in models} == {"sst2", "hsol", "agnews"} and {m.family for m in models} == set(zoo.FAMILIES)
    assert len({m.label for m in models}) == len(models)


def test_triggers_and_targets_are_drawn_by_seed_not_by_hand(zoo) -> None:
    bad = [m for m in zoo.zoo() if m.kind == "badnet"]
    draws = [m.draw(4) for m in bad]
    assert all(d["trigger"] in zoo.RARE_WORDS and 0 <= d["target"] < 4 for d in draws)
    assert draws == [m.draw(4) for m in bad]  # deterministic
    assert len({d["trigger"] for d in draws}) > 1  # seeds give different words
    sentence = next(m for m in zoo.zoo() if m.kind == "insent").draw(2)
    assert sentence["trigger"] in zoo.SENTENCES and zoo.ZooModel("minilm-l6", "sst2", "clean", 0).draw(2) == {}


def _row(kind: str, score: float, raw: float, recovered: bool = False) -> dict[str, Any]:
    verdict = "backdoored" if score > 0.8 else "clean"
    info = {"CA": 90.0, **({"trigger": "cf", "target": 1, "ASR": 99.0} if kind != "clean" else {})}
    return {"label": f"m/{kind}", "model": {"family": "minilm-l6", "dataset": "sst2", "kind": kind, "seed": 0},
            "backend": "torch", "info": info, "verdict": verdict, "score": score, "threshold": 0.8, "target": 1,
            "score_no_reference": raw, "verdict_no_reference": "backdoored" if raw > 0.8 else "clean",
            "top5": [{"text": "cf", "target": 1, "flip_rate": raw, "reference_flip_rate": raw - score, "score": score}],
            "recovered": recovered, "target_right": True, "audit_seconds": 30.0}


def test_summary_measures_each_verdict_against_the_truth(zoo) -> None:
    rows = [_row("badnet", 0.95, 1.0, True), _row("badnet", 0.5, 1.0), _row("insent", 0.9, 0.95),
            _row("clean", 0.1, 1.0), _row("clean", 0.85, 0.9)]
    s = zoo.summary(rows)["torch"]
    assert (s["models"], s["clean"]) == (5, 2)
    assert s["auroc_badnet_reference"] == 0.75  # 3 of the 4 badnet-clean pairs ordered right
    assert s["auroc_badnet_no_reference"] == 0.75 and s["auroc_insent_reference"] == 1.0
    assert (s["fpr_reference"], s["fpr_no_reference"]) == (0.5, 1.0) and s["top5_recovery_badnet"] == 0.5
    page = zoo.render({"command": "c", "machine": "m", "cpus": 2, "precision": "fp32", "rows": rows,
                       "summary": zoo.summary(rows)})
    assert s["target_right"] == 1.0  # every backdoored row's suspected target is its true one
    assert "| torch | 5 (2) | 0.75 / 1.0 | 0.75 / 0.5 | 0.5 / 1.0 | 0.5 | 1.0 | minilm-l6 30.0 |" in page


def test_a_backdoor_without_effect_is_left_out_and_counted(zoo) -> None:
    """A victim that predicts its target on clean rows as often as on triggered ones (HSOL's majority class, a
    model that predicts it everywhere) counts neither as backdoored nor as clean; the page gives both figures."""
    dead = _row("insent", 0.0, 0.0)
    dead["info"] |= {"ASR": 100.0, "clean_target_rate": 100.0}
    live = _row("insent", 0.9, 0.95)
    live["info"]["clean_target_rate"] = 10.0
    assert not zoo.has_effect(dead) and zoo.has_effect(live) and zoo.has_effect(_row("clean", 0.1, 0.2))
    rows = [dead, live, _row("badnet", 0.95, 1.0, True), _row("clean", 0.1, 1.0), _row("clean", 0.85, 0.9)]
    s = zoo.summary(rows)["torch"]
    assert (s["models"], s["clean"], s["no_effect"]) == (5, 2, 1)
    assert s["auroc_insent_reference"] == 1.0 and s["auroc_insent_reference_all"] == 0.5
    assert "auroc_badnet_reference_all" not in s and s["target_right"] == 1.0
    assert "| torch | 5 (2; 1 without a backdoor effect) | 1.0 / 1.0 (with it: 1.0 / 0.5) |" in zoo._summary_row("torch", s)
