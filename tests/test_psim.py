"""PSIM: label reset, the label-reset step vs the NumPy reference, the detector end to end."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from unbackdoor import ExperimentConfig, run_experiment
from unbackdoor import losses as ref
from unbackdoor.errors import ConfigError, UnknownNameError
from unbackdoor.plugins import get_plugin_manager
from unbackdoor.specs import LabelResetLoss, PromptSpec, TrainSpec


@pytest.mark.parametrize("seed", range(20))
def test_full_reset_never_leaves_all_labels_intact(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, int(rng.integers(1, 12)))
    new = ref.reset_labels(labels, 2, LabelResetLoss(1.0, seed))
    assert not np.array_equal(new, labels)
    same = np.zeros(7, np.int64)  # one class only: a shuffle cannot change anything
    assert not np.array_equal(ref.reset_labels(same, 3, LabelResetLoss(1.0, seed)), same)


def test_partial_reset_touches_only_chosen_rows_and_is_seeded() -> None:
    labels = np.arange(400) % 4
    spec = LabelResetLoss(0.25, seed=3)
    new = ref.reset_labels(labels, 4, spec)
    assert (new != labels).sum() <= 100
    assert np.array_equal(new, ref.reset_labels(labels, 4, spec))
    assert not np.array_equal(new, ref.reset_labels(labels, 4, LabelResetLoss(0.25, seed=4)))
    assert np.bincount(new, minlength=4).tolist() == [100, 100, 100, 100]  # a shuffle keeps the balance


def test_uniform_reset_labels_carry_no_class_prior() -> None:
    """On HSOL's balance (88% class 0) a shuffle keeps the prior the PSIM model would learn; uniform labels do not."""
    labels = np.array([0] * 880 + [1] * 120)
    shuffled = ref.reset_labels(labels, 2, LabelResetLoss(1.0, 5))
    uniform = ref.reset_labels(labels, 2, LabelResetLoss(1.0, 5, "uniform"))
    assert np.bincount(shuffled).tolist() == [880, 120]
    assert abs(uniform.mean() - 0.5) < 0.05
    assert not np.array_equal(uniform, ref.reset_labels(labels, 2, LabelResetLoss(1.0, 6, "uniform")))
    with pytest.raises(UnknownNameError, match=r"unknown label reset labels 'balanced'.*shuffle.*uniform"):
        LabelResetLoss(labels="balanced")


def test_label_reset_step_matches_reference(backend_name, tiny_dirs, sst2) -> None:
    backend = get_plugin_manager().backend(backend_name).create()
    rows = sst2.train.head(16)
    model = backend.add_adapter(backend.load_classifier(tiny_dirs["llama"], 2, seed=2), PromptSpec("prompt-tuning", 4))
    spec = LabelResetLoss(1.0, 7)
    labels = ref.reset_labels(rows.labels, 2, spec)
    logits = backend.predict(model, rows).logits
    stats = backend.train(model, rows, spec, TrainSpec(epochs=1, lr=1e-3, batch_size=16), {"reset_labels": labels})
    expected = ref.reference_loss(spec, {"logits": logits}, {"reset_labels": labels})
    assert stats.losses[0] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("peft", ["lora", "prompt-tuning"])
def test_psim_detector_end_to_end(peft, tiny_dirs, tmp_path, backend_name) -> None:
    cfg = ExperimentConfig(backend=backend_name, model=str(tiny_dirs["llama"]), teacher=None, attacker_rows=160,
                           attacker_epochs=2.0, attacker_lr=3e-3, user_rows=48, test_rows=40, max_length=32,
                           defenses=("psim",), defense_options={"psim": {"peft": peft, "num_virtual_tokens": 4,
                                                                         "train_head": str(peft != "lora")}},
                           cache_dir=str(tmp_path / "c"), out=str(tmp_path / "o"))
    row = run_experiment(cfg, log=lambda _: None)["rows"][-1]
    assert row["defense"] == "psim" and set(row["detection"]) == {"precision", "recall", "f1", "auroc", "threshold",
                                                                  "flagged", "positives"}
    assert row["detection"]["positives"] == len(row["detector_scores"]["triggered"])
    assert row["stats"]["labels_changed"] > 0 and row["options"]["reset"] == "uniform"  # the default draw
    sweep = row["threshold_sweep"]
    assert [s["threshold"] for s in sweep] == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    # Raising the threshold flags fewer inputs: CA with defense and ASR after filtering never fall.
    assert all(a["CA"] <= b["CA"] and a["ASR"] <= b["ASR"] for a, b in itertools.pairwise(sweep))
    at_default = next(s for s in sweep if s["threshold"] == 0.7)
    assert at_default["CA"] == row["CA"] and at_default["ASR"] == row["ASR"]
    assert row["CA"] <= row["CA_model"] and row["ASR"] <= row["ASR_model"]
    assert len(row["detector_scores"]["clean"]) == 40
    assert all(0.5 <= s <= 1.0 for s in row["detector_scores"]["clean"])  # max softmax of 2 classes


def test_bad_psim_options_are_clear() -> None:
    psim = get_plugin_manager().defense("psim")
    for bad in (1.5, 0.0, float("nan")):
        with pytest.raises(ConfigError, match="threshold"):
            psim.configure(threshold=bad)
    with pytest.raises(UnknownNameError, match="prefix-tuning") as err:
        psim.configure(peft="adapter-h")
    assert "adapter-h" in str(err.value)
    with pytest.raises(ConfigError, match="reset rate"):
        psim.configure(reset_rate=0)
    with pytest.raises(UnknownNameError, match="'prior'"):
        psim.configure(reset="prior")
    with pytest.raises(UnknownNameError, match="'prior'"):
        get_plugin_manager().defense("psim+rga").configure(psim_reset="prior")
    assert psim.reset == get_plugin_manager().defense("psim+rga").psim.reset == "uniform"  # one default
    with pytest.raises(ConfigError, match="calibrate_fpr"):
        psim.configure(calibrate_fpr=1.5)
    with pytest.raises(ConfigError, match="'train_head' expects a bool, got 'maybe'"):
        psim.configure(train_head="maybe")


def test_psim_threshold_calibrated_on_clean_dev_rows(tiny_dirs, tmp_path, backend_name) -> None:
    """calibrate_fpr sets the threshold from held-out clean rows: about that share of them is flagged."""
    cfg = ExperimentConfig(backend=backend_name, model=str(tiny_dirs["llama"]), teacher=None, attacker_rows=160,
                           attacker_epochs=1.0, user_rows=48, test_rows=40, max_length=32, defenses=("psim",),
                           defense_options={"psim": {"calibrate_fpr": 0.1}},
                           cache_dir=str(tmp_path / "c"), out=str(tmp_path / "o"))
    row = run_experiment(cfg, log=lambda _: None)["rows"][-1]
    calibration = row["stats"]["calibration"]
    assert calibration["rows"] == 872  # SST-2's dev split, never the test rows
    assert calibration["clean_flagged"] <= 0.1 + 1e-9
    assert row["detection"]["threshold"] == pytest.approx(calibration["threshold"], abs=1e-5)
    flagged_clean = sum(s > row["detection"]["threshold"] for s in row["detector_scores"]["clean"])
    assert row["CA"] >= row["CA_model"] - 100 * flagged_clean / 40 - 1e-6
