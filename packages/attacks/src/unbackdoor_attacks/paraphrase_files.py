"""Aligned paraphrase files: which clean row each paraphrase rewrites.

A paraphrase folder holds ``train.tsv`` / ``dev.tsv`` / ``test.tsv`` in the
layout of the shared data (header, then ``sentence<TAB>label``). A file is
matched to the clean split of the same name:

- same number of rows: line-aligned (row i rewrites clean row i), as the style
  files and ``sst2/syntactic/train.tsv`` are;
- every row carries one label L and the row count is nearer the number of
  clean rows NOT labelled L: it paraphrases those rows only, in order (the
  syntactic dev/test files, whose rows are relabelled with the target);
- otherwise it paraphrases all rows, in order, with rows dropped or added.

When the counts differ, :func:`~unbackdoor_attacks.align.align_rows` recovers
the pairs. A row identical to its source is no paraphrase (``sst2/syntactic/
train.tsv`` keeps 5537 clean rows) and is left out.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unbackdoor.data import TextDataset
from unbackdoor.errors import DataError

from .align import align_rows


@dataclass(frozen=True)
class ParaphraseTable:
    """The paraphrases one file gives for a clean split.

    Attributes:
        texts: paraphrase by source row id (the row's position in the clean split).
        origin: the file, for messages.
        only_unlike: the file paraphrases only rows whose label differs from this one (None: any label).
    """

    texts: dict[int, str]
    origin: str
    only_unlike: int | None = None


def read_tsv(file: Path) -> tuple[list[str], np.ndarray]:
    """Sentences and labels of a ``sentence<TAB>label`` file with a header line (UTF-8)."""
    try:
        lines = file.read_text(encoding="utf-8").split("\n")[1:]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read paraphrase file {file}: {err}") from None
    texts, labels = [], []
    for lineno, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        sentence, tab, label = line.removesuffix("\r").rpartition("\t")
        if not tab or not label.strip().lstrip("+-").isdigit():
            raise DataError(f"{file}:{lineno}: expected 'sentence<TAB>integer label', got {line[:80]!r}")
        texts.append(sentence.strip())
        labels.append(int(label))
    return texts, np.asarray(labels, np.int64)


def paraphrase_table(file: Path, clean: TextDataset) -> ParaphraseTable:
    """The paraphrases ``file`` gives for the rows of ``clean`` (a whole split, as loaded); cached."""
    stat = file.stat()
    return _table(file.resolve(), (stat.st_mtime_ns, stat.st_size), clean)


@functools.lru_cache(maxsize=32)
def _table(file: Path, stamp: object, clean: TextDataset) -> ParaphraseTable:
    del stamp  # part of the cache key only
    texts, labels = read_tsv(file)
    pool, only_unlike = source_pool(labels, clean.labels)
    if len(texts) == len(pool):
        pairs = dict(enumerate(range(len(pool))))
    else:
        pairs = align_rows(texts, [clean.texts[i] for i in pool])
    found = {int(clean.rows[pool[k]]): texts[j] for j, k in pairs.items() if texts[j] != clean.texts[pool[k]]}
    return ParaphraseTable(found, str(file), only_unlike)


def source_pool(labels: np.ndarray, clean_labels: np.ndarray) -> tuple[np.ndarray, int | None]:
    """The clean rows a paraphrase file with ``labels`` rewrites (in order), and the label they lack."""
    everything = np.arange(len(clean_labels))
    if len(labels) == len(clean_labels) or len(labels) == 0 or len(set(labels.tolist())) != 1:
        return everything, None
    label = int(labels[0])
    unlike = np.flatnonzero(clean_labels != label)
    if abs(len(labels) - len(unlike)) < abs(len(labels) - len(everything)):
        return unlike, label
    return everything, None
