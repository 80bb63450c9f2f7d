"""Detection metrics on hand-made scores, and a detector defense through the runner."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from unbackdoor import ExperimentConfig
from unbackdoor.data import TextDataset
from unbackdoor.defense import Defense, DefenseContext, DefenseOutcome
from unbackdoor.hookspecs import hookimpl
from unbackdoor.metrics import auroc, detection_scores
from unbackdoor.plugins import PluginManager
from unbackdoor.runner import run_experiment


def test_detection_scores_on_a_hand_made_table() -> None:
    flagged = np.array([1, 1, 0, 0, 1, 0], bool)
    poisoned = np.array([1, 0, 1, 0, 1, 0], bool)
    got = detection_scores(flagged, poisoned)
    assert got == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})
    assert detection_scores(np.zeros(4, bool), np.array([1, 0, 0, 0], bool))["f1"] == 0.0


def test_auroc_matches_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    truth = rng.random(60) < 0.4
    pos, neg = scores[truth], scores[~truth]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auroc(scores, truth) == pytest.approx(pairwise)
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert np.isnan(auroc([0.1, 0.2], [0, 0]))


@dataclass
class WordDetector:
    """Flags inputs that contain a word: a perfect detector of the BadNet trigger."""

    word: str
    threshold: float = 0.5

    def score(self, data: TextDataset) -> np.ndarray:
        return np.array([float(self.word in t.split()) for t in data.texts])


@dataclass(frozen=True)
class OracleDetector(Defense):
    name = "oracle-detector"
    description = "test-only: flags the BadNet word; keeps the victim as is"
    kind = "detection"

    def apply(self, ctx: DefenseContext) -> DefenseOutcome:
        model = ctx.backend.load_classifier(ctx.victim_path, ctx.num_labels)
        return DefenseOutcome(model, detector=WordDetector("mn"))


class Plugin:
    @hookimpl
    def unbackdoor_defenses(self) -> list[Defense]:
        return [OracleDetector()]


def test_detector_defense_rejects_triggered_inputs(tiny_dirs, tmp_path, backend_name) -> None:
    pm = PluginManager()
    pm.register(Plugin(), "oracle")
    cfg = ExperimentConfig(backend=backend_name, model=str(tiny_dirs["llama"]), teacher=None, attacker_rows=160,
                           user_rows=32, test_rows=40, attacker_epochs=1.0, max_length=32,
                           defenses=("oracle-detector",), cache_dir=str(tmp_path / "c"), out=str(tmp_path / "o"))
    row = run_experiment(cfg, pm, log=lambda _: None)["rows"][-1]
    assert row["ASR"] == 0.0  # every triggered input is flagged, so no attack succeeds
    triggered = len(row["detector_scores"]["triggered"])
    assert row["detection"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "auroc": 1.0, "threshold": 0.5,
                                "flagged": triggered, "positives": triggered}  # the counts the rates are of
    assert row["CA"] == row["CA_model"]  # no clean SST-2 test row contains the word "mn"
    assert 0 <= row["ASR_model"] <= 100
