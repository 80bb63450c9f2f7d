"""Training guards: a non-finite loss stops the stage with one line naming the step and every loss term,
and the cache keeps only the finished stages (the last good checkpoint)."""

from __future__ import annotations

import numpy as np
import pytest

from unbackdoor import cli
from unbackdoor.errors import TrainingDivergedError
from unbackdoor.guards import loss_terms
from unbackdoor.plugins import get_plugin_manager
from unbackdoor.specs import AdaptiveGALoss, CrossEntropy, TrainSpec, W2SLoss


@pytest.fixture(scope="module")
def backend(backend_name):
    return get_plugin_manager().backend(backend_name).create()


def test_nan_in_aux_arrays_names_step_terms_and_input(backend, tiny_dirs, sst2) -> None:
    data = sst2.train.head(16)
    model = backend.load_classifier(tiny_dirs["llama"], 2)
    aux = {"teacher_logits": np.full((16, 2), np.nan, np.float32), "teacher_hidden": np.zeros((16, 32), np.float32)}
    with pytest.raises(TrainingDivergedError) as err:
        backend.train(model, data, W2SLoss(), TrainSpec(epochs=1, batch_size=8, max_length=32), aux, desc="w2s")
    msg = str(err.value)
    assert "\n" not in msg
    assert "training 'w2s' stopped at step 1 of 2: non-finite loss nan (W2SLoss; terms:" in msg
    assert "distillation=nan" in msg and "non-finite values in: teacher_logits" in msg
    ce = float(msg.split("cross_entropy=")[1].split(",")[0])
    assert np.isfinite(ce) and 0 < ce < 5  # the healthy term is shown with its value
    assert "alignment=" in msg and "lower the learning rate" in msg


@pytest.mark.parametrize("alignment", ["tokens", "released"])
def test_nan_teacher_state_names_the_token_alignment(backend, tiny_dirs, sst2, alignment) -> None:
    """The alignments over every token's state: the guard recomputes their term from the token states."""
    data = sst2.train.head(16)
    model = backend.load_classifier(tiny_dirs["llama"], 2)
    hidden = np.zeros((16, 32), np.float32)
    hidden[:, 0] = np.nan
    aux = {"teacher_logits": np.zeros((16, 2), np.float32), "teacher_hidden": hidden}
    with pytest.raises(TrainingDivergedError) as err:
        backend.train(model, data, W2SLoss(alignment=alignment), TrainSpec(epochs=1, batch_size=8, max_length=32),
                      aux, desc="w2s")
    msg = str(err.value)
    assert "alignment=nan" in msg and "non-finite values in: teacher_hidden" in msg
    assert np.isfinite(float(msg.split("distillation=")[1].split(",")[0]))


def test_diverging_learning_rate_is_caught_at_a_later_step(backend, tiny_dirs, sst2) -> None:
    data = sst2.train.head(64)
    model = backend.load_classifier(tiny_dirs["llama"], 2)
    with pytest.raises(TrainingDivergedError) as err:
        backend.train(model, data, CrossEntropy(), TrainSpec(epochs=4, lr=1e30, batch_size=8, max_length=32),
                      desc="attacker")
    msg = str(err.value)
    step = int(msg.split("stopped at step ")[1].split(" ")[0])
    assert step >= 2, msg  # step 1 runs on the initial, finite weights
    assert "of 32: non-finite loss" in msg and "cross_entropy=" in msg and "non-finite values in: logits" in msg


def test_loss_terms_reference() -> None:
    logits = np.array([[0.0, 0.0], [np.inf, 0.0], [1.0, 0.0]])
    batch = {"labels": np.array([0, 1, 0]), "weight": np.array([1.0, 1.0, 0.0]), "is_poisoned": np.array([0, 1, 0])}
    terms = loss_terms(CrossEntropy(), logits, None, batch)
    assert terms["cross_entropy[clean]"] == pytest.approx(np.log(2))  # the filler row (weight 0) is left out
    assert np.isnan(terms["cross_entropy[poisoned]"]) and np.isnan(terms["cross_entropy"])
    # RGA reports its own terms (its definition's), the batch's parameter distance among them
    rga = loss_terms(AdaptiveGALoss(0.0, 0.5), logits, None,
                     {**batch, "ref_logits": np.zeros((3, 2)), "parameter_distance": np.float64(2.0)})
    assert rga["cross_entropy[clean]"] == pytest.approx(np.log(2)) and rga["parameter_distance"] == 2.0
    assert np.isnan(rga["-lambda*cross_entropy[poisoned]"]) and np.isnan(rga["cross_entropy[poisoned]"])


def test_nan_reference_logits_name_rgas_terms(backend, tiny_dirs, sst2) -> None:
    """RGA's lambda reads the poisoned rows' reference logits: its ascent term is NaN, its other terms (the
    parameter distance the backend passed included) keep their values."""
    data = sst2.train.head(16)
    model = backend.load_classifier(tiny_dirs["llama"], 2)
    ref_logits = np.zeros((16, 2), np.float32)
    ref_logits[0] = np.nan
    aux = {"is_poisoned": (np.arange(16) % 2 == 0).astype(np.float32), "ref_logits": ref_logits}
    with pytest.raises(TrainingDivergedError) as err:
        backend.train(model, data, AdaptiveGALoss(2.0, 0.5), TrainSpec(epochs=1, batch_size=16, max_length=32), aux,
                      desc="rga")
    msg = str(err.value)
    assert "non-finite loss nan (AdaptiveGALoss; terms: -lambda*cross_entropy[poisoned]=nan, " in msg
    assert "parameter_distance=0," in msg and "non-finite values in: ref_logits" in msg
    assert 0 < float(msg.split("cross_entropy[clean]=")[1].split(",")[0]) < 5


def test_diverging_defense_keeps_the_cached_victim(tiny_dirs, tmp_path, backend_name, capsys, monkeypatch) -> None:
    """user_lr 1e30: the defense stage fails with one line; the victim stays cached and whole, nothing else is."""
    monkeypatch.setenv("UNBACKDOOR_QUIET", "1")
    cache, out = tmp_path / "cache", tmp_path / "out"
    argv = ["run", "--backend", backend_name, "--model", str(tiny_dirs["llama"]), "--teacher", "", "--defenses",
            "none", "--attacker-rows", "32", "--user-rows", "64", "--test-rows", "16", "--attacker-epochs", "1",
            "--user-epochs", "2", "--user-lr", "1e30", "--lora-rank", "4", "--max-length", "32",
            "--out", str(out), "--cache-dir", str(cache)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unbackdoor: error: training 'none: lora' stopped at step ") and "\n" not in err, err
    assert "cross_entropy=" in err
    victim = [p.parent for p in cache.glob("victim/*/_config.json")]
    assert len(victim) == 1 and (victim[0] / "model.safetensors").is_file()
    assert not list(cache.glob("defense/*")), "a failed stage must leave no cache entry"
    assert not [p for p in cache.rglob(".*")], "no half-written temporary directories"
    assert not (out / "results.json").exists()
