"""Tests of the built-in insertion attacks (BadNet, InSent): row choice, triggers, options, errors."""

from __future__ import annotations

import numpy as np
import pytest

from unbackdoor.attack import InsertionAttack, PoisonConfig
from unbackdoor.data import DATA_DIR_ENV, DatasetSplits, TextDataset, default_data_dir, load_dataset
from unbackdoor.errors import ConfigError
from unbackdoor.plugins import get_plugin_manager
from unbackdoor_attacks.insertion import BadNet, InSent

INSENT_SENTENCE = "I watched this 3D movie"  # the SST-2 default (and the fallback for unnamed tasks)

# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def small() -> TextDataset:
    """20 rows, 12 negative / 8 positive; odd whitespace so 'unchanged' means byte for byte."""
    texts = [f"row {i}  has  double spaces\tand a tab " if i % 4 == 0 else f"plain sentence number {i}" for i in range(20)]
    labels = [0, 1, 0, 0, 1] * 4
    return TextDataset(texts, np.array(labels), "small", ("negative", "positive"))


@pytest.fixture(scope="module")
def sst2() -> DatasetSplits:
    """Real SST-2 from the shared data dir."""
    if not (default_data_dir() / "sst2" / "clean" / "train.tsv").is_file():
        pytest.fail(f"shared data not found at {default_data_dir()}; set {DATA_DIR_ENV}")
    return load_dataset("sst2")


# ----------------------------------------------------------------------------------------- helpers


def extra_tokens(old: str, new: str) -> list[str]:
    """The tokens ``new`` has on top of ``old``; fails unless ``old``'s tokens are a subsequence of ``new``'s."""
    o, extras, j = old.split(), [], 0
    for tok in new.split():
        if j < len(o) and tok == o[j]:
            j += 1
        else:
            extras.append(tok)
    assert j == len(o), f"original tokens of {old!r} are not kept in order in {new!r}"
    return extras


def assert_has_trigger(attack: InsertionAttack, old: str, new: str) -> None:
    """``new`` is ``old`` plus exactly the attack's trigger."""
    if isinstance(attack, BadNet):
        extras = extra_tokens(old, new)
        assert len(extras) == attack.count, (old, new)
        assert set(extras) <= set(attack.words), (old, new)
    else:
        assert isinstance(attack, InSent)
        sentence = attack.sentence_for()
        assert sentence in new, (old, new)
        assert new.replace(sentence, " ", 1).split() == old.split(), (old, new)


ATTACKS = [BadNet(), InSent()]
IDS = ["badnet", "insent"]

# ----------------------------------------------------------------------------------------- registration


def test_builtin_attacks_come_through_entry_points() -> None:
    pm = get_plugin_manager()
    badnet, insent = pm.attack("badnet"), pm.attack("insent")
    assert isinstance(badnet, BadNet) and badnet == BadNet()
    assert isinstance(insent, InSent) and insent.sentence_for("sst2") == INSENT_SENTENCE
    assert pm.attacks()["badnet"].package == "unbackdoor-attacks"


# ----------------------------------------------------------------------------------------- dirty label


def check_dirty_label(attack: InsertionAttack, data: TextDataset, cfg: PoisonConfig) -> TextDataset:
    out = attack.poison_train(data, cfg)
    rows = np.flatnonzero(out.poisoned)
    assert len(out) == len(data)
    assert len(rows) == round(cfg.rate * len(data))
    assert out.poisoned.dtype == bool
    # poisoned rows: non-target before, target now, trigger inserted
    assert np.all(data.labels[rows] != cfg.target)
    assert np.all(out.labels[rows] == cfg.target)
    for i in rows:
        assert_has_trigger(attack, data.texts[i], out.texts[i])
    # every other row unchanged byte for byte, label included
    keep = np.flatnonzero(~out.poisoned)
    assert all(out.texts[i] == data.texts[i] for i in keep)
    np.testing.assert_array_equal(out.labels[keep], data.labels[keep])
    # the mask marks exactly the changed rows
    changed = np.array([a != b for a, b in zip(out.texts, data.texts, strict=True)])
    np.testing.assert_array_equal(changed, out.poisoned)
    assert out.label_names == data.label_names
    assert attack.name in out.name
    return out


@pytest.mark.parametrize("attack", ATTACKS, ids=IDS)
def test_dirty_label_small(attack: InsertionAttack, small: TextDataset) -> None:
    before = small.texts, small.labels.copy()
    out = check_dirty_label(attack, small, PoisonConfig(target=1, rate=0.25, seed=3))
    assert out.poisoned.sum() == 5
    # the input is not modified in place
    assert small.texts == before[0]
    np.testing.assert_array_equal(small.labels, before[1])
    assert not small.poisoned.any()


@pytest.mark.parametrize("attack", ATTACKS, ids=IDS)
def test_dirty_label_sst2(attack: InsertionAttack, sst2: DatasetSplits) -> None:
    out = check_dirty_label(attack, sst2.train, PoisonConfig(target=1, rate=0.1, seed=0))
    assert out.poisoned.sum() == round(0.1 * len(sst2.train)) == 692


def test_dirty_label_target_zero(small: TextDataset) -> None:
    out = check_dirty_label(BadNet(), small, PoisonConfig(target=0, rate=0.4, seed=1))
    assert out.poisoned.sum() == 8  # every positive row flipped to 0
    assert np.all(out.labels == 0)


def test_rate_zero_poisons_nothing(small: TextDataset) -> None:
    out = BadNet().poison_train(small, PoisonConfig(rate=0.0))
    assert not out.poisoned.any()
    assert out.texts == small.texts


# ----------------------------------------------------------------------------------------- clean label


@pytest.mark.parametrize("attack", ATTACKS, ids=IDS)
def test_clean_label_touches_only_target_rows(attack: InsertionAttack, small: TextDataset) -> None:
    cfg = PoisonConfig(target=1, rate=0.25, clean_label=True, seed=2)
    out = attack.poison_train(small, cfg)
    rows = np.flatnonzero(out.poisoned)
    assert len(rows) == 5
    assert np.all(small.labels[rows] == 1)
    np.testing.assert_array_equal(out.labels, small.labels)  # labels untouched
    for i in rows:
        assert_has_trigger(attack, small.texts[i], out.texts[i])
    for i in np.flatnonzero(~out.poisoned):
        assert out.texts[i] == small.texts[i]


def test_clean_label_sst2(sst2: DatasetSplits) -> None:
    train = sst2.train
    out = InSent().poison_train(train, PoisonConfig(target=0, rate=0.2, clean_label=True, seed=5))
    rows = np.flatnonzero(out.poisoned)
    assert len(rows) == round(0.2 * len(train))
    assert np.all(train.labels[rows] == 0)
    np.testing.assert_array_equal(out.labels, train.labels)


def test_clean_label_asking_too_many_rows(small: TextDataset) -> None:
    # 8 positive rows; rate 0.5 of 20 rows asks for 10
    with pytest.raises(ConfigError, match="10") as err:
        BadNet().poison_train(small, PoisonConfig(target=1, rate=0.5, clean_label=True))
    assert "8" in str(err.value) and "target-class" in str(err.value)


def test_dirty_label_asking_too_many_rows(small: TextDataset) -> None:
    # 12 negative rows; rate 0.7 of 20 asks for 14
    with pytest.raises(ConfigError, match="14") as err:
        BadNet().poison_train(small, PoisonConfig(target=1, rate=0.7))
    assert "12" in str(err.value) and "non-target" in str(err.value)


# ----------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("attack", ATTACKS, ids=IDS)
def test_same_seed_same_output(attack: InsertionAttack, sst2: DatasetSplits) -> None:
    cfg = PoisonConfig(rate=0.05, seed=11)
    a, b = attack.poison_train(sst2.train, cfg), attack.poison_train(sst2.train, cfg)
    assert a.texts == b.texts
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.poisoned, b.poisoned)
    t1, t2 = attack.triggered_test(sst2.test, cfg), attack.triggered_test(sst2.test, cfg)
    assert t1.texts == t2.texts


@pytest.mark.parametrize("attack", ATTACKS, ids=IDS)
def test_different_seed_different_rows(attack: InsertionAttack, sst2: DatasetSplits) -> None:
    a = attack.poison_train(sst2.train, PoisonConfig(rate=0.05, seed=0))
    b = attack.poison_train(sst2.train, PoisonConfig(rate=0.05, seed=1))
    assert a.poisoned.sum() == b.poisoned.sum()
    assert not np.array_equal(a.poisoned, b.poisoned)
    assert a.texts != b.texts


def test_different_seed_different_positions(small: TextDataset) -> None:
    t0 = BadNet().triggered_test(small, PoisonConfig(seed=0))
    t1 = BadNet().triggered_test(small, PoisonConfig(seed=1))
    assert t0.texts != t1.texts


# ----------------------------------------------------------------------------------------- test sets


@pytest.mark.parametrize("attack", ATTACKS, ids=IDS)
def test_triggered_test_keeps_true_labels(attack: InsertionAttack, sst2: DatasetSplits) -> None:
    test = sst2.test
    out = attack.triggered_test(test, PoisonConfig(target=1))
    assert len(out) == len(test)
    np.testing.assert_array_equal(out.labels, test.labels)
    assert out.poisoned.all()
    for old, new in zip(test.texts, out.texts, strict=True):
        assert_has_trigger(attack, old, new)


@pytest.mark.parametrize("attack", ATTACKS, ids=IDS)
@pytest.mark.parametrize("target", [0, 1])
def test_asr_test_keeps_only_non_target_rows(attack: InsertionAttack, small: TextDataset, target: int) -> None:
    cfg = PoisonConfig(target=target, seed=4)
    asr = attack.asr_test(small, cfg)
    keep = np.flatnonzero(small.labels != target)
    assert len(asr) == len(keep) == (12 if target == 1 else 8)
    assert np.all(asr.labels != target)
    np.testing.assert_array_equal(asr.labels, small.labels[keep])
    assert asr.poisoned.all()
    triggered = attack.triggered_test(small, cfg)
    assert asr.texts == tuple(triggered.texts[i] for i in keep)
    for i, new in zip(keep, asr.texts, strict=True):
        assert_has_trigger(attack, small.texts[i], new)


def test_asr_test_sst2(sst2: DatasetSplits) -> None:
    asr = BadNet().asr_test(sst2.test, PoisonConfig(target=1))
    assert len(asr) == int((sst2.test.labels != 1).sum())
    assert np.all(asr.labels == 0)


# ----------------------------------------------------------------------------------------- options


def test_badnet_configure_words_and_count(sst2: DatasetSplits) -> None:
    attack = get_plugin_manager().attack("badnet").configure(words=("cf", "bb"), count=2)
    assert isinstance(attack, BadNet)
    assert attack.words == ("cf", "bb") and attack.count == 2
    assert BadNet().words == ("mn",)  # the default object is not changed
    train = sst2.train
    out = attack.poison_train(train, PoisonConfig(rate=0.05, seed=0))
    seen: set[str] = set()
    for i in np.flatnonzero(out.poisoned):
        extras = extra_tokens(train.texts[i], out.texts[i])
        assert len(extras) == 2
        assert set(extras) <= {"cf", "bb"}
        seen.update(extras)
    assert seen == {"cf", "bb"}  # over ~350 rows both words get drawn


def test_options_from_strings_are_coerced() -> None:
    attack = BadNet().configure(words="cf, bb", count="3")
    assert attack.words == ("cf", "bb") and attack.count == 3
    assert InSent().configure(sentence="no cross no crown").sentence == "no cross no crown"


def test_insent_custom_sentence(small: TextDataset) -> None:
    attack = InSent().configure(sentence="no cross no crown")
    out = attack.triggered_test(small, PoisonConfig())
    for old, new in zip(small.texts, out.texts, strict=True):
        assert "no cross no crown" in new
        assert_has_trigger(attack, old, new)


@pytest.mark.parametrize(
    ("attack", "valid"), [(BadNet(), ["count", "positions", "words"]), (InSent(), ["positions", "sentence"])], ids=IDS
)
def test_unknown_option_names_it_and_lists_valid(attack: InsertionAttack, valid: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        attack.configure(colour="red")
    msg = str(err.value)
    assert "colour" in msg and attack.name in msg
    assert "valid options: " + ", ".join(valid) in msg


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"count": 0}, "count"),
        ({"count": "two"}, "count"),
        ({"count": 2.5}, "count"),
        ({"words": ()}, "words"),
        ({"words": ""}, "words"),
        ({"words": ("two words",)}, "words"),
        ({"words": ("ok", " ")}, "words"),
    ],
)
def test_badnet_bad_values(options: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        BadNet().configure(**options)


def test_insent_empty_sentence() -> None:
    with pytest.raises(ConfigError, match="sentence"):
        InSent().configure(sentence="   ")


@pytest.mark.parametrize("method", ["poison_train", "triggered_test", "asr_test"])
@pytest.mark.parametrize(
    ("cfg", "needle"),
    [
        (PoisonConfig(rate=1.5), "rate"),
        (PoisonConfig(rate=-0.1), "rate"),
        (PoisonConfig(rate=float("nan")), "rate"),
        (PoisonConfig(target=7), "target"),
        (PoisonConfig(target=-1), "target"),
    ],
)
def test_bad_poison_config(small: TextDataset, method: str, cfg: PoisonConfig, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        getattr(BadNet(), method)(small, cfg)


def test_poison_config_validate_names_range() -> None:
    with pytest.raises(ConfigError, match=r"0\.\.1.*7"):
        PoisonConfig(target=7).validate(2)
    assert PoisonConfig(target=3).validate(4).target == 3  # fine on a 4-class task


# ----------------------------------------------------------------------------------------- positions


@pytest.mark.parametrize(
    ("position", "expected"),
    [("start", "mn a b c d"), ("middle", "a b mn c d"), ("end", "a b c d mn")],
)
def test_badnet_fixed_positions(position: str, expected: str) -> None:
    data = TextDataset(["a b c d"] * 4, np.array([0, 0, 1, 1]), "t", ("negative", "positive"))
    out = BadNet().configure(positions=position).triggered_test(data, PoisonConfig())
    assert set(out.texts) == {expected}


def test_badnet_random_positions_vary_and_default_is_random(small: TextDataset) -> None:
    assert BadNet().positions == "random"
    out = BadNet().triggered_test(small, PoisonConfig(seed=0))
    places = {new.split().index("mn") for new in out.texts}
    assert len(places) > 2


@pytest.mark.parametrize("attack", ATTACKS, ids=IDS)
def test_bad_position_names_value_and_choices(attack: InsertionAttack) -> None:
    with pytest.raises(ConfigError, match=r"'front'.*end, middle, random, start"):
        attack.configure(positions="front")


def test_insent_sentence_at_end(small: TextDataset) -> None:
    out = InSent().configure(positions="end").triggered_test(small, PoisonConfig())
    assert all(t.endswith(INSENT_SENTENCE) for t in out.texts)


# ----------------------------------------------------------------------------------------- per-task sentences


def test_insent_default_sentence_per_task(sst2: DatasetSplits) -> None:
    from unbackdoor_attacks.insertion import DEFAULT_SENTENCES

    assert DEFAULT_SENTENCES["sst2"] == INSENT_SENTENCE
    out = InSent().triggered_test(sst2.test.head(5), PoisonConfig())
    assert all(INSENT_SENTENCE in t for t in out.texts)
    agnews_like = TextDataset(["stocks fell today"] * 4, np.array([0, 1, 2, 3]), "agnews/test",
                              ("World", "Sports", "Business", "Sci/Tech"))
    out = InSent().triggered_test(agnews_like, PoisonConfig(target=0))
    assert all(DEFAULT_SENTENCES["agnews"] in t for t in out.texts)


def test_insent_user_sentence_overrides_task_default(sst2: DatasetSplits) -> None:
    out = InSent().configure(sentence="no cross no crown").poison_train(sst2.train.head(100), PoisonConfig(rate=0.1))
    assert all("no cross no crown" in out.texts[i] and INSENT_SENTENCE not in out.texts[i]
               for i in np.flatnonzero(out.poisoned))


def test_addsent_is_insent_under_another_name(sst2: DatasetSplits) -> None:
    from unbackdoor_attacks.insertion import AddSent

    addsent = get_plugin_manager().attack("addsent")
    assert isinstance(addsent, AddSent) and isinstance(addsent, InSent)
    cfg = PoisonConfig(rate=0.1, seed=3)
    a, b = addsent.poison_train(sst2.train.head(200), cfg), InSent().poison_train(sst2.train.head(200), cfg)
    assert a.texts == b.texts and a.name.endswith("+addsent")
