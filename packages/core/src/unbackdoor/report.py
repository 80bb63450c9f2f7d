"""Markdown tables from results dicts."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def markdown_table(results: dict[str, Any]) -> str:
    """One run's rows as a markdown table (stage, defense, CA, ASR, seconds)."""
    cfg = results.get("config", {})
    title = (f"### {cfg.get('attack', '?')} on {cfg.get('dataset', '?')}, student {cfg.get('model', '?')}, "
             f"backend {results.get('backend', '?')}")
    lines = [title, "", "| stage | defense | CA | ASR | seconds |", "|---|---|---:|---:|---:|"]
    for row in results.get("rows", []):
        lines.append(f"| {row['stage']} | {row['defense']} | {_fmt(row['CA'])} | {_fmt(row['ASR'])} | "
                     f"{_fmt(row.get('seconds', '-'))} |")
    return "\n".join(lines)


def merge_tables(all_results: list[dict[str, Any]]) -> str:
    """Several runs' tables one after the other (``unbackdoor report``)."""
    return "\n\n".join(markdown_table(r) for r in all_results)
