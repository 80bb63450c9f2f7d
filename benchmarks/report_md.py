"""Markdown for benchmarks/results/w2s.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unbackdoor.plots import report_plots
from unbackdoor.report import (
    comparison_table,
    detection_seeds_table,
    rate_cell,
    rate_columns,
    row_count,
    row_label,
    unlearning_seeds_table,
    unlearning_table,
)

#: where a results page's hand-written notes start; kept by --render and --keep (a fresh run drops them)
NOTES = "\n## Notes"
#: marks a row a suite's run took from another run of the same victim (run.py's BORROWED)
BORROWED_MARK = "\u2021"


def notes_of(page: Path) -> str:
    """The hand-written notes of a results page (from :data:`NOTES` on; "" when it has none or does not exist)."""
    text = page.read_text() if page.exists() else ""
    return text[text.index(NOTES):] if NOTES in text else ""


def with_notes(markdown: str, notes: str) -> str:
    """``markdown`` followed by the hand-written ``notes`` section (if any)."""
    return markdown.rstrip("\n") + "\n" + notes if notes else markdown


def _rows(results: dict[str, Any]) -> list[str]:
    """A run's rows: CA and ASR with their 95% Wilson intervals where the run recorded its row counts."""
    n_ca, n_asr = row_count(results, "CA"), row_count(results, "ASR")
    lines = [f"| stage | defense | {rate_columns(n_ca, n_asr)} | train samples/s |", "|---|---|---:|---:|---:|"]
    for r in results["rows"]:
        rate = r.get("stats", {}).get("train", {}).get("samples_per_second", "-")
        lines.append(f"| {r['stage']} | {r['defense']} | {rate_cell(r['CA'], n_ca)} | {rate_cell(r['ASR'], n_asr)} | "
                     f"{rate} |")
    return lines


def render_w2s(data: dict[str, Any], setting: dict[str, Any]) -> str:
    """Sections for the parts measured so far."""
    out = ["# W2SDefense benchmark (real SmolLM2-135M student, MiniLM-L6 teacher, real SST-2)", "",
           f"Command: `{data['command']}`. Machine: {data['machine']}, {data['cpus']} CPUs.", ""]
    if "default_experiment" in data:
        d = data["default_experiment"]
        out += ["## Default experiment (README quick start)", "",
                f"`{d['command']}` from an empty cache (GGUF conversion included): **{d['seconds']} s** wall time "
                "(goal <= 600 s).", "", *_rows(d["results"]), ""]
    if "throughput" in data:
        t = data["throughput"]
        out += ["## Training throughput of the W2S step", "", t["setting"], "",
                "| loop | samples/s |", "|---|---:|",
                f"| unbackdoor fused W2S step (length buckets, cached teacher) | {t['fused']:.2f} |",
                f"| naive loop (pad to max length, teacher recomputed every step) | {t['naive']:.2f} |",
                *([f"| unbackdoor fused W2S step, bf16 autocast | {t['fused_bf16']:.2f} |"] if "fused_bf16" in t else []),
                "", f"Ratio fp32 vs fp32: **{t['ratio']:.2f}x** (goal >= 2x)."
                + (f" With bf16 autocast: {t['ratio_bf16']:.2f}x." if "ratio_bf16" in t else ""), ""]
    if "comparison" in data:
        c = data["comparison"]
        out += ["## Clean student vs poisoned + LoRA (`none`) vs poisoned + W2SDefense", "",
                "Setting: " + ", ".join(f"{k}={v}" for k, v in setting.items()), "",
                *_rows(c), "", f"Stage wall times (s): {c['timings_s']}", ""]
    return "\n".join(out)


#: what the demo must show (issue "W2SDefense in its own setting", point 5)
DEMO_TARGETS = "released ASR >= 90 and CA >= 80; some defense with ASR <= 20 at CA within 3 points of `none`"


def demo_verdict(rows: list[dict[str, Any]]) -> list[str]:
    """Each of the demo's targets, met or missed, with the figures that decide it."""
    released = next(r for r in rows if r["stage"] == "poisoned (released)")
    by = {r["defense"]: r for r in rows if r is not released}
    none = by["none"]
    survives = released["ASR"] >= 90 and released["CA"] >= 80
    lines = [f"- released model: CA {released['CA']:.2f}, ASR {released['ASR']:.2f} (>= 80 / >= 90): "
             f"{'met' if survives else 'missed'}; after the user's LoRA (`none`) ASR {none['ASR']:.2f}"]
    for name, row in by.items():
        if name == "none":
            continue
        ok = row["ASR"] <= 20 and row["CA"] >= none["CA"] - 3
        lines.append(f"- `{name}`: CA {row['CA']:.2f} ({row['CA'] - none['CA']:+.2f} vs `none`), ASR {row['ASR']:.2f}: "
                     f"{'removes it (ASR <= 20, CA within 3)' if ok else 'does not meet ASR <= 20 at CA within 3'}")
    return lines


def render_demo(data: dict[str, Any]) -> str:
    """``demo.md``: the command, the wall time, the table and the targets."""
    run = data["run"]
    return "\n".join([
        "# The demo (`nox -s demo` = `unbackdoor run --config demo`)", "",
        f"Recorded by `{data['command']}` (the same command from an empty cache: GGUF conversion included). "
        f"Machine: {data['machine']}, {data['cpus']} CPUs.", "",
        f"Wall time: **{run['seconds']:.1f} s** (target <= 600 s).", "",
        *_rows(run["results"]), "", f"Targets ({DEMO_TARGETS}):", "", *demo_verdict(run["results"]["rows"]), ""])


def render_sweep(data: dict[str, Any]) -> str:
    """One table per knob setting tried."""
    out = ["# W2SDefense knob sweep (same poisoned SmolLM2-135M as w2s.md's comparison)", "",
           f"Command: `{data['command']}`. Base setting: "
           + ", ".join(f"{k}={v}" for k, v in data["base"].items()), ""]
    for name, run in data["runs"].items():
        out += [f"## {name}: {run['change']}", "", *_rows(run["results"]), ""]
    return "\n".join(out)


def as_saved(data: Any) -> Any:
    """``data`` as its JSON file reads back (tuples as lists, paths as text)."""
    return json.loads(json.dumps(data, default=str))


def render_suite(data: dict[str, Any], plots: Path) -> str:
    """A suite: what each run changed, the comparison and detection tables, and the plots (written to ``plots``)."""
    data = as_saved(data)  # a fresh run reads like --render
    runs = data["runs"]
    results = [run["results"] for run in runs.values()]
    written = report_plots(results, plots)
    out = [f"# {data['title']}", "", f"Command: `{data['command']}`. Machine: {data['machine']}, {data['cpus']} CPUs.",
           "Base setting: " + ", ".join(f"{k}={v}" for k, v in data["base"].items()), "",
           "| run | changes from the base setting | wall time (s; 0: every stage from the cache) |", "|---|---|---:|"]
    out += [f"| {label} | {run['change']} | {run['results']['timings_s'].get('total', '-')} |"
            for label, run in runs.items()]
    if "step_time" in data:
        t = data["step_time"]
        out += ["", "## Fused W2S step time, jax vs torch", "", t["setting"] + ".", "",
                "| backend | first step (s) | compile (s) | step (s, median) |", "|---|---:|---:|---:|",
                f"| torch ({t['torch']['threads']} threads) | {t['torch']['first_step_s']:.3f} | - | "
                f"{t['torch']['step_s']:.3f} |",
                f"| jax ({t['jax']['devices']}) | {t['jax']['first_step_s']:.3f} | {t['jax']['compile_s']:.3f} | "
                f"{t['jax']['step_s']:.3f} |",
                "", f"jax / torch step time: **{t['ratio_jax_over_torch']:.2f}x** (goal <= 1.0x)."]
    if "precision_steps" in data:
        import precision

        out += ["", "## Step time and memory, fp32 vs bf16", "", *precision.table(data["precision_steps"])]
    if results:
        out += ["", *_summary(runs), ""]
        if len(results) > 1:  # the papers' shape: rows attack x defense, CA / ASR per dataset (mean over seeds)
            out += [comparison_table(results), ""]
        out += [f"{table}\n" for table in (unlearning_seeds_table(results), detection_seeds_table(results)) if table]
    for label, run in runs.items():
        out += [f"## {label}", ""]
        if "machine" in run:  # a run made elsewhere than the suite's machine (a GPU device run)
            out += [f"Ran on {run['machine']}, not the machine above.", ""]
        out += [*_rows(run["results"]), ""]
        taken = [f"{row['defense']} ({row['borrowed']})" for row in run["results"]["rows"] if row.get("borrowed")]
        if taken:
            out += [f"{BORROWED_MARK} not trained in this run: taken from the saved run of the same victim (same "
                    f"setting, seed and released CA / ASR / PACC): {', '.join(taken)}.", ""]
        unlearning = unlearning_table(run["results"])
        if unlearning:
            out += [unlearning, ""]
        for row in run["results"]["rows"]:
            if row.get("threshold_sweep"):
                out += [f"Threshold sweep ({row['defense']}):", "", "| threshold | precision | recall | F1 | CA | ASR |",
                        "|---:|---:|---:|---:|---:|---:|"]
                out += [f"| {s['threshold']} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {s['CA']:.2f} "
                        f"| {s['ASR']:.2f} |" for s in row["threshold_sweep"]]
                out.append("")
    if written:
        out += ["Plots: " + ", ".join(f"[{p.name}](plots/{plots.name}/{p.name})" for p in written), ""]
    return "\n".join(out)


def _summary(runs: dict[str, Any]) -> list[str]:
    """Every row of every run in one table (runs may share attack and defense, so they are keyed by run)."""
    lines = ["### Summary (%)", "", "| run | attack | defense | CA | ASR | PACC | detection F1 | AUROC |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    marks = set()
    for label, run in runs.items():
        attack = run["results"]["config"]["attack"]
        for row in run["results"]["rows"]:
            # a detector's flags on the test inputs (*), or a pipeline's on the training rows it unlearns (dagger)
            det, mark = row.get("detection") or {}, "*"
            if not det:
                det, mark = (row.get("stats") or {}).get("detection") or {}, "\u2020"
            marks |= {mark} if det else set()
            rates = [rate_cell(row[k], row_count(run["results"], k)) if k in row else "-" for k in ("CA", "ASR", "PACC")]
            scores = ["-" if det.get(k) is None else f"{det[k]:.2f}" for k in ("f1", "auroc")]
            taken = BORROWED_MARK if row.get("borrowed") else ""
            if taken:
                marks.add(taken)
            lines.append(f"| {label} | {attack} | {row_label(row)}{mark if det else ''}{taken} | "
                         + " | ".join(rates + scores) + " |")
    lines += ["", "Rates with [their 95% Wilson interval] where the run recorded its test row counts."]
    if "*" in marks:
        lines += ["", "\\* detector: CA counts a rejected clean input as an error, ASR counts unrejected triggered inputs."]
    if "\u2020" in marks:
        lines += ["", "\u2020 detection F1/AUROC of the flags on the victim's training rows (what the pipeline unlearns)."]
    if BORROWED_MARK in marks:
        lines += ["", f"{BORROWED_MARK} a row this run did not train: taken from another saved run of the same victim "
                      "(named under the run's heading)."]
    return lines
