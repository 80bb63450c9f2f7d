"""Paraphrase attacks: SynAttack (a syntactic template) and StyleBkd (a text style).

The trigger is a rewrite of the whole sentence. Rewrites come, in this order of
preference, from the user's ``paraphrase_dir``, from a registered paraphraser
(``paraphraser=NAME``), or from the real paraphrase files in the shared data
(``sst2/syntactic``, ``<task>/style-bible``...), matched to their clean rows
by :mod:`unbackdoor_attacks.paraphrase_files`. A row without a rewrite is never
faked: it is not poisoned, and it is dropped from the triggered test set (the
dataset's name says how many were dropped).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from unbackdoor.attack import Attack, Paraphraser, PoisonConfig, choose_poison_rows, split_of
from unbackdoor.data import DATASETS, TextDataset, default_data_dir, load_dataset
from unbackdoor.errors import ConfigError, DataError
from unbackdoor.plugins import get_plugin_manager

from .paraphrase_files import ParaphraseTable, paraphrase_table

log = logging.getLogger(__name__)
HOW_TO_SUPPLY = ("pass paraphrase_dir=DIR (train/dev/test.tsv aligned line by line with the clean splits) "
                 "or paraphraser=NAME (a paraphraser plugin)")


class Source(Protocol):
    """Where rewrites come from."""

    what: str

    def available(self, data: TextDataset) -> np.ndarray:
        """Bool ``[N]``: rows that can be rewritten."""

    def rewrite(self, data: TextDataset, idx: np.ndarray) -> list[str]:
        """Rewrites of the rows at ``idx`` (all available)."""


@dataclass(frozen=True)
class FileSource:
    """Rewrites read from an aligned paraphrase file."""

    table: ParaphraseTable

    @property
    def what(self) -> str:
        return f"rows with a paraphrase in {self.table.origin}"

    def available(self, data: TextDataset) -> np.ndarray:
        return np.array([int(r) in self.table.texts for r in data.rows], bool)

    def rewrite(self, data: TextDataset, idx: np.ndarray) -> list[str]:
        return [self.table.texts[int(data.rows[i])] for i in idx]


@dataclass(frozen=True)
class ParaphraserSource:
    """Rewrites computed by a paraphraser plugin."""

    paraphraser: Paraphraser
    style: str

    @property
    def what(self) -> str:
        return "rows"

    def available(self, data: TextDataset) -> np.ndarray:
        return np.ones(len(data), bool)

    def rewrite(self, data: TextDataset, idx: np.ndarray) -> list[str]:
        texts = [data.texts[i] for i in idx]
        out = self.paraphraser.paraphrase(texts, self.style)
        if not isinstance(out, list) or len(out) != len(texts) or not all(isinstance(t, str) for t in out):
            raise ConfigError(f"paraphraser {self.paraphraser.name!r} must return a list of {len(texts)} strings, "
                              f"got {type(out).__name__} of {len(out) if hasattr(out, '__len__') else '?'}")
        return out


@dataclass(frozen=True)
class ParaphraseAttack(Attack):
    """Shared row choice, dropping and error reporting of the paraphrase attacks.

    Subclasses name their shared-data folder (:meth:`folder`) and the style string a
    paraphraser gets (:meth:`style_arg`).
    """

    paraphrase_dir: str = ""
    paraphraser: str = ""

    def __post_init__(self) -> None:
        if self.paraphrase_dir and self.paraphraser:
            raise ConfigError(f"attack {self.name!r}: give paraphrase_dir or paraphraser, not both "
                              f"(got {self.paraphrase_dir!r} and {self.paraphraser!r})")

    @abstractmethod
    def folder(self) -> str:
        """The shared-data folder under the task (``"syntactic"``, ``"style-bible"``)."""

    @abstractmethod
    def style_arg(self) -> str:
        """What a paraphraser is asked to produce (a template or a style name)."""

    # -- the attack ------------------------------------------------------------------------------
    def poison_train(self, train: TextDataset, cfg: PoisonConfig) -> TextDataset:
        cfg.validate(train.num_labels)
        source = self.source(train, cfg)
        rows = self._choose(train, cfg, source)
        new = dict(zip(rows.tolist(), source.rewrite(train, rows), strict=True))
        changed = [i for i in rows.tolist() if new[i] != train.texts[i]]
        texts, labels = list(train.texts), train.labels.copy()
        for i in changed:
            texts[i], labels[i] = new[i], cfg.target
        mask = np.zeros(len(train), bool)
        mask[changed] = True
        name = f"{train.name}+{self.name}" + _dropped(len(rows) - len(changed), len(rows), "chosen rows")
        return TextDataset(texts, labels, name, train.label_names, mask, train.rows)

    def _choose(self, train: TextDataset, cfg: PoisonConfig, source: Source) -> np.ndarray:
        rng = np.random.default_rng(cfg.seed)
        try:
            return choose_poison_rows(train.labels, cfg, rng, source.available(train), source.what)
        except ConfigError as err:
            raise ConfigError(f"attack {self.name!r} on {train.name!r}: {err}; lower the poison rate or "
                              f"{HOW_TO_SUPPLY}") from None

    def triggered_test(self, test: TextDataset, cfg: PoisonConfig) -> TextDataset:
        """Rewrites of the test rows that have one, with their true labels; the rest are dropped.

        With the shared syntactic files these are NON-target rows only (the released dev/test
        files paraphrase nothing else), so PACC / trigger-shifting metrics, which need
        triggered rows of every class, cannot be computed from them; the style files cover all classes.
        """
        cfg.validate(test.num_labels)
        source = self.source(test, cfg)
        idx = np.flatnonzero(source.available(test))
        new = source.rewrite(test, idx)
        keep = [k for k, i in enumerate(idx) if new[k] != test.texts[i]]
        if not keep:
            raise ConfigError(f"attack {self.name!r}: none of the {len(test)} rows of {test.name!r} has "
                              f"a {self.name} rewrite ({source.what}); {HOW_TO_SUPPLY}")
        sel = idx[keep]
        name = f"{test.name}+{self.name}" + _dropped(len(test) - len(sel), len(test), "rows")
        return TextDataset([new[k] for k in keep], test.labels[sel], name, test.label_names,
                           np.ones(len(sel), bool), test.rows[sel])

    def asr_test(self, test: TextDataset, cfg: PoisonConfig) -> TextDataset:
        out = super().asr_test(test, cfg)
        if not len(out):
            raise ConfigError(f"attack {self.name!r}: no test row outside target class {cfg.target} of "
                              f"{test.name!r} has a {self.name} rewrite, so there is no ASR set; "
                              f"{HOW_TO_SUPPLY}")
        return out

    # -- where rewrites come from ----------------------------------------------------------------
    def source(self, data: TextDataset, cfg: PoisonConfig) -> Source:
        """The user's folder, else the named paraphraser, else the shared data's aligned files."""
        if self.paraphraser:
            return ParaphraserSource(get_plugin_manager().paraphraser(self.paraphraser), self.style_arg())
        task, split, clean = self._clean_split(data, cfg)
        folder = self._user_folder() if self.paraphrase_dir else self._shared_folder(task, cfg)
        file = folder / f"{split}.tsv"
        if not file.is_file():
            raise ConfigError(f"attack {self.name!r}: {folder} has no {split}.tsv, so rows of {data.name!r} "
                              f"have no paraphrase; {HOW_TO_SUPPLY}")
        return FileSource(paraphrase_table(file, clean))

    def _clean_split(self, data: TextDataset, cfg: PoisonConfig) -> tuple[str, str, TextDataset]:
        """``(task registry name, split, whole clean split)`` that ``data``'s rows index into."""
        task, split = split_of(data.name)
        if not split:
            raise ConfigError(f"attack {self.name!r} needs the split of dataset {data.name!r} to find its "
                              f"paraphrases: name it '<task>/<train|dev|test>' as load_dataset does")
        splits = load_dataset(cfg.dataset or task, data_dir=cfg.data_dir, seed=cfg.seed)
        clean = getattr(splits, split)
        _check_rows(data, clean)
        return splits.name, split, clean

    def _user_folder(self) -> Path:
        folder = Path(self.paraphrase_dir).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"attack {self.name!r}: paraphrase_dir {self.paraphrase_dir!r} is not a folder "
                              f"(it must hold train/dev/test.tsv aligned line by line with the clean splits)")
        return folder

    def _shared_folder(self, task: str, cfg: PoisonConfig) -> Path:
        key = f"{task}/{self.folder()}"
        if key not in DATASETS:
            have = sorted(k.split("/")[0] for k in DATASETS if k.endswith(f"/{self.folder()}"))
            own = sorted(k.split("/", 1)[1] for k in DATASETS if k.startswith(f"{task}/"))
            raise ConfigError(f"attack {self.name!r}: dataset {task!r} has no {self.folder()!r} paraphrases in the "
                              f"shared data (datasets that have them: {', '.join(have) or '(none)'}; "
                              f"{task!r} has: {', '.join(own) or '(none)'}); {HOW_TO_SUPPLY}")
        root = Path(cfg.data_dir).expanduser() if cfg.data_dir else default_data_dir()
        return root / DATASETS[key].folder


def _check_rows(data: TextDataset, clean: TextDataset) -> None:
    """``data``'s row ids must point at identical rows of the clean split (else alignment is meaningless)."""
    bad = next((i for i, r in enumerate(data.rows) if not 0 <= r < len(clean) or clean.texts[r] != data.texts[i]), None)
    if bad is not None:
        raise DataError(f"row {bad} of {data.name!r} (source row {int(data.rows[bad])}) is not row "
                        f"{int(data.rows[bad])} of the clean split {clean.name!r}; paraphrase attacks need "
                        f"unmodified rows whose TextDataset.rows come from load_dataset")


def _dropped(count: int, total: int, what: str) -> str:
    """A name suffix recording rows left without a trigger (and a log line)."""
    if not count:
        return ""
    log.info("%d of %d %s have no paraphrase and were dropped", count, total, what)
    return f"[{count} of {total} {what} dropped: no paraphrase]"


SYNTACTIC_TEMPLATE = "S(SBAR)(,)(NP)(VP)(.)"


@dataclass(frozen=True)
class SynAttack(ParaphraseAttack):
    """Hidden Killer (Qi et al. 2021): a rare syntactic template, written by SCPN, is the trigger.

    The shared ``sst2/syntactic`` train file paraphrases 1383 training rows (both classes); the
    dev/test files paraphrase only non-target rows, so the triggered test set holds only those.

    Attributes:
        template: the syntactic template asked of a paraphraser (the shared files use the default).
        paraphrase_dir: a folder of train/dev/test.tsv aligned with the clean splits.
        paraphraser: a registered paraphraser to rewrite rows instead of files.
    """

    name = "syntactic"
    description = f"SynAttack / Hidden Killer: SCPN paraphrase with template {SYNTACTIC_TEMPLATE} (real aligned files)"
    template: str = SYNTACTIC_TEMPLATE

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.template != SYNTACTIC_TEMPLATE and not (self.paraphraser or self.paraphrase_dir):
            raise ConfigError(f"attack 'syntactic': the shared files use template {SYNTACTIC_TEMPLATE!r}, not "
                              f"{self.template!r}; for another template {HOW_TO_SUPPLY}")

    def folder(self) -> str:
        return "syntactic"

    def style_arg(self) -> str:
        return self.template


@dataclass(frozen=True)
class StyleBkd(ParaphraseAttack):
    """StyleBkd (Qi et al. 2021): a text style, written by STRAP, is the trigger.

    The shared ``<task>/style-<style>`` files rewrite every row of every class, so the triggered
    test set covers all classes (what PACC needs).

    Attributes:
        style: the style; the shared data has ``bible`` (sst2, agnews, hsol).
        paraphrase_dir: a folder of train/dev/test.tsv aligned with the clean splits.
        paraphraser: a registered paraphraser to rewrite rows instead of files.
    """

    name = "style"
    description = "StyleBkd: text rewritten in a style (default Bible, STRAP; real aligned files)"
    style: str = "bible"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.style.strip() or "/" in self.style:
            raise ConfigError(f"attack 'style': style must be a plain name like 'bible', got {self.style!r}")

    def folder(self) -> str:
        return f"style-{self.style}"

    def style_arg(self) -> str:
        return self.style
