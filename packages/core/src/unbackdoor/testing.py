"""Contract checks for plugin authors: run them in your own tests, no model needed.

::

    from unbackdoor.data import load_dataset
    from unbackdoor.testing import check_attack_contract, check_defense_contract

    sst2 = load_dataset("sst2")
    check_attack_contract(MyAttack(), sst2.train.head(400), sst2.test.head(200))
    check_defense_contract(MyDefense())

Each check raises :class:`ContractError` (an ``AssertionError``) naming the
object and the broken rule, so pytest shows it like a failed assert.

A loss (``unbackdoor_losses``) is checked on the backends themselves:
:func:`check_loss` runs it on a tiny random model (:func:`tiny_model`) and
compares values, gradients and AdamW steps with its NumPy float64
evaluation (:mod:`unbackdoor.losscheck`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any

import numpy as np

from .attack import Attack, Paraphraser, PoisonConfig, fields_of
from .config import SETTINGS
from .data import TextDataset
from .defense import Defense
from .errors import ConfigError
from .losscheck import AuxRequest, LossCheck, Tolerances, check_loss
from .tinymodels import tiny_dataset, tiny_model

__all__ = ["AuxRequest", "ContractError", "LossCheck", "Tolerances", "check_attack_contract", "check_defense_contract",
           "check_loss", "check_paraphraser_contract", "check_plugin_object", "check_poison_train", "check_test_sets",
           "check_triggered", "tiny_dataset", "tiny_model"]

#: the defense kinds the runner knows
DEFENSE_KINDS = ("removal", "detection")


class ContractError(AssertionError):
    """A plugin object breaks the contract of its hook."""


def _require(ok: object, who: str, rule: str) -> None:
    if not ok:
        raise ContractError(f"{who}: {rule}")


# --------------------------------------------------------------------------------- any plugin object


def check_plugin_object(obj: Any, kind: str) -> None:
    """A frozen dataclass with a ``name`` and ``description``, JSON-able options and a strict ``configure``."""
    who = f"{kind} {getattr(obj, 'name', type(obj).__name__)!r}"
    _require(dataclasses.is_dataclass(obj) and type(obj).__dataclass_params__.frozen, who,  # type: ignore[attr-defined]
             "must be a frozen dataclass (its fields are its options)")
    for attr in ("name", "description"):
        value = getattr(obj, attr, None)
        _require(isinstance(value, str) and value.strip(), who, f"needs a non-empty string {attr!r}")
    _require(" " not in obj.name, who, "name must have no spaces (it is typed on the command line)")
    _require(not inspect.isabstract(type(obj)), who, "leaves abstract methods unimplemented")
    try:
        json.dumps(fields_of(obj))
    except TypeError as err:
        raise ContractError(f"{who}: options must be JSON-serialisable (they key caches and reports): {err}") from None
    _require(obj.configure(**fields_of(obj)) == obj, who, "configure(**its own options) must give an equal object")
    try:
        obj.configure(no_such_option_xyz=1)
    except ConfigError as err:
        _require("no_such_option_xyz" in str(err), who, f"the unknown-option error must name the option: {err}")
    else:
        raise ContractError(f"{who}: configure() accepted an unknown option")


# --------------------------------------------------------------------------------- attacks


def check_attack_contract(attack: Attack, train: TextDataset, test: TextDataset | None = None, *,
                          target: int = 1, rate: float = 0.1, seed: int = 0, dataset: str = "",
                          data_dir: str | None = None) -> None:
    """Check an attack on real rows, dirty- and clean-label.

    Checks: deterministic for a seed; another seed changes something; the ``poisoned`` mask
    marks exactly the changed rows; label rules (dirty: non-target rows flipped to ``target``;
    clean: target rows, labels untouched); inputs not modified; row ids kept; the triggered test
    sets keep each row's TRUE label and changed text; the ASR set holds no ``target`` row.
    """
    check_plugin_object(attack, "attack")
    test = test if test is not None else train
    for clean_label in (False, True):
        cfg = PoisonConfig(target, rate, clean_label, seed, dataset, data_dir)
        check_poison_train(attack, train, cfg)
        check_test_sets(attack, test, cfg)


def _snapshot(data: TextDataset) -> tuple[Any, ...]:
    return data.texts, data.labels.copy(), data.poisoned.copy(), data.rows.copy()


def _same(a: TextDataset, b: TextDataset) -> bool:
    return (a.texts == b.texts and np.array_equal(a.labels, b.labels) and np.array_equal(a.poisoned, b.poisoned)
            and np.array_equal(a.rows, b.rows))


def check_poison_train(attack: Attack, train: TextDataset, cfg: PoisonConfig) -> TextDataset:
    """The :meth:`~unbackdoor.attack.Attack.poison_train` rules for one config; returns the poisoned set."""
    who = f"attack {attack.name!r} poison_train ({'clean' if cfg.clean_label else 'dirty'}-label)"
    before = _snapshot(train)
    out = attack.poison_train(train, cfg)
    _require(all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
                 for x, y in zip(before, _snapshot(train), strict=True)), who, "modified its input")
    _require(len(out) == len(train) and np.array_equal(out.rows, train.rows), who, "must keep rows, order and row ids")
    _require(out.label_names == train.label_names, who, "must keep label_names")
    changed = np.array([a != b for a, b in zip(out.texts, train.texts, strict=True)]) | (out.labels != train.labels)
    _require(np.array_equal(changed, out.poisoned), who, f"poisoned mask ({int(out.poisoned.sum())} rows) must mark "
                                                         f"exactly the changed rows ({int(changed.sum())})")
    want = round(cfg.rate * len(train))
    _require(0 < out.poisoned.sum() <= want if want else not out.poisoned.any(), who,
             f"must poison between 1 and round(rate * N) = {want} rows, poisoned {int(out.poisoned.sum())}")
    _check_labels(attack, train, out, cfg, who)
    _require(_same(out, attack.poison_train(train, cfg)), who, f"is not deterministic for seed {cfg.seed}")
    other = attack.poison_train(train, dataclasses.replace(cfg, seed=cfg.seed + 1))
    _require(want == 0 or not _same(out, other), who, f"gives the same rows for seeds {cfg.seed} and {cfg.seed + 1}")
    return out


def _check_labels(attack: Attack, train: TextDataset, out: TextDataset, cfg: PoisonConfig, who: str) -> None:
    rows = np.flatnonzero(out.poisoned)
    keep = np.flatnonzero(~out.poisoned)
    _require(np.array_equal(out.labels[keep], train.labels[keep]), who, "changed labels of rows it did not poison")
    if cfg.clean_label or attack.clean_label_only:
        _require(np.all(train.labels[rows] == cfg.target), who, "clean-label must poison only target-class rows")
        _require(np.array_equal(out.labels, train.labels), who, "clean-label must not change labels")
    else:
        _require(np.all(train.labels[rows] != cfg.target), who, "dirty-label must poison only non-target rows")
        _require(np.all(out.labels[rows] == cfg.target), who, f"dirty-label must relabel poisoned rows {cfg.target}")


def check_test_sets(attack: Attack, test: TextDataset, cfg: PoisonConfig) -> None:
    """``triggered_test``, ``triggered_tests`` and ``asr_test`` keep true labels; the ASR set has no target row."""
    triggered = attack.triggered_test(test, cfg)
    check_triggered(attack, test, triggered, "triggered_test")
    _require(triggered.texts == attack.triggered_test(test, cfg).texts, f"attack {attack.name!r} triggered_test",
             "is not deterministic")
    sets = attack.triggered_tests(test, cfg)
    _require(isinstance(sets, dict) and sets and all(isinstance(k, str) for k in sets),
             f"attack {attack.name!r} triggered_tests", "must return a non-empty dict keyed by trigger name")
    for key, data in sets.items():
        check_triggered(attack, test, data, f"triggered_tests[{key!r}]")
    asr = attack.asr_test(test, cfg)
    who = f"attack {attack.name!r} asr_test"
    _require(len(asr) and not np.any(asr.labels == cfg.target), who, f"must be non-empty with no row labelled {cfg.target}")
    _require(len(asr) == int((triggered.labels != cfg.target).sum()), who,
             "must hold exactly the non-target rows of triggered_test")


def check_triggered(attack: Attack, test: TextDataset, out: TextDataset, what: str) -> None:
    """A triggered copy: a subset of ``test``'s rows (by row id), TRUE labels, changed text, all flagged."""
    who = f"attack {attack.name!r} {what}"
    position = {int(r): i for i, r in enumerate(test.rows)}
    _require(0 < len(out) <= len(test), who, f"must hold 1..{len(test)} rows, got {len(out)}")
    _require(all(int(r) in position for r in out.rows), who, "holds row ids that are not in the input")
    src = np.array([position[int(r)] for r in out.rows])
    _require(np.array_equal(out.labels, test.labels[src]), who, "must keep each row's TRUE label")
    _require(all(out.texts[k] != test.texts[i] for k, i in enumerate(src)), who, "has rows without a trigger")
    _require(out.poisoned.all() and out.label_names == test.label_names, who, "must flag every row as poisoned")


# --------------------------------------------------------------------------------- defenses and paraphrasers


def check_defense_contract(defense: Defense) -> None:
    """What can be checked without a model: the plugin-object rules, a known ``kind`` and known ``settings``."""
    check_plugin_object(defense, "defense")
    who = f"defense {defense.name!r}"
    _require(defense.kind in DEFENSE_KINDS, who, f"kind must be one of {', '.join(DEFENSE_KINDS)}, got {defense.kind!r}")
    settings = defense.settings
    _require(isinstance(settings, tuple) and len(settings) > 0 and set(settings) <= set(SETTINGS), who,
             f"settings must be a non-empty tuple of {', '.join(SETTINGS)}, got {settings!r}")


def check_paraphraser_contract(paraphraser: Paraphraser, texts: list[str], style: str) -> None:
    """One string per input, in order, and the same output for the same input."""
    who = f"paraphraser {paraphraser.name!r}"
    out = paraphraser.paraphrase(list(texts), style)
    _require(isinstance(out, list) and len(out) == len(texts) and all(isinstance(t, str) for t in out), who,
             f"must return a list of {len(texts)} strings")
    _require(out == paraphraser.paraphrase(list(texts), style), who, "is not deterministic")
