"""``unbackdoor audit``: check the inputs, run an auditor on a released classifier, write the report.

Every input is checked before any compute (the model is a saved sequence classifier, the dataset has the
head's label count and enough rows per class, the auditor and its options exist, the backend can run
it); ``audit.json`` and ``audit.md`` are written atomically at the end, so a failed audit leaves nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .attack import fields_of
from .auditor import AuditContext, Auditor, AuditResult
from .backend import Backend, selected_backend_name
from .cache import atomic_write_json, atomic_write_text
from .data import TextDataset, load_dataset
from .errors import ConfigError
from .layout import HEAD_FILE, META_FILE, HeadMeta
from .models import resolve_model
from .plugins import PluginManager, get_plugin_manager
from .runner import versions
from .text import TextEncoder

DEFAULT_AUDITOR = "trigger-search"
#: clean rows of the dataset's dev split the audit uses by default (a seeded sample)
DEFAULT_ROWS = 200
#: candidates kept in audit.json (audit.md and the command line show the top 5)
KEPT_CANDIDATES = 20


def audit(model: str | Path, dataset: str | Path, *, reference: str | Path | None = None,
          backend: str | None = None, auditor: str = DEFAULT_AUDITOR,
          auditor_options: Mapping[str, Any] | None = None, out: str | Path | None = None,
          rows: int | None = DEFAULT_ROWS, seed: int = 0, data_dir: str | Path | None = None,
          pm: PluginManager | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Audit the classifier ``model`` on clean rows of ``dataset``; returns what ``audit.json`` holds.

    ``rows`` clean rows (a seeded sample of the dev split; None: all of it) feed the auditor; ``reference``
    is a clean classifier of the same task and tokenizer that screens out universal adversarial words.
    With ``out``, ``audit.json``, ``audit.md`` and the plot ``audit.png`` are written there.
    """
    pm = pm or get_plugin_manager()
    chosen = _configured(pm, auditor, auditor_options or {})
    model_path, meta = classifier_dir(model, "model")
    clean = clean_rows(dataset, meta.num_labels, rows, seed, data_dir, chosen)
    ref_path = _reference(reference, model_path, meta.num_labels) if reference is not None else None
    engine = _backend(pm, backend, chosen)
    ctx = AuditContext(engine, model_path, clean, meta.num_labels, ref_path, seed, log)
    start = time.perf_counter()
    with pm.running("auditor", chosen.name):
        result = chosen.audit(ctx)
    report = audit_record(result, ctx, chosen, engine, time.perf_counter() - start, str(model), str(dataset))
    if out is not None:
        write_audit(report, Path(out), log)
    return report


def _configured(pm: PluginManager, name: str, options: Mapping[str, Any]) -> Auditor:
    return pm.auditor(name).configure(**dict(options))


def classifier_dir(name_or_path: str | Path, what: str) -> tuple[Path, HeadMeta]:
    """The directory of a saved sequence classifier and its head, or a one-line :class:`ConfigError`.

    A run directory of ``unbackdoor run`` (its ``results.json`` names the ``released_model``) stands for the
    poisoned model it released.
    """
    path = released_model(Path(name_or_path)) or resolve_model(str(name_or_path))
    missing = [f for f in (HEAD_FILE, META_FILE) if not (path / f).is_file()]
    if missing:
        raise ConfigError(f"{what} {str(name_or_path)!r} is not a saved sequence classifier (no {' or '.join(missing)}); "
                          "audit a classifier saved by unbackdoor, e.g. the released model of `unbackdoor run`")
    try:
        meta = HeadMeta(**json.loads((path / META_FILE).read_text()))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} {str(name_or_path)!r}: {META_FILE} is not a valid head description ({exc})") from None
    return path, meta


def released_model(run: Path) -> Path | None:
    """The released model a run directory's ``results.json`` names; None when ``run`` is not such a directory."""
    results = run.expanduser() / "results.json"
    if not results.is_file():
        return None
    try:
        named = json.loads(results.read_text()).get("released_model")
    except (ValueError, AttributeError):
        raise ConfigError(f"{str(results)!r} is not a results.json of `unbackdoor run`") from None
    if not named:
        raise ConfigError(f"run {str(run)!r} released no model (a --setting data run); audit a saved classifier")
    if not Path(named).is_dir():
        raise ConfigError(f"run {str(run)!r} names released model {named!r}, which is gone from the cache; "
                          "rerun the experiment (its victim stage rebuilds it)")
    return Path(named)


def clean_rows(dataset: str | Path, num_labels: int, rows: int | None, seed: int,
               data_dir: str | Path | None, auditor: Auditor) -> TextDataset:
    """The audit's clean rows: a seeded sample of ``rows`` dev rows, checked against the head and the auditor."""
    if rows is not None and rows < 1:
        raise ConfigError(f"rows must be >= 1 (or None for the whole dev split), got {rows!r}")
    data = load_dataset(str(dataset), data_dir=data_dir, seed=seed)
    if data.dev.num_labels != num_labels:
        raise ConfigError(f"dataset {str(dataset)!r} has {data.dev.num_labels} labels "
                          f"({', '.join(data.dev.label_names)}) but the model's head has {num_labels}")
    clean = data.dev.shuffled(seed).head(rows)
    need = auditor.min_rows_per_class()
    counts = np.bincount(clean.labels, minlength=num_labels)
    for label, count in enumerate(counts):
        if count < need:
            raise ConfigError(f"dataset {str(dataset)!r}: {count} clean rows of class {clean.label_names[label]!r} "
                              f"among {len(clean)} rows; auditor {auditor.name!r} needs at least {need} per class "
                              "(raise rows, or lower the auditor's min_rows)")
    return clean


def _reference(reference: str | Path, model_path: Path, num_labels: int) -> Path:
    """A reference classifier with the audited model's label count and tokenizer vocabulary."""
    path, meta = classifier_dir(reference, "reference model")
    if meta.num_labels != num_labels:
        raise ConfigError(f"reference model {str(reference)!r} has {meta.num_labels} labels, the audited model "
                          f"{num_labels}")
    if TextEncoder.from_dir(path).tokenizer.get_vocab() != TextEncoder.from_dir(model_path).tokenizer.get_vocab():
        raise ConfigError(f"reference model {str(reference)!r} has another tokenizer vocabulary than the audited "
                          "model; a reference must share the audited model's tokenizer")
    return path


def _backend(pm: PluginManager, name: str | None, auditor: Auditor) -> Backend:
    chosen = selected_backend_name(name)
    engine = pm.backend(chosen).create()
    missing = [m for m in auditor.backend_methods if not callable(getattr(engine, m, None))]
    if missing:
        raise ConfigError(f"auditor {auditor.name!r} is not implemented on the {chosen} backend yet (it needs "
                          f"Backend.{missing[0]}); use --backend torch or --backend jax")
    return engine


def audit_record(result: AuditResult, ctx: AuditContext, auditor: Auditor, engine: Backend, seconds: float,
                 model: str, dataset: str) -> dict[str, Any]:
    """What ``audit.json`` holds: the inputs, the auditor's options, the result and the time."""
    names = ctx.clean.label_names
    record = result.to_json()
    record["candidates"] = record["candidates"][:KEPT_CANDIDATES]
    return {"model": model, "model_path": str(ctx.model_path), "dataset": dataset, "rows": len(ctx.clean),
            "reference": str(ctx.reference_path) if ctx.reference_path else None, "backend": engine.name,
            "auditor": auditor.name, "options": fields_of(auditor), "seed": ctx.seed, "label_names": list(names),
            **record, "target_name": names[result.target] if result.target is not None else None,
            "seconds": round(seconds, 3), "versions": versions()}


def audit_markdown(report: Mapping[str, Any], top: int = 5) -> str:
    """``audit.md``: the verdict line and the top ``top`` candidates as a table."""
    names = report["label_names"]
    lines = [f"# Audit of `{report['model']}`", "", summary_line(report), "",
             f"auditor `{report['auditor']}` on {report['rows']} clean rows of `{report['dataset']}`, backend "
             f"`{report['backend']}`, seed {report['seed']}, {report['seconds']} s", "",
             "| rank | trigger | target | flip rate | reference flip rate | score |", "|---|---|---|---|---|---|"]
    for rank, cand in enumerate(report["candidates"][:top], 1):
        ref = "-" if cand["reference_flip_rate"] is None else f"{cand['reference_flip_rate']:.3f}"
        lines.append(f"| {rank} | `{cand['text']}` | {names[cand['target']]} | {cand['flip_rate']:.3f} | {ref} | "
                     f"{cand['score']:.3f} |")
    return "\n".join(lines) + "\n"


def summary_line(report: Mapping[str, Any]) -> str:
    """``verdict: backdoored (score 0.950 > threshold 0.8), suspected target 1 (positive)``."""
    relation = ">" if report["verdict"] == "backdoored" else "<="
    target = "none" if report["target"] is None else f"{report['target']} ({report['target_name']})"
    return (f"verdict: {report['verdict']} (score {report['score']:.3f} {relation} threshold {report['threshold']}), "
            f"suspected target {target}")


def write_audit(report: Mapping[str, Any], out: Path, log: Callable[[str], None] = print) -> None:
    """Write ``audit.json``, ``audit.md`` and ``audit.png`` (the top candidates; skipped, with a note, where
    matplotlib is not installed) into ``out``, each atomically."""
    atomic_write_json(out / "audit.json", dict(report))
    atomic_write_text(out / "audit.md", audit_markdown(report))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("plot skipped: pip install matplotlib (or unbackdoor[plots]) to get audit.png")
        return
    from .plots import plot_audit

    tmp = out / ".audit.png.tmp"
    plot_audit(report, tmp)
    tmp.replace(out / "audit.png")
