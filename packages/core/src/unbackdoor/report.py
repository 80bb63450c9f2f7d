"""Markdown tables from results dicts: one run's rows, and the comparison across runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .metrics import delta_pacc


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def markdown_table(results: dict[str, Any]) -> str:
    """One run's rows as a markdown table (stage, defense, CA, ASR, seconds), then :func:`unlearning_table`."""
    cfg = results.get("config", {})
    title = (f"### {cfg.get('attack', '?')} on {cfg.get('dataset', '?')}, student {cfg.get('model', '?')}, "
             f"backend {results.get('backend', '?')}")
    lines = [title, "", "| stage | defense | CA | ASR | seconds |", "|---|---|---:|---:|---:|"]
    for row in results.get("rows", []):
        lines.append(f"| {row['stage']} | {row['defense']} | {_fmt(row['CA'])} | {_fmt(row['ASR'])} | "
                     f"{_fmt(row.get('seconds', '-'))} |")
    unlearning = unlearning_table(results)
    return "\n".join(lines) + (f"\n\n{unlearning}" if unlearning else "")


def retrain_row(results: dict[str, Any]) -> dict[str, Any] | None:
    """The run's ``retrain`` row (the unlearning gold standard), if it has one with a PACC."""
    return next((r for r in results.get("rows", []) if r.get("defense") == "retrain" and "PACC" in r), None)


def unlearning_table(results: dict[str, Any]) -> str:
    """CACC, LFR, PACC and delta-PACC (``|PACC - PACC(retrain)|``) per row; "" when the run has no retrain row.

    CACC is the row's CA and LFR its ASR (triggered non-target inputs predicted as the target).
    """
    gold = retrain_row(results)
    if gold is None:
        return ""
    lines = ["#### Unlearning (%; delta-PACC against retrain)", "",
             "| stage | defense | CACC | LFR | PACC | delta-PACC |", "|---|---|---:|---:|---:|---:|"]
    for row in results.get("rows", []):
        if "PACC" in row:
            delta = round(delta_pacc(row["PACC"], gold["PACC"]), 2)
            lines.append(f"| {row['stage']} | {row['defense']} | {_fmt(row['CA'])} | {_fmt(row['ASR'])} | "
                         f"{_fmt(row['PACC'])} | {_fmt(delta)} |")
    return "\n".join(lines)


def merge_tables(all_results: list[dict[str, Any]]) -> str:
    """Several runs' tables one after the other (``unbackdoor report``)."""
    return "\n\n".join(markdown_table(r) for r in all_results)


# ------------------------------------------------------------------------------------------ comparison


def row_label(row: dict[str, Any]) -> str:
    """How a results row is named in the comparison table and the plots."""
    if row.get("stage") == "poisoned (released)":
        return "released (no fine-tune)"
    if row.get("stage") == "clean student":
        return f"clean model ({row.get('defense', '?')})"
    return str(row.get("defense", "?"))


def _model_name(results: dict[str, Any]) -> str:
    return Path(str(results.get("config", {}).get("model", "?"))).name


def _facets(all_results: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Per run: the model, plus the dataset and backend when they vary across runs (the column key)."""
    facets = {"model": [_model_name(r) for r in all_results],
              "dataset": [str(r.get("config", {}).get("dataset", "?")) for r in all_results],
              "backend": [str(r.get("backend", "?")) for r in all_results]}
    return {k: v for k, v in facets.items() if k == "model" or len(set(v)) > 1}


def _columns(all_results: list[dict[str, Any]]) -> list[str]:
    """The column group of each run: ``"model"`` or ``"model / dataset / backend"``."""
    facets = _facets(all_results)
    return [" / ".join(values) for values in zip(*facets.values(), strict=True)]


def comparison_cells(all_results: list[dict[str, Any]]) -> tuple[list[str], dict[tuple[str, str], dict[str, Any]]]:
    """Columns (in first-seen order) and ``(attack, row label) -> {column: row}``; a later run wins a clash."""
    columns, cells = [], {}
    for results, column in zip(all_results, _columns(all_results), strict=True):
        attack = str(results.get("config", {}).get("attack", "?"))
        if column not in columns:
            columns.append(column)
        for row in results.get("rows", []):
            cells.setdefault((attack, row_label(row)), {})[column] = row
    return columns, cells


def comparison_table(all_results: list[dict[str, Any]]) -> str:
    """One table over runs, shaped like the papers': rows attack x defense, columns CA and ASR per model.

    Detection defenses show CA/ASR after rejecting flagged inputs (marked ``*``; see :func:`detection_table`).
    """
    columns, cells = comparison_cells(all_results)
    header = "| attack | defense | " + " | ".join(f"{c} CA | {c} ASR" for c in columns) + " |"
    lines = ["### Comparison (CA / ASR, %)", "", header, "|---|---|" + "---:|---:|" * len(columns)]
    for (attack, label), by_column in cells.items():
        starred = any("detection" in row for row in by_column.values())
        values = [_pair(by_column.get(c)) for c in columns]
        lines.append(f"| {attack} | {label}{'*' if starred else ''} | " + " | ".join(values) + " |")
    if any("detection" in row for by in cells.values() for row in by.values()):
        lines += ["", "\\* detection defense: flagged inputs are rejected (a rejected clean input counts as an error)."]
    return "\n".join(lines)


def _pair(row: dict[str, Any] | None) -> str:
    return "- | -" if row is None else f"{_fmt(row.get('CA', '-'))} | {_fmt(row.get('ASR', '-'))}"


def detection_table(all_results: list[dict[str, Any]]) -> str:
    """Detector rows: the model's own CA/ASR and detection precision, recall, F1, AUROC ("" when none)."""
    lines = ["### Detection", "",
             "| attack | defense | model | CA (model) | ASR (model) | precision | recall | F1 | AUROC |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for results, column in zip(all_results, _columns(all_results), strict=True):
        attack = results.get("config", {}).get("attack", "?")
        for row in results.get("rows", []):
            det = row.get("detection")
            if det:
                figures = [row.get("CA_model", "-"), row.get("ASR_model", "-"),
                           *(det.get(k, "-") for k in ("precision", "recall", "f1", "auroc"))]
                lines.append(f"| {attack} | {row_label(row)} | {column} | " + " | ".join(_fmt(f) for f in figures) + " |")
    return "\n".join(lines) if len(lines) > 4 else ""


def comparison_report(all_results: list[dict[str, Any]]) -> str:
    """The comparison table and, when there are detectors, the detection table."""
    return "\n\n".join(part for part in (comparison_table(all_results), detection_table(all_results)) if part)
