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

from .attack import Attack, PoisonConfig, fields_of
from .backend import (
    AutoPrecisionBackend,
    Backend,
    CheckpointingBackend,
    DeviceBackend,
    PrecisionBackend,
    selected_backend_name,
)
from .cache import StageCache, atomic_write_json, atomic_write_text, default_cache_dir
from .config import ExperimentConfig, build_config, normalize
from .data import DatasetSplits, TextDataset, load_dataset
from .defense import Defense, DefenseContext
from .errors import ConfigError
from .evaluation import Evaluator
from .models import resolve_model
from .plugins import PluginManager, get_plugin_manager
from .preflight import check_run_inputs, record_run, resume_config
from .ranks import check_batch_sizes, ranks_of
from .report import markdown_table, with_intervals
from .specs import CrossEntropy

DISTRIBUTIONS = ("unbackdoor", "unbackdoor-torch", "unbackdoor-jax", "unbackdoor-attacks", "unbackdoor-defenses",
                 "torch", "transformers", "peft", "jax", "flax", "optax", "numpy")


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
    return Plan(cfg=cfg, backend_name=backend_name, attack=attack, defenses=defenses, splits=splits,
                user_train=poisoned if data_setting else user, attacker_train=attacker, test=test, poison=poison,
                poisoned_train=poisoned, triggered=triggered, pm=pm, clean=clean, clean_user=user,
                teacher_train=attacker if data_setting else None)


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
        self.evaluator = Evaluator(backend, plan.test, plan.triggered, plan.poison.target, self.cfg.eval_batch_size,
                                   self.cfg.max_length)
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

    def released_row(self, victim: Path) -> dict[str, Any]:
        """Metrics of the poisoned model as released (before the user's fine-tune)."""
        key = {"released": self.victim_key(), "test_rows": self.cfg.test_rows}

        def compute() -> dict[str, Any]:
            model = self.backend.load_classifier(victim, self.plan.test.num_labels, seed=self.cfg.seed)
            return {"stage": "poisoned (released)", "defense": "-", **self.evaluator.evaluate(model, "released")}

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
            metrics = self.evaluator.evaluate(outcome.model, defense.name, outcome)
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
        return DefenseContext(backend=self.backend, victim_path=victim or student, teacher_path=teacher,
                              clean_train=train, clean_dev=p.splits.dev, num_labels=p.test.num_labels, lora=c.lora(),
                              train=c.user_spec(), cache=self.cache, cache_key=self._base_key(), log=self.log,
                              student_path=student, victim_train=None if c.setting == "data" else p.poisoned_train,
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

    def _results(self, rows: list[dict[str, Any]], victim: Path | None = None) -> dict[str, Any]:
        p = self.plan
        data = {"user_train": len(p.user_train), "attacker_train": len(p.attacker_train), "test": len(p.test),
                "asr_test": self.evaluator.asr_rows(), "pacc_test": self.evaluator.pacc_rows()}
        return {"config": self.cfg.to_dict(), "backend": p.backend_name, "attack": fields_of(p.attack),
                "poison": dataclasses.asdict(p.poison), "rows": [with_intervals(row, data) for row in rows],
                "timings_s": self.timings, "data": data,
                "versions": versions(), "platform": platform.platform(), "python": platform.python_version(),
                "device": self.backend.device_name if isinstance(self.backend, DeviceBackend) else "unknown",
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
    pm = pm or get_plugin_manager()
    backend = pm.backend(the_plan.backend_name).create()
    ranks = ranks_of(backend, the_plan.backend_name)
    log = log if ranks.rank == 0 else _silent
    cfg = resolve_precision(the_plan.cfg, backend, log)
    the_plan = dataclasses.replace(the_plan, cfg=cfg)
    check_batch_sizes(_batch_sizes(cfg), ranks.world_size)
    set_runtime(backend, cfg)
    cfg, out, _ = check_run_inputs(cfg, any(d.uses_teacher for d in (*the_plan.defenses, *the_plan.clean)))
    the_plan = dataclasses.replace(the_plan, cfg=cfg)
    if ranks.rank == 0:
        record_run(cfg, out)
    cache = StageCache(Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(), ranks)
    return Experiment(the_plan, backend, cache, log).run()


def resolve_precision(cfg: ExperimentConfig, backend: Backend, log: Callable[[str], None] = print) -> ExperimentConfig:
    """``cfg`` with ``precision=auto`` replaced by the backend's choice (fp32 when it has none); a note when bf16 is
    asked for on a device that only emulates it (it then runs many times slower than fp32)."""
    advisor = backend if isinstance(backend, AutoPrecisionBackend) else None
    if cfg.precision == "auto":
        chosen = advisor.auto_precision() if advisor else "fp32"
        log(f"precision auto: {chosen} on this device")
        return dataclasses.replace(cfg, precision=chosen)
    if cfg.precision == "bf16" and advisor and not advisor.native_bf16():
        log(f"note: precision bf16 on a device without native bf16 matmuls ({_device(backend)}): it runs many "
            "times slower than fp32 here; --precision auto (or fp32) avoids that")
    return cfg


def _device(backend: Backend) -> str:
    return backend.device_name if isinstance(backend, DeviceBackend) else "this device"


def set_runtime(backend: Backend, cfg: ExperimentConfig) -> None:
    """The backend's runtime settings (speed, memory) from the config, where it has them (capability protocols)."""
    if isinstance(backend, PrecisionBackend):
        backend.precision = cfg.precision
    if isinstance(backend, CheckpointingBackend):
        backend.gradient_checkpointing = cfg.gradient_checkpointing


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
