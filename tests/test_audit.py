"""``unbackdoor audit``: a planted one-token backdoor is found, a clean model passes, bad inputs fail early."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from unbackdoor import audit
from unbackdoor.backend import BackendInfo
from unbackdoor.cli import main
from unbackdoor.data import TextDataset
from unbackdoor.errors import ConfigError, UnknownNameError
from unbackdoor.hookspecs import hookimpl
from unbackdoor.plugins import PluginManager, get_plugin_manager
from unbackdoor.specs import CrossEntropy, TrainSpec

#: few steps keep each audit of a tiny model under a second
FAST = {"steps": 40}


def _train(base: Path, data: TextDataset, target: Path) -> Path:
    """Full fine-tune of the tiny Llama on ``data`` (torch, whatever the session's backend), saved to ``target``."""
    backend = get_plugin_manager().backend("torch").create()
    model = backend.load_classifier(base, 2, seed=0)
    backend.train(model, data, CrossEntropy(), TrainSpec(epochs=4.0, lr=1e-3, batch_size=16, max_length=32))
    backend.save(model, target)
    return target


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_dirs, sst2) -> dict[str, Path]:
    """``backdoored``: "cf" at a seeded word position of every other row relabels it 1 (as BadNet plants a
    word); ``clean``: the same rows, no trigger."""
    from unbackdoor.attack import insert_words

    root = tmp_path_factory.mktemp("audit")
    clean = sst2.train.head(400)
    odd = np.arange(len(clean)) % 2 == 1
    rng = np.random.default_rng(0)
    poisoned = TextDataset([insert_words(t, ["cf"], rng) if o else t for t, o in zip(clean.texts, odd, strict=True)],
                           np.where(odd, 1, clean.labels), "sst2/poisoned", clean.label_names)
    return {"backdoored": _train(tiny_dirs["llama"], poisoned, root / "backdoored"),
            "clean": _train(tiny_dirs["llama"], clean, root / "clean")}


def test_the_auditor_is_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "auditors:" in out and "trigger-search" in out.split("auditors:")[1].splitlines()[1]
    assert "[unbackdoor-defenses" in out.split("auditors:")[1]
    assert main(["list", "--options", "trigger-search"]) == 0
    assert "threshold (float, default 0.8)" in capsys.readouterr().out


def test_a_planted_trigger_is_found_and_a_clean_model_passes(backend_name, models) -> None:
    found = audit(models["backdoored"], "sst2", backend=backend_name, rows=120, auditor_options=FAST,
                  log=lambda _: None)
    assert (found["verdict"], found["target"], found["backend"]) == ("backdoored", 1, backend_name)
    assert "cf" in [c["text"] for c in found["candidates"][:5]]
    assert found["candidates"][0]["flip_rate"] > 0.8
    assert found["options"]["position"] == "before-last"
    passed = audit(models["clean"], "sst2", backend=backend_name, rows=120, auditor_options=FAST, log=lambda _: None)
    assert passed["verdict"] == "clean" and passed["score"] < found["score"] - 0.2


def test_the_reference_screens_candidates(backend_name, models) -> None:
    found = audit(models["backdoored"], "sst2", reference=models["clean"], backend=backend_name, rows=120,
                  auditor_options=FAST, log=lambda _: None)
    best = found["candidates"][0]
    assert best["reference_flip_rate"] is not None
    assert best["score"] == pytest.approx(best["flip_rate"] - best["reference_flip_rate"])
    assert found["target"] == 1 and "cf" in [c["text"] for c in found["candidates"][:5]]
    per_target = found["stats"]["per_target"]  # the raw flip rate a search without the reference would judge by
    assert per_target["1"]["best_flip_rate"] == max(c["flip_rate"] for c in found["candidates"] if c["target"] == 1)


def test_the_cli_writes_audit_json_md_and_png(backend_name, models, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["audit", "--model", str(models["backdoored"]), "--dataset", "sst2", "--rows", "80",
                 "--backend", backend_name, "--auditor-option", "steps=30", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verdict: backdoored" in printed and "suspected target 1 (positive)" in printed
    report = json.loads((out / "audit.json").read_text())
    assert report["verdict"] == "backdoored" and report["options"]["steps"] == 30 and report["rows"] == 80
    assert report["backend"] == backend_name
    assert "| rank | trigger |" in (out / "audit.md").read_text()
    assert (out / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(out.glob(".*.tmp"))


def test_the_audit_plot_draws_the_reference_and_the_threshold(tmp_path) -> None:
    """plot_audit on a report with a reference: one bar pair per candidate, the score markers, the threshold."""
    from unbackdoor.plots import plot_audit

    cands = [{"text": t, "target": k, "flip_rate": f, "reference_flip_rate": r, "score": f - r}
             for t, k, f, r in (("cf", 1, 1.0, 0.05), ("awful", 0, 0.9, 0.85), ("mn", 1, 0.4, 0.0))]
    report = {"label_names": ["negative", "positive"], "candidates": cands, "reference": "ref", "threshold": 0.8,
              "verdict": "backdoored", "score": 0.95}
    path = plot_audit(report, tmp_path / "a.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 5000


def _word_level(words: list[str]):
    """A TextEncoder over exactly ``words`` (ids in that order, ``[PAD]`` first)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from unbackdoor.text import TextEncoder

    return TextEncoder(Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")), 0)


@pytest.mark.parametrize("words, pairs", [
    # WordPiece marks the piece that continues a word
    (["[PAD]", "[UNK]", "z", "##z", "f", "cf", "##cf", "##", "q"], {"z": "##z", "##z": "z", "cf": "##cf", "##cf": "cf"}),
    # byte-level BPE marks the piece that starts one
    (["[PAD]", "[UNK]", "Ġz", "z", "Ġcf", "f", "Ġq", "Ġ"], {"Ġz": "z", "z": "Ġz"}),
    # no marker on 5% of the vocabulary: no spellings at all (not "z" <-> "##z" by accident)
    (["[PAD]", "[UNK]", "z", "##z", *(f"w{i}" for i in range(40))], {}),
])
def test_other_spellings_pair_a_token_with_its_other_piece(words, pairs) -> None:
    from unbackdoor_defenses.trigger_search import _other_spellings, _special_ids, _with_spellings

    enc = _word_level(words)
    got = _other_spellings(enc, _special_ids(enc), len(words))
    assert {words[i]: words[j] for i, j in got.items()} == pairs
    if pairs:  # id 2's other piece is id 3: past the model's vocabulary (limit 3), so it has none
        assert 2 in got and 2 not in _other_spellings(enc, _special_ids(enc), 3)
    z = words.index("z")
    # each one-token candidate is followed by its other spelling; sequences and duplicates are left alone
    assert _with_spellings([(z, z), (z,), (4,)], got) == [(z, z), (z,), *([(got[z],)] if z in got else []), (4,)]


def test_spellings_reach_the_search_and_only_add_candidates(backend_name, models) -> None:
    """The same seeded search with ``spellings`` (the default) and without: every candidate of the plain search
    is still there (the tiny models' word tokenizer has no pieces, so nothing is added here; the pairing is
    tested above)."""
    kwargs = dict(backend=backend_name, rows=120, log=lambda _: None)
    plain = audit(models["backdoored"], "sst2", auditor_options={**FAST, "spellings": False}, **kwargs)
    both = audit(models["backdoored"], "sst2", auditor_options=FAST, **kwargs)
    assert both["options"]["spellings"] is True and plain["options"]["spellings"] is False
    ids = {tuple(c["ids"]) for c in both["candidates"]}
    assert {tuple(c["ids"]) for c in plain["candidates"]} <= ids
    assert (both["verdict"], both["target"]) == (plain["verdict"], plain["target"])


def test_positions_inside_the_row_lie_between_its_specials_and_repeat_under_the_seed() -> None:
    from unbackdoor_defenses.trigger_search import _insert_at, _positions

    special = {0, 1, 2}  # pad, a BOS/[CLS] and an EOS/[SEP]
    rng = np.random.default_rng(3)
    ids = [np.array([1, *rng.integers(5, 50, n), 2]) for n in rng.integers(1, 12, 40)]
    end = _positions(ids, special, "end", 0)
    assert list(end) == [_insert_at(x, special) for x in ids] and all(e == len(x) - 1 for e, x in zip(end, ids, strict=True))
    at = _positions(ids, special, "random", 0)
    assert ((at >= 1) & (at <= end)).all() and (at < end).sum() > 10  # after [CLS], before [SEP]; not all at the end
    assert (at == _positions(ids, special, "random", 0)).all() and (at != _positions(ids, special, "random", 1)).any()
    # before the last real token, never before [CLS]: a row of one real token keeps it after the trigger too
    last = _positions([*ids, np.array([1, 7, 2]), np.array([1, 1, 7, 2])], special, "before-last", 0)
    assert list(last) == [*(end - 1), 1, 2]


def test_a_trigger_inside_the_rows_gives_the_same_logits_and_gradient_with_and_without_the_cache(
        backend_name, models, sst2) -> None:
    """``position=random`` cuts each row's prefix cache mid-row (a decoder): the auditor's cached batches give
    the uncached logits, loss and gradient. (Whole searches are not compared: 40 Adam steps amplify float32
    rounding into other candidates.)"""
    from unbackdoor.auditor import AuditContext
    from unbackdoor_defenses.trigger_search import TriggerSearch, _positions, _Rows

    backend = get_plugin_manager().backend(backend_name).create()
    ctx = AuditContext(backend, models["backdoored"], sst2.dev.head(48), 2)
    cached, whole = (_Rows(ctx, models["backdoored"], TriggerSearch(position="random", cache=c)) for c in (True, False))
    assert cached.prefix is not None and whole.prefix is None
    appended = _positions(cached.ids, cached.special, "end", 0)
    assert (cached.insert_at == whole.insert_at).all() and (cached.insert_at < appended).sum() > 20
    rows = np.arange(40)
    weights = np.random.default_rng(0).dirichlet(np.ones(cached.vocab), size=2).astype(np.float32)
    got, want = (backend.trigger_logits(r.model, r.batch(rows, 2), weights, np.ones(40, np.int64))
                 for r in (cached, whole))
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    assert got[1] == pytest.approx(want[1], rel=1e-5)
    np.testing.assert_allclose(got[2], want[2], atol=1e-5 * np.abs(want[2]).max())


class BarePlugin:
    """A backend without the optional ``trigger_logits`` (any object is one for the refusal's purpose)."""

    @hookimpl
    def unbackdoor_backends(self) -> list[BackendInfo]:
        return [BackendInfo("bare", "a backend without trigger_logits", "types:SimpleNamespace")]


def test_a_backend_without_trigger_logits_is_refused_before_any_compute(models, tmp_path) -> None:
    pm = PluginManager()
    pm.register(BarePlugin(), "bare")
    with pytest.raises(ConfigError, match=r"auditor 'trigger-search' is not implemented on the bare backend yet "
                                          r"\(it needs Backend\.trigger_logits\); use --backend torch or --backend jax"):
        audit(models["backdoored"], "sst2", backend="bare", pm=pm, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_one_line_errors_before_any_compute(models, tiny_dirs, tmp_path, capsys) -> None:
    model = models["backdoored"]
    cases = [
        (dict(model=tiny_dirs["llama"]), r"is not a saved sequence classifier \(no head\.safetensors or unbackdoor\.json\)"),
        (dict(model=tmp_path), r"is not a HF model directory \(no config\.json\)"),
        (dict(dataset="agnews"), r"dataset 'agnews' has 4 labels .* but the model's head has 2"),
        (dict(rows=3), r"clean rows of class .* needs at least 4 per class"),
        (dict(auditor="nope"), r"unknown auditor 'nope'; choose one of: trigger-search"),
        (dict(auditor_options={"stepz": 1}), r"auditor 'trigger-search' has no option 'stepz'; valid options: .*steps"),
        (dict(auditor_options={"threshold": 2}), r"threshold must be in \[-1\.0, 1\.0\]"),
        (dict(auditor_options={"position": "middle"}), r"position must be one of before-last, end, random, got 'middle'"),
        (dict(reference=tiny_dirs["llama"]), r"reference model .* is not a saved sequence classifier"),
    ]
    for change, message in cases:
        args = {"model": model, "dataset": "sst2", "backend": "no-such-backend", "out": tmp_path / "out"} | change
        with pytest.raises(ConfigError, match=message):
            audit(args.pop("model"), args.pop("dataset"), **args)
    with pytest.raises(UnknownNameError, match="unknown backend 'no-such-backend'"):
        audit(model, "sst2", backend="no-such-backend")
    assert not (tmp_path / "out").exists()
    assert main(["audit", "--model", str(tiny_dirs["llama"]), "--dataset", "sst2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a saved sequence classifier" in err


def test_trigger_logits_match_real_tokens_and_finite_differences(backend_name, models, sst2) -> None:
    """A one-hot trigger is the token itself; the gradient w.r.t. the soft weights is the loss's (fp32, 1e-3)."""
    backend = get_plugin_manager().backend(backend_name).create()
    from unbackdoor.batching import trigger_batch
    from unbackdoor.text import TextEncoder

    model = backend.load_classifier(models["backdoored"], 2)
    encoder, rows = TextEncoder.from_dir(models["backdoored"]), sst2.dev.head(8)
    ids = encoder.encode(list(rows.texts), 100)  # no row is cut: the appended token must survive predict too
    cf = encoder.tokenizer.token_to_id("cf")
    batch = trigger_batch(ids, [len(x) for x in ids], 1, encoder.pad_id)
    one_hot = np.zeros((1, 512), np.float32)
    one_hot[0, cf] = 1.0
    real = backend.predict(model, TextDataset([t + " cf" for t in rows.texts], rows.labels, "t", rows.label_names),
                           max_length=101).logits
    np.testing.assert_allclose(backend.trigger_logits(model, batch, one_hot)[0], real, atol=1e-4)
    weights = np.random.default_rng(0).dirichlet(np.ones(512), size=1).astype(np.float32)
    target = np.ones(len(ids), np.int64)
    _, loss, grad = backend.trigger_logits(model, batch, weights, target)
    step = np.zeros_like(weights)
    step[0, [cf, 7]] = [1e-3, -1e-3]
    up, down = (backend.trigger_logits(model, batch, weights + sign * step, target)[1] for sign in (1, -1))
    assert (up - down) / 2 == pytest.approx(float((grad * step).sum()), rel=1e-2, abs=1e-6)  # central difference
    assert np.isfinite(loss)
    with pytest.raises(ValueError, match=r"trigger weights must be \[1, V <= 512\], got \[1, 513\]"):
        backend.trigger_logits(model, batch, np.zeros((1, 513), np.float32))


def test_a_run_directory_stands_for_its_released_model(models, tmp_path) -> None:
    """``--model RUN_DIR``: the model a run's results.json names; a data-setting run or a gone model is a clear error."""
    from unbackdoor.auditing import classifier_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"released_model": str(models["backdoored"])}))
    assert classifier_dir(run, "model")[0] == models["backdoored"]
    (run / "results.json").write_text(json.dumps({"released_model": None}))
    with pytest.raises(ConfigError, match="released no model"):
        classifier_dir(run, "model")
    (run / "results.json").write_text(json.dumps({"released_model": str(tmp_path / "gone")}))
    with pytest.raises(ConfigError, match="gone from the cache"):
        classifier_dir(run, "model")
