"""PNG plots for reports (matplotlib, imported lazily: the core works without it).

Figures are drawn with matplotlib's object API on an Agg canvas, never through ``pyplot``, so
making a plot neither needs a display nor changes the backend of a user's session.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError
from .report import row_label

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
    points = pca_2d(np.concatenate([clean, triggered]))
    fig = _figure(6.0, 5.0)
    ax = fig.add_subplot()
    for part, label, color in ((points[: len(clean)], "clean inputs", CLEAN_COLOR),
                               (points[len(clean):], "triggered inputs", TRIGGERED_COLOR)):
        ax.scatter(part[:, 0], part[:, 1], s=14, alpha=0.6, color=color, label=f"{label} ({len(part)})")
    ax.set(title=title, xlabel="principal component 1", ylabel="principal component 2")
    ax.legend(loc="best")
    return _save(fig, path)


def plot_defense_bars(rows: Sequence[tuple[str, float, float]], path: str | Path, title: str) -> Path:
    """Grouped bars of CA and ASR (%) per defense; ``rows`` are ``(label, CA, ASR)``."""
    labels = [r[0] for r in rows]
    x = np.arange(len(rows))
    fig = _figure(max(6.0, 1.1 * len(rows) + 2), 4.8)
    ax = fig.add_subplot()
    series = ((-0.2, 1, "CA (clean accuracy)", CA_COLOR), (0.2, 2, "ASR (attack success)", ASR_COLOR))
    for offset, col, name, color in series:
        values = [float(r[col]) for r in rows]
        bars = ax.bar(x + offset, values, 0.4, label=name, color=color)
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


# ------------------------------------------------------------------------------------------ from results.json


def _slug(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(str(p) for p in parts)).strip("-")


def _run_title(results: dict[str, Any]) -> str:
    cfg = results.get("config", {})
    return (f"{cfg.get('attack', '?')} on {cfg.get('dataset', '?')}, {Path(str(cfg.get('model', '?'))).name}, "
            f"{results.get('backend', '?')}")


def report_plots(all_results: Sequence[dict[str, Any]], out: str | Path) -> list[Path]:
    """Every plot the results support: CA/ASR bars per run, detector score histograms and threshold sweeps."""
    out, written = Path(out), []
    for i, results in enumerate(all_results):
        cfg = results.get("config", {})
        stem = _slug(f"{i:02d}", cfg.get("attack", "run"), cfg.get("dataset", ""), Path(str(cfg.get("model", ""))).name)
        rows = results.get("rows", [])
        bars = [(row_label(r), r["CA"], r["ASR"]) for r in rows if "CA" in r and "ASR" in r]
        if bars:
            written.append(plot_defense_bars(bars, out / f"{stem}-ca-asr.png", f"CA and ASR: {_run_title(results)}"))
        for row in rows:
            written.extend(_detector_plots(row, out, stem, _run_title(results)))
    return written


def _detector_plots(row: dict[str, Any], out: Path, stem: str, title: str) -> list[Path]:
    """A detector row's score histogram and threshold sweep (when the row has them)."""
    written, name = [], _slug(row.get("defense", "detector"))
    scores = row.get("detector_scores")
    if scores and scores.get("clean") and scores.get("triggered"):
        written.append(plot_score_histogram(scores["clean"], scores["triggered"], out / f"{stem}-{name}-scores.png",
                                            f"{row.get('defense')} scores: {title}", _threshold(row)))
    sweep = row.get("threshold_sweep")
    if sweep:
        points = [(s["threshold"], s["CA"], s["ASR"]) for s in sweep]
        written.append(plot_sweep(points, out / f"{stem}-{name}-threshold.png",
                                  f"{row.get('defense')} threshold sweep: {title}", xlabel="detection threshold"))
    return written


def _threshold(row: dict[str, Any]) -> float | None:
    """The detection threshold a defense reported in its stats (``stats[defense]["threshold"]``), if any."""
    value = row.get("stats", {}).get(row.get("defense", ""), {})
    return value.get("threshold") if isinstance(value, dict) else None
