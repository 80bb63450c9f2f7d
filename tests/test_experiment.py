"""A tiny end-to-end run through the CLI and the Python API: poison -> victim -> LoRA/W2S -> metrics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from unbackdoor import ExperimentConfig, run_experiment
from unbackdoor.attack import non_target
from unbackdoor.cache import StageCache
from unbackdoor.cli import main
from unbackdoor.errors import ConfigError, UnknownNameError
from unbackdoor.metrics import attack_success_rate
from unbackdoor.plugins import get_plugin_manager
from unbackdoor.runner import Experiment, plan


def _flags(tiny_dirs, tmp_path, backend_name: str) -> list[str]:
    return ["--backend", backend_name, "--model", str(tiny_dirs["llama"]), "--teacher", str(tiny_dirs["bert"]),
            "--attacker-rows", "160", "--user-rows", "64", "--test-rows", "40", "--attacker-epochs", "2",
            "--attacker-lr", "3e-3", "--user-epochs", "1", "--lora-rank", "4", "--max-length", "32",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]


def test_cli_run_writes_results_and_reuses_cache(tiny_dirs, tmp_path, backend_name, capsys) -> None:
    flags = _flags(tiny_dirs, tmp_path, backend_name)
    assert main(["run", *flags, "--defenses", "none,w2s", "--defense-option", "w2s.teacher_epochs=1"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    stages = [(r["stage"], r["defense"]) for r in results["rows"]]
    assert stages == [("poisoned (released)", "-"), ("poisoned + defense", "none"), ("poisoned + defense", "w2s")]
    for row in results["rows"]:
        assert 0 <= row["CA"] <= 100 and 0 <= row["ASR"] <= 100
        pca = row["hidden_pca"]  # last-token states of clean and triggered test rows, one 2-D projection
        assert len(pca["clean"]) == 40 and len(pca["triggered"]) == results["data"]["asr_test"]
    plots = sorted(p.name for p in (tmp_path / "out" / "plots").iterdir())
    assert sum(name.endswith("hidden-pca.png") for name in plots) == 3 and any("ca-asr" in n for n in plots), plots
    w2s = results["rows"][2]["stats"]
    assert w2s["train"]["steps"] == 4 and "dev_accuracy" in w2s["teacher"]
    assert results["data"] == {"user_train": 64, "attacker_train": 160, "test": 40,
                               "asr_test": results["data"]["asr_test"], "pacc_test": 40}
    none = results["rows"][1]  # every rate with its row count and 95% interval
    assert none["n"] == {"CA": 40, "ASR": results["data"]["asr_test"], "PACC": 40}
    assert all(lo <= none[k] <= hi and hi - lo > 5 for k, (lo, hi) in none["ci95"].items())
    assert "What happened" in (tmp_path / "out" / "results.md").read_text()
    assert results["config"]["defense_options"] == {"w2s": {"teacher_epochs": "1"}}
    # each defense row names every option it ran with: the one set, and the defaults (the loss weights)
    assert results["rows"][2]["options"]["teacher_epochs"] == 1.0
    assert {k: results["rows"][2]["options"]["loss"][k] for k in ("alpha", "beta", "gamma")} == {
        "alpha": 1.0, "beta": 0.2, "gamma": 0.2}
    assert "options" not in results["rows"][0]  # the released model: no defense
    assert "| poisoned + defense | w2s |" in (tmp_path / "out" / "results.md").read_text()
    # where it ran (the suite runs without an accelerator): in the record and the report's title
    assert results["device"] == "cpu" and f"backend {backend_name} on cpu" in (tmp_path / "out" / "results.md").read_text()
    # the released (poisoned) model is named, so `unbackdoor audit --model OUT` can read it
    assert (Path(results["released_model"]) / "head.safetensors").is_file()
    assert "| poisoned + defense | w2s |" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "out"), str(tmp_path / "out" / "results.json")]) == 0
    assert capsys.readouterr().out.count("| poisoned + defense | none |") == 2
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err

    # Same config again: every stage comes from the cache and the metrics are identical.
    logs: list[str] = []
    cfg = ExperimentConfig(**_api_kwargs(tiny_dirs, tmp_path, backend_name), out=str(tmp_path / "out2"),
                           defense_options={"w2s": {"teacher_epochs": "1"}})
    again = run_experiment(cfg, log=logs.append)
    assert [r["CA"] for r in again["rows"]] == [r["CA"] for r in results["rows"]]
    assert again["rows"][2]["options"] == results["rows"][2]["options"]  # a cached row has them too
    assert sum("reusing cached" in line for line in logs) == 3


def test_w2s_paper_preset_runs_the_released_objective(tiny_dirs, tmp_path, backend_name) -> None:
    """``--config w2s-paper`` scaled to tiny models by flags: its w2s options (released alignment, ReLU teacher
    head, 5*CE + 0.001*KD + 0.001*A) survive a flag that adds another w2s option, and train on either backend."""
    sizes = {"--user-rows": "48", "--user-epochs": "1", "--lora-rank": "4", "--lora-alpha": "4", "--test-rows": "40",
             "--attacker-rows": "96", "--max-length": "32", "--precision": "fp32"}
    flags = [x for pair in sizes.items() for x in pair]
    argv = ["run", "--config", "w2s-paper", *_flags(tiny_dirs, tmp_path, backend_name), *flags,
            "--defense-option", "w2s.teacher_epochs=1"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    w2s = next(r for r in results["rows"] if r.get("defense") == "w2s")
    assert {k: w2s["options"]["loss"][k] for k in ("alpha", "beta", "gamma", "alignment", "reduce")} == {
        "alpha": 5.0, "beta": 0.001, "gamma": 0.001, "alignment": "released", "reduce": "sum"}
    assert w2s["options"]["teacher_activation"] == "relu"
    assert w2s["options"]["teacher_epochs"] == 1.0 and w2s["stats"]["train"]["steps"] == 2
    teacher = next((tmp_path / "cache").glob("teacher/*/unbackdoor.json"))
    assert json.loads(teacher.read_text())["projection_activation"] == "relu"


def _api_kwargs(tiny_dirs, tmp_path, backend_name: str) -> dict:
    return dict(backend=backend_name, model=str(tiny_dirs["llama"]), teacher=str(tiny_dirs["bert"]),
                attacker_rows=160, user_rows=64, test_rows=40, attacker_epochs=2.0, attacker_lr=3e-3,
                user_epochs=1.0, lora_rank=4, max_length=32, cache_dir=str(tmp_path / "cache"))


def test_precision_auto_is_recorded_as_what_it_resolved_to(tiny_dirs, tmp_path, backend_name) -> None:
    engine = get_plugin_manager().backend(backend_name).create()
    cfg = ExperimentConfig(**{**_api_kwargs(tiny_dirs, tmp_path, backend_name), "attacker_rows": 48, "user_rows": 16,
                              "test_rows": 16}, defenses=("none",), clean_baseline=False, precision="auto",
                           out=str(tmp_path / "out"))
    said: list[str] = []
    results = run_experiment(cfg, log=said.append)
    assert results["config"]["precision"] == engine.auto_precision() in ("fp32", "bf16")
    assert f"precision auto: {engine.auto_precision()} on this device" in said
    assert json.loads((tmp_path / "out" / "run.json").read_text())["config"]["precision"] == engine.auto_precision()


def test_api_backdoor_is_learned_and_clean_baseline_is_reported(tiny_dirs, tmp_path, backend_name) -> None:
    """The attacker's stage really plants the trigger: the released model predicts the target on triggered
    non-target rows far more often than on the same rows without the trigger (a tiny model that has not
    learned the task may favour one class, so the raw ASR of the clean student is no floor here)."""
    stronger = {"attacker_epochs": 8.0, "attacker_rows": 320, "attacker_lr": 2e-3, "poison_rate": 0.3}
    kwargs = _api_kwargs(tiny_dirs, tmp_path, backend_name) | stronger
    cfg = ExperimentConfig(**kwargs, defenses=("none",), clean_baseline=True, out=str(tmp_path / "o"))
    rows = {r["stage"]: r for r in run_experiment(cfg, log=lambda _: None)["rows"]}
    assert set(rows) == {"clean student", "poisoned (released)", "poisoned + defense"}
    assert rows["poisoned (released)"]["ASR"] >= 75.0

    the_plan = plan(cfg)
    backend = get_plugin_manager().backend(backend_name).create()
    experiment = Experiment(the_plan, backend, StageCache(tmp_path / "cache"), log=lambda _: None)
    victim = backend.load_classifier(experiment.victim(), 2, seed=0)  # cached: no retraining
    clean_rows = non_target(the_plan.test, the_plan.poison.target)
    predictions = backend.predict(victim, clean_rows, batch_size=32, max_length=32).logits.argmax(-1)
    without_trigger = attack_success_rate(predictions, clean_rows.labels, the_plan.poison.target)
    # The tiny random model barely learns SST-2 (it leans to one class), so the margin is small but must be there.
    assert rows["poisoned (released)"]["ASR"] > without_trigger, without_trigger


def test_failed_stage_leaves_no_results_file(tiny_dirs, tmp_path, backend_name) -> None:
    kwargs = _api_kwargs(tiny_dirs, tmp_path, backend_name) | {"teacher": str(tmp_path / "missing-teacher")}
    cfg = ExperimentConfig(**kwargs, defenses=("w2s",), out=str(tmp_path / "o"))
    with pytest.raises(Exception, match="missing-teacher"):
        run_experiment(cfg, log=lambda _: None)
    assert not (tmp_path / "o" / "results.json").exists()


def test_data_poisoning_setting_trains_the_base_student_on_poisoned_user_rows(tiny_dirs, tmp_path, backend_name) -> None:
    """setting=data: no attacker stage; `none` and `w2s` train the base student on the poisoned user rows,
    the teacher on trusted clean rows disjoint from them."""
    kwargs = _api_kwargs(tiny_dirs, tmp_path, backend_name) | {"user_epochs": 4.0, "user_lr": 5e-3, "poison_rate": 0.3}
    cfg = ExperimentConfig(**kwargs, setting="data", teacher_rows=96, defenses=("none", "w2s"), clean_baseline=True,
                           clean_defenses=("w2s",), defense_options={"w2s": {"teacher_epochs": "1"}},
                           out=str(tmp_path / "o"))
    the_plan = plan(cfg)
    assert the_plan.user_train.poisoned.sum() == round(0.3 * 64) and not the_plan.clean_user.poisoned.any()
    assert len(the_plan.teacher_train) == 96
    assert not set(the_plan.teacher_train.rows) & set(the_plan.user_train.rows)
    results = run_experiment(cfg, log=lambda _: None)
    stages = [(r["stage"], r["defense"]) for r in results["rows"]]
    assert stages == [("clean student", "none"), ("clean student", "w2s"),  # the floor and the "clean model" case
                      ("poisoned data + defense", "none"), ("poisoned data + defense", "w2s")]
    assert "victim" not in results["timings_s"] and "released" not in results["timings_s"]
    assert {"clean", "clean w2s"} <= set(results["timings_s"])
    clean_w2s, w2s = results["rows"][1]["stats"], results["rows"][3]["stats"]
    assert w2s["train"]["samples"] == 4 * 64 and w2s["teacher"]["samples"] == 96
    assert clean_w2s["train"]["samples"] == 4 * 64 and clean_w2s["train"]["final_loss"] != w2s["train"]["final_loss"]
    with pytest.raises(UnknownNameError, match="'nope'"):
        plan(dataclasses.replace(cfg, clean_defenses=("nope",)))


def test_unknown_setting_is_a_clear_error(tiny_dirs, tmp_path, backend_name) -> None:
    with pytest.raises(ConfigError, match="unknown setting 'model'; choose one of: data, weight"):
        ExperimentConfig(**_api_kwargs(tiny_dirs, tmp_path, backend_name), setting="model").validate()
    with pytest.raises(ConfigError, match="teacher_rows must be >= 1, got 0"):
        ExperimentConfig(**_api_kwargs(tiny_dirs, tmp_path, backend_name), setting="data", teacher_rows=0).validate()


def test_student_peft_method_is_an_option_of_none_and_w2s(tiny_dirs, tmp_path, backend_name) -> None:
    """W2S's student (and the plain fine-tune) may use prompt-tuning instead of LoRA; the soft prompt trains."""
    options = {"peft": "prompt-tuning", "num_virtual_tokens": "4", "lr": "0.05"}
    cfg = ExperimentConfig(**_api_kwargs(tiny_dirs, tmp_path, backend_name), defenses=("none", "w2s"),
                           defense_options={"none": options, "w2s": {**options, "teacher_epochs": "1"}},
                           out=str(tmp_path / "o"))
    rows = run_experiment(cfg, log=lambda _: None)["rows"]
    for row in rows[1:]:
        assert row["stats"]["train"]["first_loss"] != row["stats"]["train"]["final_loss"]
        assert 0 <= row["CA"] <= 100
    with pytest.raises(ConfigError, match="unknown w2s peft method 'adapter'"):
        run_experiment(dataclasses.replace(cfg, defense_options={"w2s": {"peft": "adapter"}}), log=lambda _: None)
