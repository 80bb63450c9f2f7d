"""Tests of the dataset loaders in ``unbackdoor.data`` (real shared data plus made-up files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from unbackdoor.data import (
    DATA_DIR_ENV,
    DATASETS,
    DatasetSplits,
    clear_dataset_cache,
    default_data_dir,
    load_dataset,
)
from unbackdoor.errors import ConfigError, DataError, UnknownNameError


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """The real shared data dir; the tests that need it fail when it is absent."""
    path = default_data_dir()
    if not (path / "sst2" / "clean" / "train.tsv").is_file():
        pytest.fail(f"shared data not found at {path}; set {DATA_DIR_ENV}")
    return path


def _write(path: Path, text: str | bytes) -> Path:
    """Write a made-up data file (creating folders) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def _sizes(splits: DatasetSplits) -> tuple[int, int, int]:
    return len(splits.train), len(splits.dev), len(splits.test)


# ---------------------------------------------------------------- the real data


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_registered_dataset_loads(data_dir: Path, name: str) -> None:
    splits = load_dataset(name, data_dir=data_dir)
    assert splits.name == name
    assert splits.label_names == DATASETS[name].label_names
    for split in ("train", "dev", "test"):
        ds = getattr(splits, split)
        assert ds.name == f"{name}/{split}"
        assert ds.label_names == splits.label_names
        assert ds.labels.dtype == np.int64
        assert ((ds.labels >= 0) & (ds.labels < len(splits.label_names))).all()
        assert not ds.poisoned.any()
        assert not any(t.endswith("\r") for t in ds.texts)
        if not (name == "agnews/syntactic" and split == "train"):
            assert len(ds) > 0, f"{name}/{split} is empty"


@pytest.mark.parametrize(
    ("name", "sizes"),
    [
        ("sst2", (6920, 872, 1821)),
        ("sst2/style-bible", (6920, 872, 1821)),
        ("sst2/syntactic", (6920, 427, 912)),  # README says 911: the file has 912 rows, no final newline
        ("hsol", (7074, 1000, 2000)),
        ("hsol/style-bible", (6776, 728, 2000)),
        ("agnews", (11106, 10000, 7600)),
        ("agnews/style-bible", (11106, 10000, 7600)),
        ("agnews/syntactic", (0, 9023, 5699)),
        ("offenseval", (11915, 1323, 859)),
        ("offenseval/syntactic", (11916, 877, 620)),
    ],
)
def test_tsv_row_counts_match_the_readme(data_dir: Path, name: str, sizes: tuple[int, int, int]) -> None:
    assert _sizes(load_dataset(name, data_dir=data_dir)) == sizes


@pytest.mark.parametrize(("name", "total"), [("mr", 10662), ("cr", 3775)])
def test_txt_datasets_are_split_80_10_10(data_dir: Path, name: str, total: int) -> None:
    train, dev, test = _sizes(load_dataset(name, data_dir=data_dir))
    assert train + dev + test == total
    assert dev == test == round(0.1 * total)


def test_mr_is_decoded_as_cp1252_without_splitting_on_nel(data_dir: Path) -> None:
    mr = load_dataset("mr", data_dir=data_dir)
    texts = mr.train.texts + mr.dev.texts + mr.test.texts
    assert any("é" in t for t in texts)
    assert any("\u2026" in t for t in texts)  # byte 0x85 is an ellipsis in cp1252
    # Latin-1 turns 0x85 into U+0085, which str.splitlines() would split on: the count proves we do not.
    latin = load_dataset("mr", data_dir=data_dir, encoding="latin-1")
    latin_texts = latin.train.texts + latin.dev.texts + latin.test.texts
    assert len(latin_texts) == 10662
    assert any("\x85" in t for t in latin_texts)


def test_trigger_files_stay_aligned_with_clean(data_dir: Path) -> None:
    clean = load_dataset("sst2", data_dir=data_dir).test
    bible = load_dataset("sst2/style-bible", data_dir=data_dir).test
    assert np.array_equal(clean.labels, bible.labels)


def test_padded_tab_header_and_fields_are_stripped(data_dir: Path) -> None:
    hsol = load_dataset("hsol", data_dir=data_dir)  # header "sentences \t labels"
    assert hsol.train.texts[0] == hsol.train.texts[0].strip()
    assert hsol.train.texts[0] != "sentences"


def test_registry_folder_resolves_under_data_dir(data_dir: Path) -> None:
    splits = load_dataset("sst2/clean", data_dir=data_dir)  # not a key, but a folder under data_dir
    assert _sizes(splits) == (6920, 872, 1821)
    assert splits.label_names == DATASETS["sst2"].label_names


def test_default_data_dir_finds_shared_data(data_dir: Path) -> None:
    assert data_dir.is_dir()
    assert (data_dir / "README.md").is_file()


# ---------------------------------------------------------------- user paths


def test_padded_user_tsv(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    _write(folder / "train.tsv", "sentences \t labels\r\n  good film \t 1 \r\n\r\nbad film\t0\r\n   \n")
    _write(folder / "dev.tsv", "sentence\tlabel\nok\t2\n")
    _write(folder / "test.tsv", "sentence\tlabel\nfine\t1")  # no final newline
    splits = load_dataset(str(folder))
    assert splits.train.texts == ("good film", "bad film")
    assert splits.train.labels.tolist() == [1, 0]
    assert splits.label_names == ("0", "1", "2")
    assert splits.train.name == "mine/train"
    assert splits.test.texts == ("fine",)


def test_sentence_containing_a_tab_keeps_it(tmp_path: Path) -> None:
    path = _write(tmp_path / "d" / "test.tsv", "sentence\tlabel\na\tb\t1\n")
    assert load_dataset(str(path.parent)).test.texts == ("a\tb",)


def test_user_folder_named_like_a_task_gets_its_label_names(tmp_path: Path) -> None:
    rows = "".join(f"s{i}\t{i % 2}\n" for i in range(30))
    _write(tmp_path / "sst2" / "train.tsv", "sentence\tlabel\n" + rows)
    splits = load_dataset(str(tmp_path / "sst2"))
    assert splits.label_names == ("negative", "positive")
    assert splits.train.name == "sst2/train"


def test_folder_with_only_train_is_split(tmp_path: Path) -> None:
    rows = "".join(f"row {i}\t{i % 3}\n" for i in range(100))
    _write(tmp_path / "t" / "train.tsv", "sentence\tlabel\n" + rows)
    splits = load_dataset(str(tmp_path / "t"), seed=3)
    assert _sizes(splits) == (80, 10, 10)
    everything = set(splits.train.texts) | set(splits.dev.texts) | set(splits.test.texts)
    assert len(everything) == 100


def test_folder_missing_dev_splits_it_off_train(tmp_path: Path) -> None:
    _write(tmp_path / "t" / "train.tsv", "sentence\tlabel\n" + "".join(f"r{i}\t0\n" for i in range(50)))
    _write(tmp_path / "t" / "test.tsv", "sentence\tlabel\nx\t1\n")
    assert _sizes(load_dataset(str(tmp_path / "t"))) == (45, 5, 1)


def test_folder_with_only_dev_and_test_has_empty_train(tmp_path: Path) -> None:
    _write(tmp_path / "t" / "dev.tsv", "sentence\tlabel\na\t0\n")
    _write(tmp_path / "t" / "test.tsv", "sentence\tlabel\nb\t0\nc\t0\n")
    assert _sizes(load_dataset(str(tmp_path / "t"))) == (0, 1, 2)


def test_txt_split_is_seeded_and_deterministic(tmp_path: Path) -> None:
    path = _write(tmp_path / "reviews.txt", "".join(f"{i % 2} review number {i}\n" for i in range(200)))
    first = load_dataset(str(path), seed=7)
    clear_dataset_cache()
    again = load_dataset(str(path), seed=7)
    other = load_dataset(str(path), seed=8)
    assert first is not again
    assert first.test.texts == again.test.texts and first.dev.texts == again.dev.texts
    assert first.test.texts != other.test.texts
    assert _sizes(first) == (160, 20, 20)
    assert first.train.name == "reviews/train"
    assert set(first.train.texts).isdisjoint(first.test.texts)


def test_mr_split_differs_by_seed(data_dir: Path) -> None:
    a, b = load_dataset("mr", data_dir=data_dir, seed=0), load_dataset("mr", data_dir=data_dir, seed=1)
    assert a.test.texts != b.test.texts


def test_loads_are_cached_and_edits_are_seen(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.txt", "0 a\n1 b\n")
    first = load_dataset(str(path))
    assert load_dataset(str(path)) is first
    _write(path, "0 a\n1 b\n1 c\n")
    assert sum(_sizes(load_dataset(str(path)))) == 3


def test_cp1252_undefined_bytes_fall_back_to_latin1(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.txt", b"1 caf\xe9 \x85 \x81\n")
    splits = load_dataset(str(path), encoding="cp1252")
    assert splits.train.texts + splits.dev.texts + splits.test.texts == ("café \u2026 \x81",)


# ---------------------------------------------------------------- bad input


def test_unknown_name_lists_the_choices(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError) as err:
        load_dataset("no-such-set", data_dir=tmp_path)
    assert isinstance(err.value, ConfigError)
    message = str(err.value)
    assert "no-such-set" in message and "sst2" in message and "agnews/syntactic" in message


def test_missing_data_dir_says_how_to_set_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_dataset("sst2", data_dir=missing)
    assert str(missing) in str(err.value)
    assert DATA_DIR_ENV in str(err.value) and "--data-dir" in str(err.value)


def test_missing_dataset_folder_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="sst2/clean") as err:
        load_dataset("sst2", data_dir=tmp_path)
    assert DATA_DIR_ENV in str(err.value)


def test_folder_without_split_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"train\.tsv"):
        load_dataset(str(tmp_path / "empty"))


def test_row_without_tab(tmp_path: Path) -> None:
    path = _write(tmp_path / "d" / "train.tsv", "sentence\tlabel\nok\t1\nno tab here 1\n")
    with pytest.raises(DataError) as err:
        load_dataset(str(path.parent))
    assert f"{path}:3" in str(err.value) and "no tab here 1" in str(err.value)


def test_non_integer_label(tmp_path: Path) -> None:
    path = _write(tmp_path / "d" / "dev.tsv", "sentence\tlabel\nfine\tpositive\n")
    with pytest.raises(DataError) as err:
        load_dataset(str(path.parent))
    assert f"{path}:2" in str(err.value) and "'positive'" in str(err.value)


def test_non_integer_label_in_txt(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.txt", "1 good\nx bad\n")
    with pytest.raises(DataError, match=r"r\.txt:2: label 'x'"):
        load_dataset(str(path))


def test_label_out_of_range_lists_valid_labels(tmp_path: Path) -> None:
    path = _write(tmp_path / "sst2" / "test.tsv", "sentence\tlabel\na\t0\nb\t2\n")
    with pytest.raises(DataError) as err:
        load_dataset(str(path.parent))
    message = str(err.value)
    assert "label 2" in message and ":3" in message
    assert "0 (negative)" in message and "1 (positive)" in message


def test_negative_label_in_user_file(tmp_path: Path) -> None:
    _write(tmp_path / "n.txt", "0 a\n-1 b\n")
    with pytest.raises(DataError, match="-1"):
        load_dataset(str(tmp_path / "n.txt"))


def test_non_utf8_user_file_suggests_an_encoding(tmp_path: Path) -> None:
    path = _write(tmp_path / "latin.txt", b"1 ok\n0 caf\xe9\n")
    with pytest.raises(DataError) as err:
        load_dataset(str(path))
    message = str(err.value)
    assert str(path) in message and "offset 10" in message and "encoding" in message
    splits = load_dataset(str(path), encoding="latin-1")
    assert "café" in splits.train.texts + splits.dev.texts + splits.test.texts


# ---------------------------------------------------------------- default_data_dir


def test_default_data_dir_prefers_the_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "elsewhere"))
    assert default_data_dir() == tmp_path / "elsewhere"


def test_default_data_dir_searches_from_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    project = tmp_path / "project"
    (project / "shared" / "data").mkdir(parents=True)
    monkeypatch.chdir(project)
    assert default_data_dir() == project / "shared" / "data"
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert default_data_dir() == tmp_path / "shared" / "data"  # <cwd>/../shared/data comes first
