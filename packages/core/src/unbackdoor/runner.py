"""The experiment: attack -> victim -> defense -> evaluation -> report.

Every stage is cached under a hash of its config (``StageCache``), so a
second defense reuses the poisoned model and a killed run resumes where it
stopped. Results land in the output directory only at the end, atomically.

Under ``torchrun`` (:mod:`unbackdoor.ranks`) every rank runs every stage (training data-parallel,
evaluating the same rows alike) and rank 0 alone writes ``run.json``, the cache entries, the results
and the plots, and logs; the others read what it wrote.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as metadata
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .attack import Attack, PoisonConfig, fields_of, non_target
from .backend import Backend, selected_backend_name
from .cache import StageCache, atomic_write_json, atomic_write_text, default_cache_dir
from .config import ExperimentConfig, build_config, normalize
from .data import DatasetSplits, TextDataset, load_dataset
from .defense import Defense, DefenseContext, DefenseOutcome
from .errors import ConfigError
from .losses import softmax
from .metrics import accuracy, attack_success_rate, auroc, detection_scores, poisoned_accuracy, triggered_confusion
from .models import resolve_model
from .plots import pca_2d
from .plugins import PluginManager, get_plugin_manager
from .preflight import check_run_inputs, record_run, resume_config
from .ranks import check_batch_sizes, ranks_of
from .report import markdown_table, with_intervals
from .specs import CrossEntropy

DISTRIBUTIONS = ("unbackdoor", "unbackdoor-torch", "unbackdoor-jax", "unbackdoor-attacks", "unbackdoor-defenses",
                 "torch", "transformers", "peft", "jax", "flax", "optax", "numpy")


@dataclass
class Judged:
    """Predictions on one evaluation set, with the detector's verdicts when there is one."""

    predictions: np.ndarray
    confidence: np.ndarray
    scores: np.ndarray | None = None
    flagged: np.ndarray | None = None
    hidden: np.ndarray | None = None

    def at(self, threshold: float) -> Judged:
        """The same verdicts with another detection threshold."""
        return dataclasses.replace(self, flagged=self.scores > threshold)  # type: ignore[operator]

    @property
    def kept_predictions(self) -> np.ndarray:
        """Predictions with rejected (flagged) inputs set to -1, a class nobody has."""
        return self.predictions if self.flagged is None else np.where(self.flagged, -1, self.predictions)


def _detection(scores: list[np.ndarray | None], flagged: list[np.ndarray | None]) -> dict[str, float]:
    """Detection quality: clean test rows are negatives, every triggered set's rows positives; with the counts
    precision (``flagged``) and recall (``positives``) are measured on."""
    truth = np.concatenate([np.full(len(s), i > 0) for i, s in enumerate(scores)])  # type: ignore[arg-type]
    result = detection_scores(np.concatenate(flagged), truth)  # type: ignore[arg-type]
    result["auroc"] = auroc(np.concatenate(scores), truth)  # type: ignore[arg-type]
    counts = {"flagged": int(np.concatenate(flagged).sum()), "positives": int(truth.sum())}  # type: ignore[arg-type]
    return {**{k: round(v, 4) for k, v in result.items()}, **counts}


def _per_trigger(counts: dict[str, int]) -> int | dict[str, int]:
    """Row counts by trigger, or the one number when there is a single trigger."""
    return next(iter(counts.values())) if len(counts) == 1 else counts


def _hidden_pca(clean: np.ndarray | None, triggered: np.ndarray | None) -> dict[str, list[list[float]]]:
    """Pooled hidden states of clean and (first trigger's) triggered test rows, projected together to 2-D."""
    if clean is None or triggered is None:
        return {}
    points = pca_2d(np.concatenate([clean, triggered]))
    rounded = [[round(float(x), 4), round(float(y), 4)] for x, y in points]
    return {"clean": rounded[: len(clean)], "triggered": rounded[len(clean):]}


def _floats(*arrays: np.ndarray | None) -> list[float]:
    """Arrays as one rounded list (for results.json)."""
    return [round(float(x), 5) for a in arrays if a is not None for x in a]


@dataclass
class Plan:
    """Everything resolved from the config before any expensive work starts."""

    cfg: ExperimentConfig
    backend_name: str
    attack: Attack
    defenses: list[Defense]
    splits: DatasetSplits
    user_train: TextDataset
    attacker_train: TextDataset
    test: TextDataset
    poison: PoisonConfig
    #: the attacker's rows after poisoning (computed in :func:`plan`, so data errors surface before training)
    poisoned_train: TextDataset
    #: the attack's triggered copies of the test rows, per trigger (computed once, in :func:`plan`)
    triggered: dict[str, TextDataset]
    pm: PluginManager
    #: defenses applied to the unpoisoned student (``clean_baseline``'s none first, then ``clean_defenses``)
    clean: list[Defense] = dataclasses.field(default_factory=list)
    #: the user's rows before poisoning (the clean student trains on them in the data setting)
    clean_user: TextDataset | None = None
    #: data setting: the defender's trusted clean rows a teacher learns from
    teacher_train: TextDataset | None = None


def plan(cfg: ExperimentConfig, pm: PluginManager | None = None) -> Plan:
    """Resolve names, options and data; raise a clear error before any training on bad input."""
    pm = pm or get_plugin_manager()
    cfg = normalize(cfg)
    backend_name = selected_backend_name(cfg.backend)
    pm.backend(backend_name)
    attack = pm.attack(cfg.attack).configure(**cfg.attack_options)
    named = list(dict.fromkeys((*cfg.defenses, *cfg.clean_defenses)))
    unknown = sorted(set(cfg.defense_options) - set(named))
    if unknown:
        raise ConfigError(f"defense_options names {unknown[0]!r}, which is not among the defenses {named}")
    defenses = [pm.defense(name).configure(**cfg.defense_options.get(name, {})) for name in cfg.defenses]
    _check_settings(defenses, cfg.setting, pm)
    # the clean student: the floor (none, configured like the poisoned run's) and the "clean model" case
    clean = [pm.defense(name).configure(**cfg.defense_options.get(name, {}))
             for name in dict.fromkeys((*(("none",) if cfg.clean_baseline else ()), *cfg.clean_defenses))]
    splits = load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed, encoding=cfg.encoding)
    user, attacker = _disjoint_rows(splits.train, cfg)
    test = splits.test.shuffled(cfg.seed).head(cfg.test_rows)
    poison = PoisonConfig(cfg.target, cfg.poison_rate, cfg.clean_label, cfg.seed, cfg.dataset,
                          cfg.data_dir).validate(splits.train.num_labels)
    data_setting = cfg.setting == "data"
    with pm.running("attack", attack.name):
        poisoned = attack.poison_train(user if data_setting else attacker, poison)
        triggered = attack.triggered_tests(test, poison)
    return Plan(cfg, backend_name, attack, defenses, splits, poisoned if data_setting else user, attacker, test, poison,
                poisoned, triggered, pm, clean, clean_user=user, teacher_train=attacker if data_setting else None)


def _check_settings(defenses: list[Defense], setting: str, pm: PluginManager) -> None:
    """A clear error for a defense that does not apply in ``setting`` (e.g. fine-pruning with no released model)."""
    wrong = next((d for d in defenses if setting not in d.settings), None)
    if wrong is None:
        return
    fit = sorted(name for name, found in pm.defenses().items() if setting in found.obj.settings)
    why = (" (it acts on a poisoned released model; with --setting data there is none: the base student learns the "
           "poisoned rows inside each defense)") if setting == "data" else ""
    raise ConfigError(f"defense {wrong.name!r} applies with --setting {' or '.join(wrong.settings)}, not "
                      f"{setting}{why}; the defenses for --setting {setting}: {', '.join(fit)}")


def _disjoint_rows(train: TextDataset, cfg: ExperimentConfig) -> tuple[TextDataset, TextDataset]:
    """The user's rows and, disjoint from them, the attacker's (weight setting) or the trusted rows (data setting)."""
    other, role = ("teacher_rows", "trusted") if cfg.setting == "data" else ("attacker_rows", "attacker")
    need = cfg.user_rows + getattr(cfg, other)
    if need > len(train):
        raise ConfigError(f"user_rows + {other} = {need} exceeds the {len(train)} training rows of {cfg.dataset!r}")
    rows = train.shuffled(cfg.seed)
    user = rows.head(cfg.user_rows)
    second = rows.subset(range(cfg.user_rows, need), f"{train.name}[{role}]")
    return user, second


class Experiment:
    """Runs a :class:`Plan` stage by stage, with caching, and writes the report."""

    def __init__(self, plan: Plan, backend: Backend, cache: StageCache, log: Callable[[str], None] = print) -> None:
        self.plan, self.backend, self.cache, self.log = plan, backend, cache, log
        self.cfg = plan.cfg
        self.ranks = cache.ranks  # rank 0 writes the report; every rank runs every stage
        self.timings: dict[str, float] = {}

    # -- stage keys -------------------------------------------------------------------------------
    def _base_key(self) -> dict[str, Any]:
        c = self.cfg
        return {"backend": self.plan.backend_name, "model": c.model, "dataset": c.dataset, "seed": c.seed,
                "max_length": c.max_length, "precision": c.precision}

    def victim_key(self) -> dict[str, Any]:
        """What the poisoned (released) model depends on; in the data setting, what the poisoned user data does."""
        c = self.cfg
        if c.setting == "data":
            return {**self._base_key(), "setting": "data", "attack": self.plan.attack.name,
                    "attack_options": fields_of(self.plan.attack), "poison": dataclasses.asdict(self.plan.poison),
                    "user_rows": c.user_rows, "teacher_rows": c.teacher_rows}
        return {**self._base_key(), "attack": self.plan.attack.name, "attack_options": fields_of(self.plan.attack),
                "poison": dataclasses.asdict(self.plan.poison), "attacker_rows": c.attacker_rows,
                "user_rows": c.user_rows, "spec": dataclasses.asdict(c.attacker_spec())}

    def _defense_key(self, defense: Defense, victim: dict[str, Any] | None) -> dict[str, Any]:
        c = self.cfg
        return {"victim": victim, "base": self._base_key(), "defense": defense.name, "options": fields_of(defense),
                "teacher": c.teacher, "lora": dataclasses.asdict(c.lora()), "spec": dataclasses.asdict(c.user_spec()),
                "test_rows": c.test_rows, "attack": self.plan.attack.name, "poison": dataclasses.asdict(self.plan.poison)}

    # -- stages -----------------------------------------------------------------------------------
    def victim(self) -> Path:
        """Stage 1: the attacker fully fine-tunes the student on poisoned rows (cached)."""
        poisoned = self.plan.poisoned_train

        def build(tmp: Path) -> None:
            self.log(f"stage victim: full fine-tune on {len(poisoned)} rows ({int(poisoned.poisoned.sum())} poisoned)")
            model = self.backend.load_classifier(resolve_model(self.cfg.model, self._cache_dir()),
                                                 poisoned.num_labels, seed=self.cfg.seed)
            stats = self.backend.train(model, poisoned, CrossEntropy(), self.cfg.attacker_spec(), desc="attacker")
            self.backend.save(model, tmp)
            atomic_write_json(tmp / "train.json", stats.summary())

        return self._timed("victim", lambda: self.cache.get_or_build("victim", self.victim_key(), build))

    def evaluate(self, model: Any, desc: str, outcome: DefenseOutcome | None = None) -> dict[str, Any]:
        """CA on clean test rows; ASR on triggered non-target copies (per trigger when there are several).

        PACC (accuracy of triggered rows of ALL classes against their true labels; the worst trigger) and
        the triggered confusion per trigger (``[true][predicted]`` counts) make trigger shifting visible.

        With a detector, flagged inputs are rejected: a flagged clean input counts as an error (CA) and a
        flagged triggered input as a failed attack (ASR); the model's own figures stay as CA_model/ASR_model
        and detection precision/recall/F1/AUROC are added. With a transform, inputs are rewritten first.
        """
        p = self.plan
        clean = self._judge(model, p.test, f"{desc}: clean test", outcome)
        metrics: dict[str, Any] = {"CA": round(accuracy(clean.kept_predictions, p.test.labels), 2)}
        asr, scores, flagged, confidence, pacc, confusion = {}, [clean.scores], [clean.flagged], [], {}, {}
        triggered_judged: list[tuple[TextDataset, Judged]] = []
        for trigger, triggered in p.triggered.items():
            asr_set = non_target(triggered, p.poison.target)
            judged = self._judge(model, asr_set, f"{desc}: {trigger} test", outcome)
            triggered_judged.append((asr_set, judged))
            confidence.append(judged.confidence)
            asr[trigger] = round(attack_success_rate(judged.kept_predictions, asr_set.labels, p.poison.target), 2)
            pacc[trigger], confusion[trigger] = self._pacc(model, triggered, judged, f"{desc}: {trigger} test", outcome)
            scores.append(judged.scores)
            flagged.append(judged.flagged)
            if judged.scores is not None:
                metrics.setdefault("ASR_model_by_trigger", {})[trigger] = round(
                    attack_success_rate(judged.predictions, asr_set.labels, p.poison.target), 2)
        metrics["ASR"] = max(asr.values())
        if len(asr) > 1:
            metrics["ASR_by_trigger"] = asr
        metrics["PACC"] = min(pacc.values())
        if len(pacc) > 1:
            metrics["PACC_by_trigger"] = pacc
        metrics["triggered_confusion"] = confusion
        metrics["hidden_pca"] = _hidden_pca(clean.hidden, triggered_judged[0][1].hidden)
        if clean.scores is not None:
            metrics["CA_model"] = round(accuracy(clean.predictions, p.test.labels), 2)
            metrics["ASR_model"] = max(metrics.pop("ASR_model_by_trigger").values())
            metrics["detection"] = {**_detection(scores, flagged), "threshold": outcome.detector.threshold}  # type: ignore[union-attr]
            metrics["detector_scores"] = {"clean": _floats(clean.scores), "triggered": _floats(*scores[1:])}
            metrics["model_confidence"] = {"clean": _floats(clean.confidence), "triggered": _floats(*confidence)}
            sweep = getattr(outcome.detector, "thresholds", ()) if outcome else ()
            if sweep:
                metrics["threshold_sweep"] = self._sweep(sweep, clean, triggered_judged)
        return metrics

    def _pacc(self, model: Any, triggered: TextDataset, non_target_judged: Judged, desc: str,
              outcome: DefenseOutcome | None) -> tuple[float, list[list[int]]]:
        """PACC and the ``[C, C]`` confusion (true x predicted) of the triggered rows of ALL classes.

        Both describe the model's own predictions (a detector's rejections are not applied; a transform
        is); the non-target rows reuse ``non_target_judged``, only the target-class rows are predicted here.
        """
        target = self.plan.poison.target
        rest = triggered.subset(np.flatnonzero(triggered.labels == target))
        pred = non_target_judged.predictions
        if len(rest):
            plain = None if outcome is None else dataclasses.replace(outcome, detector=None)
            pred = np.concatenate([pred, self._judge(model, rest, desc, plain).predictions])
        labels = np.concatenate([non_target(triggered, target).labels, rest.labels])
        return (round(poisoned_accuracy(pred, labels), 2),
                triggered_confusion(pred, labels, self.plan.test.num_labels).tolist())

    def _sweep(self, thresholds: tuple[float, ...], clean: Judged, triggered: list[tuple[TextDataset, Judged]]
               ) -> list[dict[str, float]]:
        """Detection and end-to-end figures at each threshold, from the scores already computed."""
        target, rows = self.plan.poison.target, []
        for t in thresholds:
            at = [j.at(t) for _, j in triggered]
            flagged = [clean.scores > t, *[j.flagged for j in at]]  # type: ignore[operator]
            truth = np.concatenate([np.full(len(f), i > 0) for i, f in enumerate(flagged)])
            asr = max(attack_success_rate(j.kept_predictions, d.labels, target) for (d, _), j in zip(triggered, at,
                                                                                                       strict=True))
            rows.append({"threshold": t, **detection_scores(np.concatenate(flagged), truth),
                         "CA": round(accuracy(clean.at(t).kept_predictions, self.plan.test.labels), 2),
                         "ASR": round(asr, 2)})
        return rows

    def _judge(self, model: Any, data: TextDataset, desc: str, outcome: DefenseOutcome | None) -> Judged:
        if outcome is not None and outcome.transform is not None:
            data = dataclasses.replace(data, texts=tuple(outcome.transform(data.texts)))
        out = self.backend.predict(model, data, batch_size=self.cfg.eval_batch_size, max_length=self.cfg.max_length,
                                   hidden=True, desc=desc)
        pred, confidence = out.logits.argmax(-1), softmax(out.logits).max(-1)
        detector = outcome.detector if outcome is not None else None
        if detector is None:
            return Judged(pred, confidence, hidden=out.hidden)
        scores = np.asarray(detector.score(data), np.float64)
        return Judged(pred, confidence, scores, scores > detector.threshold, out.hidden)

    def released_row(self, victim: Path) -> dict[str, Any]:
        """Metrics of the poisoned model as released (before the user's fine-tune)."""
        key = {"released": self.victim_key(), "test_rows": self.cfg.test_rows}

        def compute() -> dict[str, Any]:
            model = self.backend.load_classifier(victim, self.plan.test.num_labels, seed=self.cfg.seed)
            return {"stage": "poisoned (released)", "defense": "-", **self.evaluate(model, "released")}

        return self._cached("released", key, compute)

    def defense_row(self, defense: Defense, victim: Path | None, poisoned_data: bool = False) -> dict[str, Any]:
        """Stage 2 + evaluation for one defense.

        ``victim``: the released model (weight setting). ``victim=None``: the base student, trained on the
        user's poisoned rows when ``poisoned_data`` (data setting), else on clean rows (the clean student, the floor).
        """
        poisoned = victim is not None or poisoned_data
        key = self._defense_key(defense, self.victim_key() if poisoned else None)
        stage = "poisoned + defense" if victim else "poisoned data + defense" if poisoned_data else "clean student"

        def compute() -> dict[str, Any]:
            self.log(f"stage defense: {defense.name} ({stage})")
            p = self.plan
            train = p.user_train if poisoned or p.clean_user is None else p.clean_user
            ctx = self._context(victim, train, defense.uses_teacher)
            start = time.perf_counter()
            with self.plan.pm.running("defense", defense.name):
                outcome = defense.apply(ctx)
            seconds = time.perf_counter() - start
            metrics = self.evaluate(outcome.model, defense.name, outcome)
            return {"stage": stage, "defense": defense.name, **metrics, "seconds": round(seconds, 1),
                    "stats": outcome.stats}

        # every option the defense ran with, defaults included (the cache key holds them, so a cached row has them too)
        return {**self._cached("defense", key, compute), "options": key["options"]}

    def _context(self, victim: Path | None, train: TextDataset, uses_teacher: bool = False) -> DefenseContext:
        """What a defense gets; ``victim=None``: the base student stands in for the released model; the
        teacher only for a defense that ``uses_teacher``."""
        c, p = self.cfg, self.plan
        teacher = resolve_model(c.teacher, self._cache_dir()) if c.teacher and uses_teacher else None
        student = resolve_model(c.model, self._cache_dir())
        return DefenseContext(self.backend, victim or student, teacher, train, p.splits.dev, p.test.num_labels,
                              c.lora(), c.user_spec(), self.cache, self._base_key(), self.log,
                              student_path=student,
                              victim_train=None if c.setting == "data" else p.poisoned_train,
                              attacker_spec=c.attacker_spec(), teacher_train=p.teacher_train)

    def _cached(self, stage: str, key: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        hit = self.cache.load_json(stage, key)
        if hit is not None:
            self.log(f"stage {stage}: reusing cached result ({hit.get('defense', '')})")
            return dict(hit)
        result = compute()
        self.cache.save_json(stage, key, result)
        return result

    def _timed(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 1)

    def _cache_dir(self) -> Path:
        return self.cache.root

    # -- the whole run ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """All stages; returns the results dict (also written to ``cfg.out``)."""
        start = time.perf_counter()
        rows = []
        for defense in self.plan.clean:
            timing = "clean" if defense.name == "none" else f"clean {defense.name}"
            rows.append(self._timed(timing, lambda d=defense: self.defense_row(d, None)))
        data_setting = self.cfg.setting == "data"  # no attacker stage: defenses train the base student on poisoned rows
        victim = None if data_setting else self.victim()
        if victim is not None:
            rows.append(self._timed("released", lambda: self.released_row(victim)))
        for defense in self.plan.defenses:
            rows.append(self._timed(defense.name, lambda d=defense: self.defense_row(d, victim, data_setting)))
        self.timings["total"] = round(time.perf_counter() - start, 1)
        results = self._results(rows, victim)
        if self.ranks.rank == 0:  # every rank holds the same results; one writes them
            write_results(Path(self.cfg.out), results)
            self._plots(results)
        self.ranks.barrier()  # the report exists when any rank returns
        return results

    def _plots(self, results: dict[str, Any]) -> None:
        """PNG plots next to the results (skipped, with a note, where matplotlib is not installed)."""
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.log("plots skipped: pip install matplotlib (or unbackdoor[plots]) to get them")
            return
        from .plots import report_plots

        written = report_plots([results], Path(self.cfg.out) / "plots")
        self.log(f"wrote {len(written)} plots to {Path(self.cfg.out) / 'plots'}")

    def _asr_rows(self) -> int | dict[str, int]:
        """How many triggered rows each ASR is measured on (one number for a single trigger)."""
        p = self.plan
        return _per_trigger({trigger: len(non_target(data, p.poison.target)) for trigger, data in p.triggered.items()})

    def _pacc_rows(self) -> int | dict[str, int]:
        """How many triggered rows (every class) each PACC is measured on (one number for a single trigger)."""
        return _per_trigger({trigger: len(data) for trigger, data in self.plan.triggered.items()})

    def _results(self, rows: list[dict[str, Any]], victim: Path | None = None) -> dict[str, Any]:
        p = self.plan
        data = {"user_train": len(p.user_train), "attacker_train": len(p.attacker_train), "test": len(p.test),
                "asr_test": self._asr_rows(), "pacc_test": self._pacc_rows()}
        return {"config": self.cfg.to_dict(), "backend": p.backend_name, "attack": fields_of(p.attack),
                "poison": dataclasses.asdict(p.poison), "rows": [with_intervals(row, data) for row in rows],
                "timings_s": self.timings, "data": data,
                "versions": versions(), "platform": platform.platform(), "python": platform.python_version(),
                "device": getattr(self.backend, "device_name", "unknown"),  # an optional backend attribute
                "world_size": self.ranks.world_size,
                # the poisoned model as released (a cache entry; `unbackdoor audit --model OUT` reads it from here)
                "released_model": None if victim is None else str(victim)}


def versions() -> dict[str, str]:
    """Installed versions of our distributions and the frameworks."""
    found = {}
    for name in DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def write_results(out: Path, results: dict[str, Any]) -> None:
    """``results.json`` and ``results.md``, each written atomically."""
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", markdown_table(results) + "\n")


def run_experiment(cfg: ExperimentConfig, pm: PluginManager | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Python API: plan and check (validating everything), record the run, then run and write the report.

    Finished stages come from the cache, so calling this again with the same config after a crash (or
    :func:`resume_experiment`) resumes the run. Under ``torchrun`` every rank calls this; rank 0 alone
    records, writes and logs (``log`` is not called on the other ranks), and every rank returns the results.
    """
    the_plan = plan(cfg, pm)
    cfg = the_plan.cfg
    pm = pm or get_plugin_manager()
    backend = pm.backend(the_plan.backend_name).create()
    ranks = ranks_of(backend, the_plan.backend_name)
    check_batch_sizes(_batch_sizes(cfg), ranks.world_size)
    for knob in ("precision", "gradient_checkpointing"):  # the backends' runtime settings (memory, speed)
        if hasattr(backend, knob):
            setattr(backend, knob, getattr(cfg, knob))
    cfg, out, _ = check_run_inputs(cfg, any(d.uses_teacher for d in (*the_plan.defenses, *the_plan.clean)))
    the_plan = dataclasses.replace(the_plan, cfg=cfg)
    if ranks.rank == 0:
        record_run(cfg, out)
    cache = StageCache(Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(), ranks)
    return Experiment(the_plan, backend, cache, log if ranks.rank == 0 else _silent).run()


def _batch_sizes(cfg: ExperimentConfig) -> dict[str, int]:
    """The run's global batch sizes by option (a defense's own, e.g. w2s's teacher batch, is checked as it trains)."""
    user = {"user_batch_size (--user-batch-size)": cfg.user_batch_size}
    if cfg.setting == "data":  # no attacker stage
        return user
    return {"attacker_batch_size (--attacker-batch-size)": cfg.attacker_batch_size, **user}


def _silent(line: str) -> None:
    """The log of the ranks other than 0: one copy of the log, not one per process."""


def resume_experiment(out: str | Path, pm: PluginManager | None = None, log: Callable[[str], None] = print,
                      **overrides: Any) -> dict[str, Any]:
    """Python API of ``unbackdoor run --resume``: rerun the config recorded in ``<out>/run.json``.

    Stages finished before the interruption come from the cache; ``overrides`` change config fields.
    """
    cfg = build_config(resume_config(out), {"out": str(out)}, overrides)
    return run_experiment(cfg, pm, log)
