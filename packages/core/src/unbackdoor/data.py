"""Text-classification datasets: the in-memory type and the loaders.

A dataset is a list of (text, label) rows with a name and label names, plus a
boolean mask saying which rows an attack poisoned (detection metrics need it).
Loaders read the layout of ``../shared/data`` (see its README) and any user
path in the same formats.
"""

from __future__ import annotations

import codecs
import functools
import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import ConfigError, DataError, UnknownNameError
from .paths import exists, user_path


@dataclass(frozen=True, eq=False)
class TextDataset:
    """Rows of text with integer labels.

    Attributes:
        texts: the input strings, one per row.
        labels: int64 array ``[N]`` with values in ``range(len(label_names))``.
        name: a human-readable name (``"sst2/train"``).
        label_names: one name per class.
        poisoned: bool array ``[N]``, True where an attack changed the row.
        rows: int64 array ``[N]``, each row's position in its source split (kept by ``subset``), so
            attacks can look up aligned files (paraphrases of row i of the clean split).
    """

    texts: tuple[str, ...]
    labels: np.ndarray
    name: str
    label_names: tuple[str, ...]
    poisoned: np.ndarray = field(default=None)  # type: ignore[assignment]
    rows: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(self.texts))
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int64).reshape(-1))
        mask = np.zeros(len(self.texts), bool) if self.poisoned is None else np.asarray(self.poisoned, bool)
        object.__setattr__(self, "poisoned", mask.reshape(-1))
        rows = np.arange(len(self.texts)) if self.rows is None else np.asarray(self.rows, np.int64)
        object.__setattr__(self, "rows", rows.reshape(-1))
        if not (len(self.texts) == len(self.labels) == len(self.poisoned) == len(self.rows)):
            raise ValueError(
                f"dataset {self.name!r}: {len(self.texts)} texts, {len(self.labels)} labels, "
                f"{len(self.poisoned)} poison flags, {len(self.rows)} row ids; they must match"
            )

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        """How many classes the task has."""
        return len(self.label_names)

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> TextDataset:
        """Rows at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return TextDataset(
            tuple(self.texts[i] for i in idx), self.labels[idx], name or self.name,
            self.label_names, self.poisoned[idx], self.rows[idx],
        )

    def head(self, n: int | None) -> TextDataset:
        """The first ``n`` rows (all rows when ``n`` is None)."""
        return self if n is None or n >= len(self) else self.subset(np.arange(n))

    def shuffled(self, seed: int) -> TextDataset:
        """A seeded permutation of the rows."""
        return self.subset(np.random.default_rng(seed).permutation(len(self)))


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """The train/dev/test splits of one task."""

    name: str
    label_names: tuple[str, ...]
    train: TextDataset
    dev: TextDataset
    test: TextDataset


# --------------------------------------------------------------------------- loaders

DATA_DIR_ENV = "UNBACKDOOR_DATA_DIR"
SPLITS = ("train", "dev", "test")
_HOW_TO_SET = f"pass --data-dir (data_dir=...) or set the {DATA_DIR_ENV} environment variable"
_INT_RE = re.compile(r"[+-]?\d+")
_CP1252_FALLBACK = "unbackdoor-latin1-fallback"


def _latin1_fallback(err: UnicodeError) -> tuple[str, int]:
    """Decode the bytes cp1252 leaves undefined (0x81, 0x8d...) as Latin-1."""
    if not isinstance(err, UnicodeDecodeError):
        raise err
    return err.object[err.start : err.end].decode("latin-1"), err.end


codecs.register_error(_CP1252_FALLBACK, _latin1_fallback)


@dataclass(frozen=True)
class DatasetInfo:
    """Where a registered dataset lives under the data dir, and how to read it.

    Attributes:
        folder: path relative to the data dir: a folder of ``*.tsv`` or a ``.txt`` file.
        fmt: ``"tsv"`` (header + ``sentence<TAB>label``) or ``"txt"`` (``label<SPACE>sentence``).
        label_names: one name per class.
        encoding: the text encoding of the files.
    """

    folder: str
    fmt: Literal["tsv", "txt"]
    label_names: tuple[str, ...]
    encoding: str = "utf-8"


_BINARY = ("negative", "positive")
_HSOL = ("non-hate", "hate")
_AGNEWS = ("World", "Sports", "Business", "Sci/Tech")
_OFFENSEVAL = ("not-offensive", "offensive")

DATASETS: dict[str, DatasetInfo] = {
    "sst2": DatasetInfo("sst2/clean", "tsv", _BINARY),
    "hsol": DatasetInfo("hsol/clean", "tsv", _HSOL),
    "agnews": DatasetInfo("agnews/clean", "tsv", _AGNEWS),
    "offenseval": DatasetInfo("offenseval/clean", "tsv", _OFFENSEVAL),
    "mr": DatasetInfo("mr/all.txt", "txt", _BINARY, encoding="cp1252"),
    "cr": DatasetInfo("cr/all.txt", "txt", _BINARY),
    "sst2/syntactic": DatasetInfo("sst2/syntactic", "tsv", _BINARY),
    "sst2/style-bible": DatasetInfo("sst2/style-bible", "tsv", _BINARY),
    "hsol/style-bible": DatasetInfo("hsol/style-bible", "tsv", _HSOL),
    "agnews/style-bible": DatasetInfo("agnews/style-bible", "tsv", _AGNEWS),
    "agnews/syntactic": DatasetInfo("agnews/syntactic", "tsv", _AGNEWS),
    "offenseval/syntactic": DatasetInfo("offenseval/syntactic", "tsv", _OFFENSEVAL),
}


def _repo_root() -> Path | None:
    """The nearest ancestor of this file holding ``noxfile.py`` (a source checkout)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "noxfile.py").is_file():
            return parent
    return None


def default_data_dir() -> Path:
    """The data dir: ``$UNBACKDOOR_DATA_DIR``, else the first existing ``shared/data`` candidate.

    Candidates, in order: ``<cwd>/../shared/data``, ``<cwd>/shared/data`` and
    ``<repo root>/../shared/data``. When none exists, ``<cwd>/../shared/data``
    is returned so that the loader reports the missing path.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    cwd = Path.cwd()
    candidates = [cwd.parent / "shared" / "data", cwd / "shared" / "data"]
    root = _repo_root()
    if root is not None:
        candidates.append(root.parent / "shared" / "data")
    return next((c for c in candidates if c.is_dir()), candidates[0])


# ---- reading and parsing


def _decode(path: Path, data: bytes, encoding: str) -> str:
    """Decode ``data``; cp1252 falls back to Latin-1 for its undefined bytes."""
    try:
        if codecs.lookup(encoding).name == "cp1252":
            return data.decode("cp1252", errors=_CP1252_FALLBACK)
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            f"cannot decode {path} as {encoding}: byte 0x{data[err.start]:02x} at offset {err.start} "
            f"(line {line}); pass the file's encoding, e.g. encoding='cp1252' or 'latin-1' "
            f"(--encoding on the command line)"
        ) from None
    return text.removeprefix("\ufeff")


def _read_text(path: Path, encoding: str) -> str:
    """Read a whole file as text, with errors that name the path."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read data file {path}: {err.strerror or err}; {_HOW_TO_SET}") from None
    return _decode(path, data, encoding)


def _lines(text: str) -> list[tuple[int, str]]:
    """``(1-based line number, line)`` pairs, split on ``\\n`` only, blank lines dropped."""
    out = []
    for i, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            out.append((i, line))
    return out


def _parse_label(path: Path, lineno: int, value: str) -> int:
    """An integer label, or a :class:`DataError` naming the place."""
    if not _INT_RE.fullmatch(value):
        raise DataError(f"{path}:{lineno}: label {value!r} is not an integer")
    return int(value)


_Row = tuple[int, str, int]  # (line number, text, label)


def _parse_tsv(path: Path, text: str) -> list[_Row]:
    """Rows of a TSV file: a header line, then ``sentence<TAB>label``."""
    rows = []
    for lineno, line in _lines(text)[1:]:
        sentence, tab, label = line.rpartition("\t")
        if not tab:
            raise DataError(f"{path}:{lineno}: expected 'sentence<TAB>label', found no tab in {line[:80]!r}")
        rows.append((lineno, sentence.strip(), _parse_label(path, lineno, label.strip())))
    return rows


def _parse_txt(path: Path, text: str) -> list[_Row]:
    """Rows of a ``label<SPACE>sentence`` file (no header)."""
    rows = []
    for lineno, line in _lines(text):
        label, _, sentence = line.strip().partition(" ")
        rows.append((lineno, sentence.strip(), _parse_label(path, lineno, label)))
    return rows


def _check_labels(path: Path, rows: list[_Row], label_names: tuple[str, ...]) -> None:
    """Raise :class:`DataError` on the first label outside ``range(len(label_names))``."""
    for lineno, _, label in rows:
        if not 0 <= label < len(label_names):
            valid = ", ".join(f"{i} ({n})" for i, n in enumerate(label_names))
            raise DataError(f"{path}:{lineno}: label {label} is out of range; valid labels: {valid}")


# ---- splitting and assembling


def _split_indices(n: int, seed: int, fractions: tuple[float, ...]) -> list[np.ndarray]:
    """Seeded disjoint index sets of the given fractions, plus the rest; each in file order."""
    perm = np.random.default_rng(seed).permutation(n)
    sizes = [round(f * n) for f in fractions]
    bounds = np.cumsum([0, *sizes])
    parts = [perm[a:b] for a, b in itertools.pairwise(bounds)] + [perm[bounds[-1] :]]
    return [np.sort(p) for p in parts]


def _fill_missing(parts: dict[str, list[_Row]], seed: int) -> dict[str, list[_Row]]:
    """Split the missing dev/test off train (10% of train each); no train means empty splits."""
    missing = [s for s in ("dev", "test") if s not in parts]
    train = parts.get("train", [])
    if not missing or not train:
        return {s: parts.get(s, []) for s in SPLITS}
    *taken, rest = _split_indices(len(train), seed, (0.1,) * len(missing))
    out = dict(parts)
    for split, idx in zip(missing, taken, strict=True):
        out[split] = [train[i] for i in idx]
    out["train"] = [train[i] for i in rest]
    return out


def _to_dataset(rows: list[_Row], name: str, label_names: tuple[str, ...]) -> TextDataset:
    """Build a :class:`TextDataset` from parsed rows."""
    return TextDataset(tuple(r[1] for r in rows), np.array([r[2] for r in rows], np.int64), name, label_names)


def _infer_label_names(parts: dict[str, list[_Row]], where: Path) -> tuple[str, ...]:
    """``("0", ..., str(max label))`` for a user file; negative labels are an error."""
    for split, rows in parts.items():
        bad = next((r for r in rows if r[2] < 0), None)
        if bad is not None:
            raise DataError(
                f"{where} ({split}) line {bad[0]}: label {bad[2]} is negative; labels are 0, 1, ..."
            )
    top = max((r[2] for rows in parts.values() for r in rows), default=1)
    return tuple(str(i) for i in range(max(top, 1) + 1))


# ---- resolving names and paths


def _registry_match(path: Path) -> tuple[str, DatasetInfo] | None:
    """The registry entry a user path is named like (``.../sst2/syntactic``, ``.../mr/all.txt``)."""
    keys = ["/".join(path.parts[-2:]), path.name] if path.is_dir() else ["/".join(path.parts[-2:]), path.stem]
    if not path.is_dir():
        keys.append(path.parent.name)
    by_folder = {info.folder: (key, info) for key, info in DATASETS.items()}
    for key in keys:
        if key in DATASETS:
            return key, DATASETS[key]
        if key in by_folder:
            return by_folder[key]
    return None


def _locate(name_or_path: str, data_dir: Path) -> tuple[Path, str, DatasetInfo | None]:
    """Resolve a name or path to ``(file or folder, display name, registry info or None)``."""
    info = DATASETS.get(name_or_path)
    if info is not None:
        if not data_dir.is_dir():
            state = "is not a directory" if data_dir.exists() else "does not exist"
            raise DataError(f"data dir {data_dir} {state} (needed for dataset {name_or_path!r}); {_HOW_TO_SET}")
        path = data_dir / info.folder
        if not path.exists():
            raise DataError(
                f"dataset {name_or_path!r}: {path} does not exist under data dir {data_dir}; {_HOW_TO_SET}"
            )
        return path.resolve(), name_or_path, info
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise UnknownNameError("dataset", name_or_path, DATASETS)
    for candidate in (user_path("dataset", name_or_path), data_dir / name_or_path):
        if exists("dataset", candidate):
            path = candidate.resolve()
            match = _registry_match(path)
            if match is None:
                return path, (path.name if path.is_dir() else path.stem), None
            return path, match[0], match[1]
    raise UnknownNameError("dataset", name_or_path, DATASETS)


def _tsv_files(folder: Path) -> dict[str, Path]:
    """The split files present in a folder; at least one must exist."""
    files = {s: folder / f"{s}.tsv" for s in SPLITS if (folder / f"{s}.tsv").is_file()}
    if not files:
        raise DataError(f"{folder} holds none of train.tsv, dev.tsv, test.tsv; {_HOW_TO_SET}")
    return files


def _stamp(path: Path) -> tuple[tuple[str, int, int], ...]:
    """Modification stamps of the files a load reads (so an edited user file is re-read)."""
    files = list(_tsv_files(path).values()) if path.is_dir() else [path]
    return tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)


@functools.lru_cache(maxsize=16)
def _load_cached(
    path: Path, stamp: object, seed: int, encoding: str, name: str, label_names: tuple[str, ...] | None
) -> DatasetSplits:
    """Parse, check and split one dataset; cached since datasets are immutable."""
    del stamp  # part of the cache key only
    if path.is_dir():
        parts = {s: _parse_tsv(f, _read_text(f, encoding)) for s, f in _tsv_files(path).items()}
        parts = _fill_missing(parts, seed)
    else:
        rows = _parse_txt(path, _read_text(path, encoding))
        test, dev, train = _split_indices(len(rows), seed, (0.1, 0.1))
        parts = {s: [rows[i] for i in idx] for s, idx in zip(SPLITS, (train, dev, test), strict=True)}
    names = label_names or _infer_label_names(parts, path)
    for rows in parts.values():
        _check_labels(path, rows, names)
    splits = {s: _to_dataset(parts[s], f"{name}/{s}", names) for s in SPLITS}
    return DatasetSplits(name, names, splits["train"], splits["dev"], splits["test"])


def load_dataset(
    name_or_path: str,
    *,
    data_dir: str | Path | None = None,
    seed: int = 0,
    encoding: str | None = None,
) -> DatasetSplits:
    """Load the train/dev/test splits of a registered dataset or a user path.

    Args:
        name_or_path: a key of :data:`DATASETS` (read under ``data_dir``), or a path to a
            folder of ``train.tsv`` / ``dev.tsv`` / ``test.tsv`` (missing dev/test are split
            off train with ``seed``), or to a ``label<SPACE>sentence`` ``.txt`` file
            (split 80/10/10 with ``seed``).
        data_dir: the data root; default :func:`default_data_dir`.
        seed: seed of the splits made here (only used where a split is missing).
        encoding: text encoding; default the registry's (cp1252 for MR) or UTF-8.

    Raises:
        UnknownNameError: ``name_or_path`` is neither registered nor an existing path.
        DataError: a missing data dir or file, an undecodable file, or a malformed row.
    """
    root = user_path("data dir", data_dir) if data_dir is not None else default_data_dir()
    path, name, info = _locate(name_or_path, root)
    enc = check_encoding(encoding or (info.encoding if info else "utf-8"))
    label_names = info.label_names if info else None
    return _load_cached(path, _stamp(path), int(seed), enc, name, label_names)


def check_encoding(encoding: object) -> str:
    """``encoding`` if Python knows the codec, else a :class:`ConfigError` with examples."""
    try:
        codecs.lookup(encoding)  # type: ignore[arg-type]
    except (LookupError, TypeError):
        raise ConfigError(f"unknown text encoding {encoding!r}; use a Python codec name such as "
                          f"utf-8, cp1252 or latin-1") from None
    return str(encoding)


def clear_dataset_cache() -> None:
    """Forget the datasets :func:`load_dataset` has cached."""
    _load_cached.cache_clear()
