"""The baseline defenses on tiny models: each end to end through the runner, plus their building blocks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

import unbackdoor.plugins
from unbackdoor import ExperimentConfig
from unbackdoor.attack import Paraphraser
from unbackdoor.backend import causal_lm_inputs
from unbackdoor.batching import pad_batch
from unbackdoor.cli import main
from unbackdoor.errors import ConfigError
from unbackdoor.hookspecs import hookimpl
from unbackdoor.metrics import mean_token_nll
from unbackdoor.plugins import PluginManager, get_plugin_manager
from unbackdoor.runner import plan, run_experiment
from unbackdoor.surgery import ffn_layers, read_classifier
from unbackdoor.testing import check_defense_contract
from unbackdoor_defenses.onion import OnionFilter, leave_one_out
from unbackdoor_defenses.strip import mix_words, perturb

NEW = ("onion", "strip", "finetune", "prune", "quantize", "merge", "backtranslate", "scpd")
NEEDS = {"onion": "lm_nll", "prune": "mlp_activations"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One stage cache for the module, so the victim is trained once."""
    return tmp_path_factory.mktemp("defense-cache")


def _backend(name: str) -> Any:
    return get_plugin_manager().backend(name).create()


def _require(backend_name: str, defense: str) -> None:
    method = NEEDS.get(defense)
    if method and not hasattr(_backend(backend_name), method):
        pytest.skip(f"backend {backend_name!r} does not implement Backend.{method} yet")


def _config(tiny_dirs, cache: Path, out: Path, backend_name: str, defense: str, **options: Any) -> ExperimentConfig:
    return ExperimentConfig(backend=backend_name, model=str(tiny_dirs["llama"]), teacher=None, attacker_rows=160,
                            user_rows=32, test_rows=40, attacker_epochs=1.0, user_epochs=1.0, lora_rank=4,
                            max_length=32, defenses=(defense,), defense_options={defense: options} if options else {},
                            cache_dir=str(cache), out=str(out))


def _rows(cfg: ExperimentConfig, pm: PluginManager | None = None) -> list[dict[str, Any]]:
    rows = run_experiment(cfg, pm, log=lambda _: None)["rows"]
    for row in rows:
        assert 0 <= row["CA"] <= 100 and 0 <= row["ASR"] <= 100, row
    return rows


def _only_dir(root: Path, **options: Any) -> Path:
    """The one cached artefact under ``root`` (built with these defense ``options``, when given)."""
    dirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if options:
        dirs = [p for p in dirs
                if options.items() <= json.loads((p / "_config.json").read_text())["options"].items()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_new_defenses_are_registered_and_keep_the_contract() -> None:
    found = get_plugin_manager().defenses()
    for name in NEW:
        assert found[name].package == "unbackdoor-defenses"
        check_defense_contract(found[name].obj)
        assert found[name].obj.__doc__ and found[name].obj.description


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize(("defense", "options"), [
    ("finetune", {"lr": "1e-3"}),
    ("quantize", {"group_size": "8"}),
    ("prune", {"prune_ratio": "0.25", "layers": "1"}),
    ("strip", {"n_perturb": "4", "calibration_rows": "40"}),
    ("onion", {"scorer": "LLAMA", "batch_size": "64"}),
])
def test_defense_runs_end_to_end(defense: str, options: dict[str, str], tiny_dirs, cache, tmp_path,
                                 backend_name) -> None:
    _require(backend_name, defense)
    options = {k: str(tiny_dirs["llama"]) if v == "LLAMA" else v for k, v in options.items()}
    released, row = _rows(_config(tiny_dirs, cache, tmp_path / "o", backend_name, defense, **options))
    assert released["stage"] == "poisoned (released)" and row["defense"] == defense
    assert "| poisoned + defense | " + defense in (tmp_path / "o" / "results.md").read_text()
    if defense == "strip":
        assert set(row["detection"]) == {"precision", "recall", "f1", "auroc", "threshold", "flagged", "positives"}
        assert row["stats"]["strip"]["calibration_rows"] == 40 and len(row["threshold_sweep"]) == 6
    elif defense == "onion":
        asr_rows = json.loads((tmp_path / "o" / "results.json").read_text())["data"]["asr_test"]
        # 40 clean rows, then triggered copies of all 40: the non-target ones (ASR) and the target ones (PACC)
        assert asr_rows < 40 and row["stats"]["onion"]["texts"] == 40 + 40
        assert 0 < row["stats"]["onion"]["removed"] < row["stats"]["onion"]["words"]
    else:
        assert row["stats"]["train"]["steps"] == 2  # 32 rows, batch 16, 1 epoch


def test_prune_zeroes_exactly_the_dormant_neurons(tiny_dirs, cache, tmp_path, backend_name) -> None:
    _require(backend_name, "prune")
    cfg = _config(tiny_dirs, cache, tmp_path / "o", backend_name, "prune", prune_ratio="0.25", finetune="false")
    assert _rows(cfg)[-1]["stats"]["pruned_per_layer"] == {"0": 16, "1": 16}  # 25% of 64 neurons per layer
    pruned_dir = _only_dir(cache / "pruned", prune_ratio=0.25, finetune=False)
    victim_dir = _only_dir(cache / "victim")
    chosen = {int(k): np.array(v) for k, v in json.loads((pruned_dir / "defense_stats.json").read_text())["pruned"].items()}
    victim, pruned = read_classifier(victim_dir), read_classifier(pruned_dir)
    layers = ffn_layers(victim.backbone)
    for name, before in victim.backbone.items():
        expected = before.copy()
        for i, idx in chosen.items():
            if name in layers[i].rows:
                expected[idx] = 0
            elif name in layers[i].columns:
                expected[:, idx] = 0
        np.testing.assert_array_equal(pruned.backbone[name], expected, err_msg=name)
    _check_activations(_backend(backend_name), victim_dir, pruned_dir, chosen, plan(cfg).user_train)


def _check_activations(backend: Any, victim_dir: Path, pruned_dir: Path, chosen: dict[int, np.ndarray], rows) -> None:
    """The chosen neurons were the least active on the user's rows, and are silent once pruned."""
    before = backend.mlp_activations(backend.load_classifier(victim_dir, 2), rows, batch_size=5, max_length=32)
    after = backend.mlp_activations(backend.load_classifier(pruned_dir, 2), rows, batch_size=7, max_length=32)
    assert [a.shape for a in before] == [(64,), (64,)]
    for i, idx in chosen.items():
        rest = np.setdiff1d(np.arange(64), idx)
        assert np.all(after[i][idx] == 0) and np.all(before[i][idx] > 0) and np.all(after[i][rest] > 0)
        assert before[i][idx].max() <= before[i][rest].min() * (1 + 1e-5)


def test_merge_endpoints_through_the_runner(tiny_dirs, cache, tmp_path, backend_name) -> None:
    released, merged = _rows(_config(tiny_dirs, cache, tmp_path / "a", backend_name, "merge", weight="1.0"))
    assert (merged["CA"], merged["ASR"]) == (released["CA"], released["ASR"])  # weight 1: the victim itself
    _rows(_config(tiny_dirs, cache, tmp_path / "b", backend_name, "merge", weight="0.0"))
    reference = read_classifier(_only_dir(cache / "merge-reference"))
    zero = read_classifier(_only_dir(cache / "merged", weight=0.0))
    assert zero.backbone.keys() == reference.backbone.keys()
    for part in ("backbone", "head"):
        for name, array in getattr(reference, part).items():
            np.testing.assert_array_equal(getattr(zero, part)[name], array, err_msg=name)


# ------------------------------------------------------------------------------------------ paraphrasers


@dataclass(frozen=True)
class DropTriggers(Paraphraser):
    """Test-only "paraphraser": removes the BadNet trigger words and records what it was asked."""

    name = "drop-triggers"
    description = "test-only: removes the words mn, cf, bb"
    calls: ClassVar[list[tuple[str, int]]] = []

    def paraphrase(self, texts: list[str], style: str) -> list[str]:
        DropTriggers.calls.append((style, len(texts)))
        return [" ".join(w for w in t.split() if w not in {"mn", "cf", "bb"}) for t in texts]


class FakeParaphrasers:
    @hookimpl
    def unbackdoor_paraphrasers(self) -> list[Paraphraser]:
        return [DropTriggers()]


@pytest.fixture
def paraphrasers(monkeypatch: pytest.MonkeyPatch) -> PluginManager:
    """The process-wide plugin manager, with the fake paraphraser registered."""
    pm = PluginManager()
    pm.register(FakeParaphrasers(), "fake-paraphrasers")
    monkeypatch.setattr(unbackdoor.plugins, "_DEFAULT", pm)
    DropTriggers.calls.clear()
    return pm


@pytest.mark.parametrize(("defense", "style"), [("backtranslate", "back-translation"), ("scpd", "S(NP)(VP)(.)")])
def test_paraphrase_defense_rewrites_every_input(defense: str, style: str, paraphrasers, tiny_dirs, cache, tmp_path,
                                                 backend_name) -> None:
    cfg = _config(tiny_dirs, cache, tmp_path / "o", backend_name, defense, paraphraser="drop-triggers")
    _, row = _rows(cfg, paraphrasers)
    asr_rows = json.loads((tmp_path / "o" / "results.json").read_text())["data"]["asr_test"]
    # clean rows, triggered non-target rows (ASR), triggered target-class rows (PACC)
    assert DropTriggers.calls == [(style, 40), (style, asr_rows), (style, 40 - asr_rows)]
    assert row["defense"] == defense


def test_paraphrase_defenses_name_what_is_missing(monkeypatch: pytest.MonkeyPatch, paraphrasers) -> None:
    scpd = paraphrasers.defense("scpd")
    with pytest.raises(ConfigError, match=r"unknown paraphraser 'nope'; set scpd.paraphraser to one of: drop-triggers"):
        scpd.configure(paraphraser="nope")
    monkeypatch.setattr(unbackdoor.plugins, "_DEFAULT", PluginManager(entry_points=False))
    with pytest.raises(ConfigError, match="no paraphraser plugin is installed; install one that implements "
                                          "the unbackdoor_paraphrasers hook"):
        scpd.configure(paraphraser="drop-triggers")


# ------------------------------------------------------------------------------------------ bad options


@pytest.mark.parametrize(("defense", "options", "message"), [
    ("prune", {"prune_ratio": "1.5"}, r"defense 'prune' option prune_ratio must be in \[0.0, 1.0\], got 1.5"),
    ("prune", {"layers": "-1"}, r"layers must be >= 0 \(0: every layer\), got -1"),
    ("quantize", {"group_size": "0"}, r"group_size must be >= 1 \(e.g. 32, 64, 128\), got 0"),
    ("quantize", {"bits": "9"}, "bits must be in 2..8, got 9"),
    ("merge", {"weight": "2"}, r"defense 'merge' option weight must be in \[0.0, 1.0\], got 2.0"),
    ("strip", {"mix": "blend"}, "unknown defense 'strip' option mix 'blend'; choose one of: interleave, replace"),
    ("strip", {"false_rejection_rate": "0"}, r"false_rejection_rate must be in \(0.0, 1.0\), got 0.0"),
    ("onion", {"batch_size": "0"}, "defense 'onion' option batch_size must be >= 1, got 0"),
    ("finetune", {"lr": "-1"}, "defense 'finetune' option lr must be >= 0"),
    ("w2s", {"alignment": "cls"}, "unknown W2S alignment 'cls'; choose one of: pooled, released, tokens"),
    ("w2s", {"reduce": "max"}, "defense 'w2s' option 'loss': unknown W2S reduce 'max'; choose one of: auto, mean, sum"),
    ("w2s", {"loss.reduce": "max"}, "option 'loss': unknown W2S reduce 'max'; choose one of: auto, mean, sum"),
    ("w2s", {"teacher_activation": "gelu"},
     "unknown w2s teacher_activation 'gelu'; choose one of: none, relu, tanh"),
])
def test_bad_options_are_clear_config_errors(defense: str, options: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        get_plugin_manager().defense(defense).configure(**options)


def test_a_loss_is_one_option_group_with_its_older_spellings() -> None:
    """w2s holds its W2SLoss as the option group ``loss``: ``loss.beta`` (a command line), a table (a config file)
    and the spelling from before the group (``beta``) set the same field; the run records the group as a dict."""
    from unbackdoor.attack import fields_of
    from unbackdoor.specs import W2SLoss

    w2s = get_plugin_manager().defense("w2s")
    dotted = w2s.configure(**{"loss.beta": "0.5", "loss.alignment": "released"})
    assert dotted == w2s.configure(loss={"beta": 0.5, "alignment": "released"}) == w2s.configure(beta="0.5",
                                                                                              alignment="released")
    assert dotted.loss == W2SLoss(beta=0.5, alignment="released", reduce="auto") and dotted.loss.reduction == "sum"
    assert fields_of(dotted)["loss"] == {"alpha": 1.0, "beta": 0.5, "gamma": 0.2, "temperature": 2.0,
                                         "alignment": "released", "reduce": "auto"}
    assert w2s.configure(**fields_of(dotted)) == dotted  # the recorded options rebuild the defense
    with pytest.raises(ConfigError, match=r"option 'loss.beta' is given twice \(under two spellings\)"):
        w2s.configure(beta="0.5", **{"loss.beta": "0.4"})


def test_bad_option_on_the_command_line_fails_before_training(tiny_dirs, tmp_path, capsys) -> None:
    code = main(["run", "--model", str(tiny_dirs["llama"]), "--defenses", "prune", "--defense-option",
                 "prune.prune_ratio=1.5", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "prune_ratio must be in [0.0, 1.0], got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------ ONION


@dataclass
class FakeLM:
    """``lm_nll`` = 1 + 2 * (number of "mn" words): the trigger makes a sentence less fluent."""

    calls: list[list[str]]

    def lm_nll(self, path: Path, texts: list[str], *, batch_size: int, max_length: int) -> np.ndarray:
        self.calls.append(list(texts))
        return np.array([1.0 + 2.0 * t.split().count("mn") for t in texts])


def test_onion_removes_the_outlier_word_keeps_one_word_inputs_and_never_empties() -> None:
    lm = FakeLM([])
    purify = OnionFilter(lm, Path("lm"), threshold=0.0, batch_size=4, max_length=16)
    got = purify(["a mn movie", "mn", "great", "", "mn mn", "a fine film"])
    assert got == ["a movie", "mn", "great", "", "mn", "a fine film"]
    assert len(lm.calls) == 1  # every sentence and variant in one batched call
    assert len(lm.calls[0]) == 4 + 3 + 4  # sentences of 2+ words: full text + one variant per word
    assert purify.stats == {"texts": 6, "words": 10, "removed": 2}
    assert OnionFilter(lm, Path("lm"), 100.0, 4, 16)(["a mn movie"]) == ["a mn movie"]  # high threshold keeps all


def test_leave_one_out_layout() -> None:
    texts, starts = leave_one_out([["a", "b", "c"], ["x"], [], ["d", "e"]])
    assert texts == ["a b c", "b c", "a c", "a b", "d e", "e", "d"]
    assert starts.tolist() == [0, -1, -1, 4]


def test_onion_with_a_real_lm_keeps_one_word_inputs(tiny_dirs, backend_name) -> None:
    _require(backend_name, "onion")
    purify = OnionFilter(_backend(backend_name), tiny_dirs["llama"], 0.0, 8, 33)
    got = purify(["mn", "movie", "a great movie mn", "bad"])
    assert got[0] == "mn" and got[1] == "movie" and got[3] == "bad"
    assert 1 <= len(got[2].split()) <= 4 and set(got[2].split()) <= {"a", "great", "movie", "mn"}


def test_lm_nll_matches_the_numpy_reference(tiny_dirs, backend_name) -> None:
    _require(backend_name, "onion")
    texts = ["a great movie", "movie", "", "the plot is thin but the acting is fine", "mn cf"]
    got = _backend(backend_name).lm_nll(tiny_dirs["llama"], texts, batch_size=2, max_length=8)
    ids, pad = causal_lm_inputs(tiny_dirs["llama"], texts, 8)
    assert [len(x) for x in ids] == [4, 2, 1, 8, 3]  # start token + words, cut to 8
    import torch
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.float32).eval()
    input_ids, mask = pad_batch(ids, pad)
    with torch.no_grad():
        logits = lm(input_ids=torch.from_numpy(input_ids).long(), attention_mask=torch.from_numpy(mask).long()).logits
    want = mean_token_nll(logits.numpy(), input_ids, mask)
    assert np.isnan(got[2]) and np.isnan(want[2])  # no token to predict
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ STRIP


def test_strip_perturbations_are_seeded_and_mix_words() -> None:
    pool = ["one two three", "four five"]
    first = perturb(["mn a movie", "great"], pool, 3, "replace", 0.5, seed=1)
    assert len(first) == 6 and first == perturb(["mn a movie", "great"], pool, 3, "replace", 0.5, seed=1)
    assert first != perturb(["mn a movie", "great"], pool, 3, "replace", 0.5, seed=2)
    rng = np.random.default_rng(0)
    mixed = mix_words("mn a movie", "one two", "interleave", 0.5, rng)
    assert sorted(mixed.split()) == sorted(["mn", "a", "movie", "one", "two"])
    kept = [w for w in mixed.split() if w in {"mn", "a", "movie"}]
    assert kept == ["mn", "a", "movie"]  # each row keeps its order
    assert mix_words("mn a movie", "one two", "replace", 1.0, rng).split()[0] in {"one", "two"}
    assert mix_words("mn a movie", "one two", "replace", 0.0, rng) == "mn a movie"


def test_a_backend_without_a_needed_method_gets_a_clear_error() -> None:
    from types import SimpleNamespace

    from unbackdoor.errors import BackendUnavailableError

    ctx = SimpleNamespace(backend=SimpleNamespace(name="jax"))
    for defense, method in (("onion", "lm_nll"), ("prune", "mlp_activations")):
        with pytest.raises(BackendUnavailableError, match=f"needs Backend.{method}, which backend 'jax' does not"):
            get_plugin_manager().defense(defense).apply(ctx)  # type: ignore[arg-type]


def test_docs_list_every_option_of_every_new_defense() -> None:
    from unbackdoor.attack import fields_of

    text = (Path(__file__).resolve().parents[1] / "docs" / "defenses.md").read_text(encoding="utf-8")
    for name in NEW:
        assert f"| `{name}` |" in text, f"docs/defenses.md: {name} missing from the overview table"
        heading = next(h for h in (f"## {name}\n", "## backtranslate and scpd\n") if h in text and name in h)
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        for option in fields_of(get_plugin_manager().defense(name)):
            assert f"`{option}`" in section, f"docs/defenses.md: option {name}.{option} is not documented"
