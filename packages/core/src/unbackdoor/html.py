"""``unbackdoor report RUN... --html FILE``: one self-contained HTML page (tables, verdicts, plots inlined).

The page is the markdown report (:mod:`unbackdoor.report`) turned into HTML, with every plot embedded as a
``data:`` PNG, so the single file opens offline and can be mailed or attached to a paper review.
"""

from __future__ import annotations

import base64
import html
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .cache import atomic_write_text
from .report import comparison_report, merge_tables

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{display:inline-block;margin:0.5em}img{max-width:520px}code{background:#f3f3f3;padding:0 3px}"""


def report_html(all_results: list[dict[str, Any]], title: str = "unbackdoor report") -> str:
    """The page for ``all_results``: each run's verdicts and table, the comparison, and every plot inlined."""
    markdown = merge_tables(all_results) + "\n\n" + comparison_report(all_results)
    body = markdown_html(markdown)
    figures = "".join(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
                      f"<figcaption>{html.escape(name)}</figcaption></figure>" for name, data in _plots(all_results))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}"
            + (f"<h2>Plots</h2>{figures}" if figures else "") + "</body></html>\n")


def write_report_html(all_results: list[dict[str, Any]], path: str | Path) -> Path:
    """Write :func:`report_html` atomically to ``path``."""
    path = Path(path)
    atomic_write_text(path, report_html(all_results))
    return path


def _plots(all_results: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    """``(file name, base64 PNG)`` of every plot the results support (none without matplotlib)."""
    try:
        from .plots import report_plots
    except ImportError:
        return
    with tempfile.TemporaryDirectory() as tmp:
        for png in report_plots(all_results, tmp):
            yield png.name, base64.b64encode(png.read_bytes()).decode("ascii")


_NUMBER = re.compile(r"^[-+]?\d[\d.]*( \[[\d., ]+\]| \+- [\d.]+)?\*?$")


def markdown_html(text: str) -> str:
    """HTML for the markdown the reports write: ``#`` headings, pipe tables, ``- `` lists, paragraphs."""
    out: list[str] = []
    blocks = [b for b in re.split(r"\n\s*\n", text.strip()) if b.strip()]
    for block in blocks:
        lines = block.splitlines()
        if lines[0].startswith("#"):
            level = min(len(lines[0]) - len(lines[0].lstrip("#")) + 1, 6)  # the page's own title is <h1>
            out.append(f"<h{level}>{_inline(lines[0].lstrip('#').strip())}</h{level}>")
            lines = lines[1:]
        if not lines:
            continue
        if all(line.startswith("|") for line in lines):
            out.append(_table(lines))
        elif all(line.startswith("- ") for line in lines):
            out.append("<ul>" + "".join(f"<li>{_inline(line[2:])}</li>" for line in lines) + "</ul>")
        else:
            out.append(f"<p>{_inline(' '.join(lines))}</p>")
    return "\n".join(out)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> str:
    head, rows = _cells(lines[0]), [_cells(line) for line in lines[2:]]
    cells = "".join(f"<th>{_inline(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f'<td{" class=num" if _NUMBER.match(c) else ""}>{_inline(c)}</td>' for c in row)
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def _inline(text: str) -> str:
    """Escape, then ``code`` and **bold** (the only inline markup the reports use)."""
    escaped = html.escape(text.replace("\\*", "*"), quote=False)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)
