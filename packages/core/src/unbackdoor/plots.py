"""PNG plots for reports (matplotlib, imported lazily: the core works without it).

Figures are drawn with matplotlib's object API on an Agg canvas, never through ``pyplot``, so
making a plot neither needs a display nor changes the backend of a user's session.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError
from .metrics import wilson_interval
from .options import flat_options
from .report import experiment_setting, retrain_row, row_count, row_label

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CA_COLOR, ASR_COLOR = "#1f77b4", "#d62728"
CLEAN_COLOR, TRIGGERED_COLOR = "#2ca02c", "#d62728"


def _figure(width: float = 7.0, height: float = 4.5) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install matplotlib") from None
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Project ``x [N, D]`` onto its first two principal components ``[N, 2]`` (centred, via SVD)."""
    x = np.asarray(x, np.float64)
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    out = centred @ vt[:2].T
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1]))) if out.shape[1] < 2 else out


def plot_hidden_states(clean: np.ndarray, triggered: np.ndarray, path: str | Path, title: str) -> Path:
    """Scatter of the 2-D PCA of clean ``[N, D]`` and triggered ``[M, D]`` hidden states (one shared projection)."""
    return plot_projected_states(pca_2d(np.concatenate([clean, triggered])), len(clean), path, title)


def plot_projected_states(points: np.ndarray, n_clean: int, path: str | Path, title: str) -> Path:
    """Scatter of 2-D points ``[N + M, 2]``: the first ``n_clean`` clean inputs, the rest triggered ones."""
    points = np.asarray(points, np.float64)
    fig = _figure(6.0, 5.0)
    ax = fig.add_subplot()
    for part, label, color in ((points[:n_clean], "clean inputs", CLEAN_COLOR),
                               (points[n_clean:], "triggered inputs", TRIGGERED_COLOR)):
        ax.scatter(part[:, 0], part[:, 1], s=14, alpha=0.6, color=color, label=f"{label} ({len(part)})")
    ax.set(xlabel="principal component 1", ylabel="principal component 2")
    ax.set_title(title, fontsize=9, wrap=True)  # the run title is long: wrapped, not cut at the figure edge
    ax.legend(loc="best")
    return _save(fig, path)


def plot_defense_bars(rows: Sequence[tuple[str, float, float]], path: str | Path, title: str,
                      counts: tuple[int | None, int | None] = (None, None)) -> Path:
    """Grouped bars of CA and ASR (%) per defense; ``rows`` are ``(label, CA, ASR)``. With the row ``counts``
    ``(n_CA, n_ASR)`` each bar carries its 95% Wilson interval as an error bar."""
    labels = [r[0] for r in rows]
    x = np.arange(len(rows))
    fig = _figure(max(6.0, 1.1 * len(rows) + 2), 4.8)
    ax = fig.add_subplot()
    series = ((-0.2, 1, "CA (clean accuracy)", CA_COLOR), (0.2, 2, "ASR (attack success)", ASR_COLOR))
    for (offset, col, name, color), n in zip(series, counts, strict=True):
        values = [float(r[col]) for r in rows]
        errors = None
        if n:
            bounds = [wilson_interval(v, n) for v in values]
            # a stored rate is rounded, so it may sit a hair outside its interval: no negative bar
            errors = np.maximum(np.nan_to_num([[v - lo for v, (lo, _) in zip(values, bounds, strict=True)],
                                               [hi - v for v, (_, hi) in zip(values, bounds, strict=True)]]), 0.0)
            name += " with 95% interval"
        bars = ax.bar(x + offset, values, 0.4, label=name, color=color, yerr=errors, capsize=3)
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set(title=title, ylabel="%", ylim=(0, 110))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncols=2, frameon=False)
    return _save(fig, path)


def plot_sweep(points: Sequence[tuple[float, float, float]], path: str | Path, title: str,
               xlabel: str = "loss weight") -> Path:
    """CA and ASR (%) against a swept value; ``points`` are ``(value, CA, ASR)`` (sorted by value here)."""
    ordered = sorted(points)
    values = [p[0] for p in ordered]
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(values, [p[1] for p in ordered], "o-", color=CA_COLOR, label="CA (clean accuracy)")
    ax.plot(values, [p[2] for p in ordered], "s--", color=ASR_COLOR, label="ASR (attack success)")
    ax.set(title=title, xlabel=xlabel, ylabel="%", ylim=(-5, 105))
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)


def plot_score_histogram(clean: Sequence[float], triggered: Sequence[float], path: str | Path, title: str,
                         threshold: float | None = None, xlabel: str = "detector score") -> Path:
    """Overlaid histograms of a detector's scores on clean and triggered inputs, with the threshold."""
    both = np.concatenate([np.asarray(clean, float), np.asarray(triggered, float)])
    bins = np.histogram_bin_edges(both[np.isfinite(both)], bins=30)
    fig = _figure()
    ax = fig.add_subplot()
    ax.hist(clean, bins=bins, alpha=0.6, color=CLEAN_COLOR, label=f"clean inputs ({len(clean)})")
    ax.hist(triggered, bins=bins, alpha=0.6, color=TRIGGERED_COLOR, label=f"triggered inputs ({len(triggered)})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle=":", label=f"threshold {threshold:.3g}")
    ax.set(title=title, xlabel=xlabel, ylabel="inputs")
    ax.legend(loc="best")
    return _save(fig, path)


def plot_audit(report: Mapping[str, Any], path: str | Path, top: int = 10) -> Path:
    """An audit's top ``top`` trigger candidates (``audit.json``): per candidate its flip rate on the audited
    model and, with a reference, on the reference, coloured by target class, with the verdict's threshold on
    the score (flip rate minus the reference's)."""
    names, cands = report["label_names"], list(report["candidates"][:top])[::-1]  # best on top
    fig = _figure(7.5, max(3.0, 0.45 * len(cands) + 1.6))
    ax = fig.add_subplot()
    y = np.arange(len(cands))
    palette = [CA_COLOR, ASR_COLOR, CLEAN_COLOR, "#9467bd", "#ff7f0e", "#8c564b"]
    colors = [palette[c["target"] % len(palette)] for c in cands]
    ax.barh(y + 0.18, [c["flip_rate"] for c in cands], 0.36, color=colors, label="flip rate, audited model")
    if report.get("reference"):
        ax.barh(y - 0.18, [c["reference_flip_rate"] or 0.0 for c in cands], 0.36, color=colors, alpha=0.35,
                hatch="//", label="flip rate, reference model")
    ax.scatter([c["score"] for c in cands], y, marker="D", color="black", zorder=3, label="score")
    ax.axvline(report["threshold"], color="black", linestyle=":", label=f"threshold {report['threshold']}")
    ax.set_yticks(y, [f"{c['text'][:28]!r} -> {names[c['target']]}" for c in cands], fontsize=8)
    ax.set(xlim=(min([0.0] + [c["score"] for c in cands]) - 0.02, 1.05),
           xlabel="share of held-out rows of the other classes flipped to the target",
           title=f"audit: {report['verdict']} (score {report['score']:.3f})")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_triggered_confusion(panels: Sequence[tuple[str, np.ndarray]], path: str | Path, title: str,
                             target: int | None = None) -> Path:
    """Trigger shifting: one heatmap per model of triggered inputs, true class (rows) x predicted class (columns).

    Cells show the share of each true class's triggered inputs (%); ``panels`` are ``(label, counts [C, C])``.
    A backdoor fills the ``target`` column (outlined); a removed one the diagonal; a shifted one another column.
    A true class without triggered inputs (the aligned syntactic test sets hold non-target rows only) is a
    blank row of "-".
    """
    fig = _figure(max(4.0, 2.6 * len(panels) + 0.8), 3.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, counts) in zip(axes, panels, strict=True):
        counts = np.asarray(counts, np.float64)
        totals = counts.sum(1, keepdims=True)
        share = np.where(totals > 0, 100 * counts / np.maximum(totals, 1), np.nan)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
        for (i, j), value in np.ndenumerate(share):
            ax.text(j, i, "-" if np.isnan(value) else f"{value:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if value > 60 else "black")
        if target is not None and 0 <= target < len(counts):
            ax.add_patch(_target_box(target, len(counts)))
        ticks = np.arange(len(counts))
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_yticks(ticks, [str(t) for t in ticks])
        ax.set(title=label, xlabel="predicted class", ylabel="true class")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _target_box(target: int, classes: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((target - 0.5, -0.5), 1, classes, fill=False, edgecolor=TRIGGERED_COLOR, linewidth=2)


# ------------------------------------------------------------------------------------------ from results.json


def _slug(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(str(p) for p in parts)).strip("-")


def _run_title(results: dict[str, Any]) -> str:
    cfg = results.get("config", {})
    return (f"{cfg.get('attack', '?')} on {cfg.get('dataset', '?')}, {Path(str(cfg.get('model', '?'))).name}, "
            f"{results.get('backend', '?')}")


def report_plots(all_results: Sequence[dict[str, Any]], out: str | Path) -> list[Path]:
    """Every plot the results support: CA/ASR bars per run, detector score histograms, threshold sweeps,
    for unlearning runs the trigger-shifting confusion of triggered inputs, and option sweeps across runs
    (loss weights; see :func:`option_sweeps`)."""
    out, written = Path(out), []
    for i, results in enumerate(all_results):
        cfg = results.get("config", {})
        stem = _slug(f"{i:02d}", cfg.get("attack", "run"), cfg.get("dataset", ""), Path(str(cfg.get("model", ""))).name)
        rows = results.get("rows", [])
        bars = [(row_label(r), r["CA"], r["ASR"]) for r in rows if "CA" in r and "ASR" in r]
        if bars:
            written.append(plot_defense_bars(bars, out / f"{stem}-ca-asr.png", f"CA and ASR: {_run_title(results)}",
                                             (row_count(results, "CA"), row_count(results, "ASR"))))
        for row in rows:
            written.extend(_detector_plots(row, out, stem, _run_title(results)))
            pca = row.get("hidden_pca")
            if pca and pca.get("clean") and pca.get("triggered"):
                name = _slug(row.get("stage", ""), row.get("defense", ""))
                written.append(plot_projected_states(pca["clean"] + pca["triggered"], len(pca["clean"]),
                                                     out / f"{stem}-{name}-hidden-pca.png",
                                                     f"last-token states (PCA), {row_label(row)}: {_run_title(results)}"))
        written.extend(_confusion_plots(results, out, stem))
    for (attack, stage, defense, option, _), points in option_sweeps(all_results).items():
        name = _slug("sweep", attack, stage, defense, option)
        written.append(plot_sweep(points, out / f"{name}.png", f"{defense} {option} sweep: {attack}, {stage}",
                                  xlabel=f"{defense} {option}"))
    return written


def option_sweeps(all_results: Sequence[dict[str, Any]]) -> dict[tuple[str, ...], list[tuple[float, float, float]]]:
    """Sweeps of one numeric defense option across runs: ``(attack, stage, defense, option, rest) -> points``.

    Rows of one defense and stage whose runs are the same experiment and seed and whose options differ in one
    numeric value only form a sweep (``(value, CA, ASR)`` points); only those with 3 values or more are kept
    (a loss-weight sweep such as W2S's ``beta``, or PSIM's ``reset_rate``). A row's options are the ones it
    ran with (its ``options``, defaults included); a row saved before rows carried them has only the ones its
    run's config set, so a value left at its default is no point of its sweep.
    """
    groups: dict[tuple[str, ...], dict[float, tuple[float, float]]] = {}
    for results in all_results:
        cfg = results.get("config", {})
        setting = repr((sorted(experiment_setting(results).items()), results.get("backend"), cfg.get("seed")))
        options = cfg.get("defense_options") or {}
        for row in results.get("rows", []):
            own = flat_options(row.get("options") or options.get(row.get("defense")) or {})
            if "CA" not in row or "ASR" not in row:
                continue
            for option, value in own.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    rest = repr(sorted((k, v) for k, v in own.items() if k != option))
                    key = (str(cfg.get("attack", "?")), str(row.get("stage", "?")), str(row.get("defense")), option,
                           setting + rest)
                    groups.setdefault(key, {}).setdefault(float(value), (float(row["CA"]), float(row["ASR"])))
    return {key: sorted((value, ca, asr) for value, (ca, asr) in points.items())
            for key, points in groups.items() if len(points) >= 3}


def _confusion_plots(results: dict[str, Any], out: Path, stem: str) -> list[Path]:
    """Unlearning runs (those with a ``retrain`` row): the triggered confusion of every row, one figure per trigger."""
    if retrain_row(results) is None:
        return []
    rows = [r for r in results.get("rows", []) if r.get("triggered_confusion")]
    target = results.get("poison", {}).get("target")
    written = []
    for trigger in rows[0]["triggered_confusion"] if rows else ():
        panels = [(row_label(r), np.asarray(r["triggered_confusion"][trigger])) for r in rows
                  if trigger in r["triggered_confusion"]]
        written.append(plot_triggered_confusion(panels, out / f"{stem}-{_slug(trigger)}-confusion.png",
                                                f"Triggered inputs ({trigger}): {_run_title(results)}", target))
    return written


def _detector_plots(row: dict[str, Any], out: Path, stem: str, title: str) -> list[Path]:
    """A detector row's score histogram and threshold sweep (when the row has them)."""
    written, name = [], _slug(row.get("defense", "detector"))
    scores = row.get("detector_scores")
    if scores and scores.get("clean") and scores.get("triggered"):
        written.append(plot_score_histogram(scores["clean"], scores["triggered"], out / f"{stem}-{name}-scores.png",
                                            f"{row.get('defense')} scores: {title}", _threshold(row)))
    confidence = row.get("model_confidence")
    if confidence and confidence.get("clean") and confidence.get("triggered"):
        written.append(plot_score_histogram(confidence["clean"], confidence["triggered"],
                                            out / f"{stem}-{name}-victim-confidence.png",
                                            f"victim model's confidence ({row.get('defense')} row): {title}",
                                            xlabel="max softmax confidence of the defended model"))
    sweep = row.get("threshold_sweep")
    if sweep:
        points = [(s["threshold"], s["CA"], s["ASR"]) for s in sweep]
        written.append(plot_sweep(points, out / f"{stem}-{name}-threshold.png",
                                  f"{row.get('defense')} threshold sweep: {title}", xlabel="detection threshold"))
    return written


def _threshold(row: dict[str, Any]) -> float | None:
    """The detection threshold a defense reported in its stats (``stats[defense]["threshold"]``), if any."""
    if isinstance(row.get("detection"), dict) and "threshold" in row["detection"]:
        return float(row["detection"]["threshold"])
    value = row.get("stats", {}).get(row.get("defense", ""), {})
    return value.get("threshold") if isinstance(value, dict) else None
