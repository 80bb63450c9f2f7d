"""``unbackdoor report --html``: one self-contained page, checked as text here and in headless Chromium
(``nox -s browser``)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from unbackdoor.cli import main
from unbackdoor.html import markdown_html, report_html


def _results(asr: float = 98.68) -> dict[str, Any]:
    rows = [{"stage": "poisoned (released)", "defense": "-", "CA": 83.33, "ASR": 98.68},
            {"stage": "poisoned + defense", "defense": "none", "CA": 87.0, "ASR": asr},
            {"stage": "poisoned + defense", "defense": "w<2>s", "CA": 85.67, "ASR": 5.3}]
    return {"config": {"attack": "insent", "dataset": "sst2", "model": "smollm2-135m", "seed": 0},
            "backend": "torch", "rows": rows, "data": {"test": 300, "asr_test": 151}, "timings_s": {"total": 1.0}}


def test_markdown_subset_becomes_html() -> None:
    page = markdown_html("### Title\n\n- a `x` **b**\n- c\n\n| h | n |\n|---|---:|\n| w2s | 85.67 [81.2, 89.2] |\n\n"
                         "plain <text>")
    assert page.startswith("<h4>Title</h4>")
    assert "<ul><li>a <code>x</code> <strong>b</strong></li><li>c</li></ul>" in page
    assert "<th>h</th><th>n</th>" in page and "<td>w2s</td><td class=num>85.67 [81.2, 89.2]</td>" in page
    assert "<p>plain &lt;text&gt;</p>" in page


def test_report_html_is_one_self_contained_page(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from unbackdoor.plots import report_plots

    results = [_results(), _results(96.0)]
    page = report_html(results)
    images = re.findall(r'<img alt="[^"]+" src="data:image/png;base64,[A-Za-z0-9+/=]+">', page)
    assert len(images) == len(report_plots(results, tmp_path)) >= 2
    assert "src=\"http" not in page and "<link" not in page and "<script" not in page  # nothing fetched
    assert page.count("<table>") >= 3 and "The backdoor survived the user" in page
    assert "w&lt;2&gt;s" in page and "w<2>s" not in page  # labels are escaped


def test_report_html_from_the_command_line(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(_results()))
    assert main(["report", str(run), "--html", str(tmp_path / "out" / "report.html")]) == 0
    assert (tmp_path / "out" / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert "wrote " in capsys.readouterr().out


@pytest.mark.browser
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    """Chromium loads the page offline: every image decodes (a probe script counts them) and the tables lay out."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "nox -s browser installs Debian's chromium"
    page = report_html([_results(), _results(96.0)])
    expected = page.count("<img ")
    probe = ("<script>addEventListener('load', () => { const ok = [...document.images].filter(i => i.complete && "
             "i.naturalWidth > 0).length; document.body.dataset.images = ok; document.body.dataset.tables = "
             "[...document.querySelectorAll('table')].filter(t => t.getBoundingClientRect().height > 20).length; "
             "});</script>")
    file = tmp_path / "report.html"
    file.write_text(page.replace("</body>", probe + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", f"--user-data-dir={tmp_path}/p"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", file.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    assert f'data-images="{expected}"' in dom, re.findall(r"<body[^>]*>", dom)
    assert int(re.search(r'data-tables="(\d+)"', dom)[1]) == page.count("<table>")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1200,2400", file.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
