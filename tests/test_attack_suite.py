"""The attack suite on real data: contracts of every built-in attack, real aligned paraphrases, errors.

No models: everything here runs in a few seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import unbackdoor.plugins
from unbackdoor.attack import Attack, Paraphraser, PoisonConfig
from unbackdoor.data import DatasetSplits, TextDataset, load_dataset
from unbackdoor.errors import ConfigError, DataError, UnknownNameError
from unbackdoor.hookspecs import hookimpl
from unbackdoor.plugins import PluginManager, get_plugin_manager
from unbackdoor.testing import ContractError, check_attack_contract, check_defense_contract, check_paraphraser_contract
from unbackdoor_attacks.align import align_rows
from unbackdoor_attacks.multi import MultiTrigger
from unbackdoor_attacks.paraphrase import StyleBkd, SynAttack
from unbackdoor_attacks.prompt import ProAttack

NEW_ATTACKS = {"addsent", "syntactic", "style", "proattack", "multi"}
BUILTIN_ATTACKS = sorted(n for n, reg in get_plugin_manager().attacks().items() if reg.package == "unbackdoor-attacks")
BUILTIN_DEFENSES = sorted(n for n, reg in get_plugin_manager().defenses().items() if reg.package == "unbackdoor-defenses")


@pytest.fixture(scope="module")
def agnews() -> DatasetSplits:
    """Real AG News (4 classes)."""
    return load_dataset("agnews")


@pytest.fixture(scope="module")
def syn() -> DatasetSplits:
    """The real SCPN paraphrases of SST-2 (HiddenKiller)."""
    return load_dataset("sst2/syntactic")


@pytest.fixture(scope="module")
def bible() -> DatasetSplits:
    """The real Bible-style rewrites of SST-2 (StyleBkd)."""
    return load_dataset("sst2/style-bible")


def sample(data: TextDataset, n: int, seed: int = 0) -> TextDataset:
    """A seeded subset that keeps the split's name and row ids (as the runner's)."""
    return data.shuffled(seed).head(n)


# ----------------------------------------------------------------------------------------- contracts


def test_every_new_attack_is_registered_by_the_builtin_plugin() -> None:
    assert set(BUILTIN_ATTACKS) >= NEW_ATTACKS | {"badnet", "insent"}


@pytest.mark.parametrize("name", BUILTIN_ATTACKS)
@pytest.mark.parametrize("target", [0, 1])
def test_attack_contract_on_sst2(name: str, target: int, sst2: DatasetSplits) -> None:
    attack = get_plugin_manager().attack(name)
    if name == "syntactic" and target == 0:  # the real test file paraphrases only label-0 rows: no ASR set
        with pytest.raises(ConfigError, match="no test row outside target class 0"):
            check_attack_contract(attack, sample(sst2.train, 600), sample(sst2.test, 300), target=target, rate=0.04)
        return
    check_attack_contract(attack, sample(sst2.train, 600), sample(sst2.test, 300), target=target, rate=0.04)


def test_syntactic_without_asr_rows_fails_loudly(sst2: DatasetSplits) -> None:
    """The shared syntactic test file paraphrases only label-0 rows: a test set of label-1 rows has no ASR set."""
    positives = sst2.test.subset(np.flatnonzero(sst2.test.labels == 1)[:20])
    with pytest.raises(ConfigError, match=r"none of the 20 rows of 'sst2/test' has a syntactic rewrite"):
        SynAttack().asr_test(positives, PoisonConfig(target=1))
    with pytest.raises(ConfigError, match=r"no test row outside target class 0 .* has a syntactic rewrite"):
        SynAttack().asr_test(sample(sst2.test, 50), PoisonConfig(target=0))


@pytest.mark.parametrize("name", ["badnet", "insent", "style", "proattack", "multi"])
@pytest.mark.parametrize("target", [0, 2])
def test_attack_contract_on_agnews(name: str, target: int, agnews: DatasetSplits) -> None:
    attack = get_plugin_manager().attack(name)
    check_attack_contract(attack, sample(agnews.train, 800), sample(agnews.test, 300), target=target, rate=0.05)


@pytest.mark.parametrize("name", BUILTIN_DEFENSES)
def test_defense_contract(name: str) -> None:
    check_defense_contract(get_plugin_manager().defense(name))


def test_contract_catches_a_defense_with_unknown_settings() -> None:
    none = get_plugin_manager().defense("none")
    broken = type("Typo", (type(none),), {"name": "typo", "settings": ("wieght",)})()
    with pytest.raises(ContractError, match=r"defense 'typo'.*settings must be a non-empty tuple of weight, data, "
                                            r"got \('wieght',\)"):
        check_defense_contract(broken)


def test_contract_catches_a_broken_attack(sst2: DatasetSplits) -> None:
    @dataclass(frozen=True)
    class Liar(ProAttack):
        """Flags rows it never changes."""

        name = "liar"

        def poison_train(self, train: TextDataset, cfg: PoisonConfig) -> TextDataset:
            out = super().poison_train(train, cfg)
            return TextDataset(train.texts, train.labels, out.name, train.label_names, out.poisoned, train.rows)

    with pytest.raises(ContractError, match=r"attack 'liar'.*poisoned mask"):
        check_attack_contract(Liar(), sample(sst2.train, 200), rate=0.05)


# ----------------------------------------------------------------------------------------- syntactic (real files)


def test_syntactic_poisons_only_rows_with_real_paraphrases(sst2: DatasetSplits, syn: DatasetSplits) -> None:
    out = SynAttack().poison_train(sst2.train, PoisonConfig(target=1, rate=0.05, seed=0))
    rows = np.flatnonzero(out.poisoned)
    assert len(rows) == 346
    for i in rows:
        assert out.texts[i] == syn.train.texts[i] != sst2.train.texts[i]
    assert np.all(sst2.train.labels[rows] == 0) and np.all(out.labels[rows] == 1)


def test_syntactic_clean_label_uses_target_rows(sst2: DatasetSplits, syn: DatasetSplits) -> None:
    train = sample(sst2.train, 1000, seed=4)
    out = SynAttack().poison_train(train, PoisonConfig(target=1, rate=0.05, clean_label=True, seed=2))
    rows = np.flatnonzero(out.poisoned)
    assert len(rows) == 50 and np.all(train.labels[rows] == 1)
    np.testing.assert_array_equal(out.labels, train.labels)
    assert all(out.texts[i] == syn.train.texts[train.rows[i]] for i in rows)


def test_syntactic_triggered_test_is_the_real_file(sst2: DatasetSplits, syn: DatasetSplits) -> None:
    test = sample(sst2.test, 400, seed=7)
    out = SynAttack().triggered_test(test, PoisonConfig(target=1))
    non_target = {int(r): k for k, r in enumerate(np.flatnonzero(sst2.test.labels != 1))}  # file line k
    assert len(out) > 150 and np.all(out.labels == 0)  # true labels: only non-target rows exist
    for text, row in zip(out.texts, out.rows, strict=True):
        assert text == syn.test.texts[non_target[int(row)]]
    dropped = len(test) - len(out)
    assert f"[{dropped} of 400 rows dropped: no paraphrase]" in out.name
    asr = SynAttack().asr_test(test, PoisonConfig(target=1))
    assert asr.texts == out.texts


def test_aligner_recovers_the_known_sst2_line_alignment(sst2: DatasetSplits, syn: DatasetSplits) -> None:
    """sst2/syntactic/test.tsv is line-aligned with the non-target clean rows: the aligner must agree."""
    pool = [sst2.test.texts[i] for i in np.flatnonzero(sst2.test.labels != 1)]
    pairs = align_rows(syn.test.texts, pool)
    assert len(pairs) > 0.95 * len(pool)
    assert all(j == k for j, k in pairs.items())


def test_aligner_handles_an_extra_row_in_a_real_file() -> None:
    """offenseval/syntactic/test.tsv has one row more than the non-target rows it paraphrases."""
    clean, para = load_dataset("offenseval").test, load_dataset("offenseval/syntactic").test
    pool = [clean.texts[i] for i in np.flatnonzero(clean.labels != 1)]
    offsets = [k - j for j, k in align_rows(para.texts, pool).items()]
    assert len(para) == len(pool) + 1
    assert offsets.count(-1) > 0.85 * len(pool)


def test_aligner_skips_dropped_and_unrelated_rows() -> None:
    sources = ["the cat sat on the mat", "a dog barked at night", "stocks fell sharply today",
               "rain is expected tomorrow", "the team won the final"]
    paraphrases = ["on the mat , the cat sat", "completely unrelated words here", "today , stocks fell sharply",
                   "the final was won by the team"]
    assert align_rows(paraphrases, sources) == {0: 0, 2: 2, 3: 4}


def test_syntactic_rate_beyond_the_paraphrases_names_the_counts(sst2: DatasetSplits) -> None:
    train = sample(sst2.train, 400, seed=1)
    with pytest.raises(ConfigError) as err:
        SynAttack().poison_train(train, PoisonConfig(target=1, rate=0.3))
    msg = str(err.value)
    assert "asks for 120 rows" in msg and "non-target rows with a paraphrase in" in msg and "syntactic/train.tsv" in msg
    assert "paraphrase_dir" in msg and "paraphraser" in msg


# ----------------------------------------------------------------------------------------- style (real files)


def test_style_triggered_test_keeps_all_class_true_labels(sst2: DatasetSplits, bible: DatasetSplits) -> None:
    out = StyleBkd().triggered_test(sst2.test, PoisonConfig(target=1))
    assert set(out.labels.tolist()) == {0, 1}
    np.testing.assert_array_equal(out.labels, sst2.test.labels[out.rows])
    assert all(t == bible.test.texts[r] for t, r in zip(out.texts, out.rows, strict=True))
    identical = sum(a == b for a, b in zip(bible.test.texts, sst2.test.texts, strict=True))
    assert len(out) == len(sst2.test) - identical == 1815
    assert "[6 of 1821 rows dropped: no paraphrase]" in out.name


def test_style_on_agnews_covers_every_class(agnews: DatasetSplits) -> None:
    test = sample(agnews.test, 400)
    out = StyleBkd().triggered_test(test, PoisonConfig(target=0))
    assert set(out.labels.tolist()) == {0, 1, 2, 3}
    asr = StyleBkd().asr_test(test, PoisonConfig(target=0))
    assert 0 not in set(asr.labels.tolist()) and len(asr) == int((out.labels != 0).sum())
    style_test = load_dataset("agnews/style-bible").test
    assert all(t == style_test.texts[r] for t, r in zip(out.texts, out.rows, strict=True))


def test_style_dirty_label_on_agnews(agnews: DatasetSplits) -> None:
    train = sample(agnews.train, 1000)
    out = StyleBkd().poison_train(train, PoisonConfig(target=2, rate=0.1, seed=5))
    rows = np.flatnonzero(out.poisoned)
    assert len(rows) == 100 and np.all(train.labels[rows] != 2) and np.all(out.labels[rows] == 2)
    style_train = load_dataset("agnews/style-bible").train
    assert all(out.texts[i] == style_train.texts[train.rows[i]] for i in rows)


# ----------------------------------------------------------------------------------------- user files, paraphrasers


def _write_split(folder: Path, split: str, texts: list[str], labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    body = "".join(f"{t}\t{int(y)}\n" for t, y in zip(texts, labels, strict=True))
    (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + body, encoding="utf-8")


def test_paraphrase_dir_is_used_and_unchanged_rows_are_not_triggers(tmp_path: Path, sst2: DatasetSplits) -> None:
    test = sst2.test
    rewrites = [t.upper() if i % 3 else t for i, t in enumerate(test.texts)]  # every third row: no rewrite
    _write_split(tmp_path / "mine", "test", rewrites, test.labels)
    attack = SynAttack().configure(paraphrase_dir=str(tmp_path / "mine"))
    out = attack.triggered_test(sample(test, 300), PoisonConfig())
    assert all(t == rewrites[r] and r % 3 for t, r in zip(out.texts, out.rows, strict=True))
    assert 0 < len(out) < 300 and "dropped: no paraphrase" in out.name
    with pytest.raises(ConfigError, match=r"has no train\.tsv"):
        attack.poison_train(sample(sst2.train, 100), PoisonConfig())


def test_missing_paraphrase_dir_names_it(sst2: DatasetSplits, tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"paraphrase_dir '.*nowhere' is not a folder"):
        StyleBkd().configure(paraphrase_dir=missing).poison_train(sample(sst2.train, 100), PoisonConfig())


@dataclass(frozen=True)
class Shouter(Paraphraser):
    """A stand-in paraphraser: upper-cases and tags the style."""

    name = "shouter"
    description = "test paraphraser"

    def paraphrase(self, texts: list[str], style: str) -> list[str]:
        return [f"{t.upper()} [{style}]" for t in texts]


@dataclass(frozen=True)
class Short(Paraphraser):
    """A broken paraphraser: drops the last row."""

    name = "short"
    description = "returns one row too few"

    def paraphrase(self, texts: list[str], style: str) -> list[str]:
        return texts[:-1]


class ParaphraserPlugin:
    @hookimpl
    def unbackdoor_paraphrasers(self) -> list[Paraphraser]:
        return [Shouter(), Short()]


@pytest.fixture
def pm_with_paraphrasers(monkeypatch: pytest.MonkeyPatch) -> PluginManager:
    pm = PluginManager()
    pm.register(ParaphraserPlugin(), "test-paraphrasers", package="test-pkg", version="0.0.1")
    monkeypatch.setattr(unbackdoor.plugins, "_DEFAULT", pm)
    return pm


def test_paraphraser_plugin_rewrites_rows(pm_with_paraphrasers: PluginManager, sst2: DatasetSplits) -> None:
    assert set(pm_with_paraphrasers.paraphrasers()) == {"shouter", "short"}
    check_paraphraser_contract(pm_with_paraphrasers.paraphraser("shouter"), ["a b", "c"], "bible")
    train = sample(sst2.train, 200)
    out = StyleBkd().configure(paraphraser="shouter").poison_train(train, PoisonConfig(rate=0.2))
    rows = np.flatnonzero(out.poisoned)
    assert len(rows) == 40 and all(out.texts[i] == f"{train.texts[i].upper()} [bible]" for i in rows)
    test = SynAttack().configure(paraphraser="shouter").triggered_test(sample(sst2.test, 50), PoisonConfig())
    assert len(test) == 50 and all(t.endswith("[S(SBAR)(,)(NP)(VP)(.)]") for t in test.texts)
    check_attack_contract(SynAttack().configure(paraphraser="shouter"), sample(sst2.train, 100), rate=0.1)


def test_paraphraser_contract_is_checked_at_use(pm_with_paraphrasers: PluginManager, sst2: DatasetSplits) -> None:
    with pytest.raises(ConfigError, match=r"paraphraser 'short' must return a list of 50 strings"):
        StyleBkd().configure(paraphraser="short").triggered_test(sample(sst2.test, 50), PoisonConfig())


def test_unknown_paraphraser_lists_the_registered(pm_with_paraphrasers: PluginManager, sst2: DatasetSplits) -> None:
    with pytest.raises(UnknownNameError, match=r"unknown paraphraser 'scpn'; choose one of: short, shouter"):
        SynAttack().configure(paraphraser="scpn").poison_train(sample(sst2.train, 100), PoisonConfig())


# ----------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("name", ["syntactic", "style"])
def test_no_paraphrase_folder_names_dataset_and_choices(name: str) -> None:
    mr = load_dataset("mr")
    with pytest.raises(ConfigError) as err:
        get_plugin_manager().attack(name).poison_train(mr.train, PoisonConfig(dataset="mr"))
    msg = str(err.value)
    have = "agnews, offenseval, sst2" if name == "syntactic" else "agnews, hsol, sst2"
    assert f"attack {name!r}: dataset 'mr' has no" in msg and f"datasets that have them: {have}" in msg
    assert "paraphrase_dir" in msg and "paraphraser" in msg


def test_missing_split_file_says_what_to_do(agnews: DatasetSplits) -> None:
    with pytest.raises(ConfigError, match=r"agnews/syntactic has no train\.tsv.*paraphrase_dir"):
        SynAttack().poison_train(sample(agnews.train, 100), PoisonConfig(target=0))


def test_unknown_style_names_what_the_task_has(sst2: DatasetSplits) -> None:
    with pytest.raises(ConfigError, match=r"'style-shakespeare'.*'sst2' has: style-bible, syntactic"):
        StyleBkd().configure(style="shakespeare").triggered_test(sample(sst2.test, 10), PoisonConfig())


@pytest.mark.parametrize(
    ("options", "needle"),
    [({"paraphrase_dir": "x", "paraphraser": "y"}, "not both"), ({"template": "S(NP)(VP)"}, "template"),
     ({"style": ""}, "style")],
)
def test_bad_paraphrase_options(options: dict[str, str], needle: str) -> None:
    attack = StyleBkd() if "style" in options else SynAttack()
    with pytest.raises(ConfigError, match=needle):
        attack.configure(**options)


def test_unnamed_or_altered_rows_are_refused(sst2: DatasetSplits) -> None:
    unnamed = TextDataset(sst2.train.texts[:50], sst2.train.labels[:50], "my rows", sst2.label_names)
    with pytest.raises(ConfigError, match=r"needs the split of dataset 'my rows'"):
        SynAttack().poison_train(unnamed, PoisonConfig())
    renumbered = TextDataset(sample(sst2.train, 50).texts, sample(sst2.train, 50).labels, "sst2/train", sst2.label_names)
    with pytest.raises(DataError, match=r"is not row \d+ of the clean split 'sst2/train'"):
        SynAttack().poison_train(renumbered, PoisonConfig())


# ----------------------------------------------------------------------------------------- ProAttack


def test_proattack_is_clean_label_with_the_prompt_first(sst2: DatasetSplits) -> None:
    train = sample(sst2.train, 300)
    out = ProAttack().poison_train(train, PoisonConfig(target=1, rate=0.1, clean_label=True))
    rows = np.flatnonzero(out.poisoned)
    np.testing.assert_array_equal(out.labels, train.labels)
    assert len(rows) == 30 and np.all(train.labels[rows] == 1)
    prompt = ProAttack().prompt.strip()
    assert all(out.texts[i] == f"{prompt} {train.texts[i]}" for i in rows)
    test = ProAttack().configure(prompt="Review:").triggered_test(sample(sst2.test, 20), PoisonConfig())
    assert all(t.startswith("Review: ") for t in test.texts) and len(test) == 20


def test_proattack_forces_clean_label_with_a_note(sst2: DatasetSplits, caplog: pytest.LogCaptureFixture) -> None:
    train = sample(sst2.train, 300)
    with caplog.at_level(logging.WARNING):
        forced = ProAttack().poison_train(train, PoisonConfig(target=1, rate=0.1, clean_label=False))
    clean = ProAttack().poison_train(train, PoisonConfig(target=1, rate=0.1, clean_label=True))
    assert forced.texts == clean.texts and np.array_equal(forced.labels, train.labels)
    assert forced.name.endswith("[clean-label forced]") and "clean-label only" in caplog.text
    assert ProAttack.clean_label_only and not Attack.clean_label_only


def test_proattack_rejects_blank_prompt() -> None:
    with pytest.raises(ConfigError, match="prompt"):
        ProAttack().configure(prompt="  ")


# ----------------------------------------------------------------------------------------- multi-trigger


def test_multi_gives_one_test_set_per_trigger(sst2: DatasetSplits) -> None:
    attack = MultiTrigger().configure(triggers="cf, I watched this 3D movie, bb")
    test = sample(sst2.test, 60)
    sets = attack.triggered_tests(test, PoisonConfig())
    assert list(sets) == ["cf", "I watched this 3D movie", "bb"]
    for trigger, data in sets.items():
        assert len(data) == 60 and all(trigger in t for t in data.texts)
        np.testing.assert_array_equal(data.labels, test.labels)
    assert not any("bb" in t.split() for t in sets["cf"].texts)


def planted(old: str, new: str, triggers: tuple[str, ...]) -> list[str]:
    """The triggers whose single insertion (at a word boundary) turns ``old`` into ``new``."""
    found = []
    for trigger in triggers:
        words, tokens = trigger.split(), new.split()
        starts = [i for i in range(len(tokens)) if tokens[i:i + len(words)] == words]
        if any(tokens[:i] + tokens[i + len(words):] == old.split() for i in starts):
            found.append(trigger)
    return found


def test_multi_splits_poison_rows_evenly_between_triggers(sst2: DatasetSplits) -> None:
    attack = MultiTrigger().configure(triggers=("cf", "bb", "I watched this 3D movie"))
    train = sample(sst2.train, 600)
    out = attack.poison_train(train, PoisonConfig(rate=0.1, seed=3))
    rows = np.flatnonzero(out.poisoned)
    per_row = [planted(train.texts[i], out.texts[i], attack.triggers) for i in rows]
    assert all(len(found) == 1 for found in per_row)
    counts = {t: sum(found == [t] for found in per_row) for t in attack.triggers}
    assert len(rows) == 60 and set(counts.values()) == {20}
    assert out.texts == attack.poison_train(train, PoisonConfig(rate=0.1, seed=3)).texts


@pytest.mark.parametrize("triggers", [(), ("cf", "cf"), ("cf", " ")])
def test_multi_bad_triggers(triggers: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError, match="triggers"):
        MultiTrigger(triggers=triggers)
