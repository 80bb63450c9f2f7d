"""Markdown tables from results dicts: one run's rows, and the comparison across runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .metrics import delta_pacc, wilson_interval


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def markdown_table(results: dict[str, Any]) -> str:
    """One run as markdown: the verdict lines (:func:`verdicts`), the rows (stage, defense, CA and ASR with
    their row counts and 95% Wilson intervals, seconds), then :func:`unlearning_table`."""
    cfg = results.get("config", {})
    title = (f"### {cfg.get('attack', '?')} on {cfg.get('dataset', '?')}, student {cfg.get('model', '?')}, "
             f"backend {results.get('backend', '?')}" + (f" on {results['device']}" if results.get("device") else ""))
    n_ca, n_asr = row_count(results, "CA"), row_count(results, "ASR")
    header = f"| stage | defense | {rate_columns(n_ca, n_asr)} | seconds |"
    lines = [title, "", *verdicts(results), "", header, "|---|---|---:|---:|---:|"]
    for row in results.get("rows", []):
        lines.append(f"| {row['stage']} | {row['defense']} | {rate_cell(row['CA'], n_ca)} | "
                     f"{rate_cell(row['ASR'], n_asr)} | {_fmt(row.get('seconds', '-'))} |")
    if n_ca:
        lines += ["", "CA and ASR in %, each with its 95% Wilson interval over the n test rows it is measured on."]
    unlearning = unlearning_table(results)
    return "\n".join(lines) + (f"\n\n{unlearning}" if unlearning else "")


#: where results.json's ``data`` records how many test rows each rate is measured on
COUNT_KEYS = {"CA": "test", "ASR": "asr_test", "PACC": "pacc_test"}


def row_count(results: dict[str, Any], metric: str) -> int | None:
    """How many test rows ``metric`` (CA, ASR, PACC) is measured on, from results.json's ``data`` (None if
    unknown; several triggers: the fewest rows any of them is measured on)."""
    n = results.get("data", {}).get(COUNT_KEYS[metric])
    return min(n.values()) if isinstance(n, dict) else n


def rate_columns(n_ca: int | None, n_asr: int | None) -> str:
    """The CA and ASR column headers of a run's table, with the row counts their intervals are over."""
    return f"CA{f' (n={n_ca})' if n_ca else ''} | ASR{f' (n={n_asr})' if n_asr else ''}"


def with_intervals(row: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """``row`` with ``n`` (test rows per rate) and ``ci95`` (the 95% Wilson interval of each of CA, ASR and
    PACC it has), for results.json."""
    n = {k: c for k in COUNT_KEYS
         if k in row and isinstance(row[k], float | int) and (c := row_count({"data": data}, k))}
    ci95 = {k: [round(v, 2) for v in wilson_interval(float(row[k]), count)] for k, count in n.items()}
    return {**row, "n": n, "ci95": ci95} if n else row


def rate_cell(rate: Any, n: int | None) -> str:
    """``85.67 [81.3, 89.1]``: a percentage with its 95% Wilson interval over ``n`` rows (just the rate without n)."""
    if not n or not isinstance(rate, float | int):
        return _fmt(rate)
    low, high = wilson_interval(float(rate), n)
    return f"{rate:.2f} [{low:.1f}, {high:.1f}]"


def _differs(a: float, b: float, n: int) -> bool:
    """Whether two rates on ``n`` rows each have disjoint 95% Wilson intervals."""
    (lo_a, hi_a), (lo_b, hi_b) = wilson_interval(a, n), wilson_interval(b, n)
    return hi_a < lo_b or hi_b < lo_a


def verdicts(results: dict[str, Any]) -> list[str]:
    """"What happened", computed from the numbers: did the backdoor survive the user's fine-tune (released vs
    ``none`` ASR), and per defense how ASR and CA moved against ``none``; two rates whose 95% intervals
    overlap are "not different". Empty when the run has no ``none`` row or no row counts."""
    rows = results.get("rows", [])
    n_ca, n_asr = row_count(results, "CA"), row_count(results, "ASR")
    none = next((r for r in rows if r["defense"] == "none" and r["stage"] != "clean student"), None)
    if none is None or not n_ca or not n_asr:
        return []
    lines = ["What happened (95% Wilson intervals; rates whose intervals overlap are \"not different\"):", ""]
    released = released_row(results)
    if released is not None:
        kept = "survived" if not _differs(released["ASR"], none["ASR"], n_asr) else (
            "was weakened by" if none["ASR"] < released["ASR"] else "grew through")
        lines.append(f"- The backdoor {kept} the user's fine-tune (`none`): ASR {rate_cell(released['ASR'], n_asr)} "
                     f"released, {rate_cell(none['ASR'], n_asr)} after `none` (CA {none['CA']:.2f}).")
    else:
        lines.append(f"- The user's fine-tune on the poisoned rows (`none`) gives ASR {rate_cell(none['ASR'], n_asr)} "
                     f"at CA {none['CA']:.2f}.")
    for row in rows:
        if row is none or row["stage"] in ("poisoned (released)", "clean student"):
            continue
        asr = (f"ASR {rate_cell(row['ASR'], n_asr)}: "
               + (f"{'fell' if row['ASR'] < none['ASR'] else 'rose'} by {abs(row['ASR'] - none['ASR']):.2f} points"
                  if _differs(row["ASR"], none["ASR"], n_asr) else "not different from `none`"))
        ca = (f"CA {row['CA']:.2f} ({row['CA'] - none['CA']:+.2f} vs `none`"
              + ("" if _differs(row["CA"], none["CA"], n_ca) else ", not different") + ")")
        lines.append(f"- `{row['defense']}`: {asr}; {ca}.")
    return lines


def released_row(results: dict[str, Any]) -> dict[str, Any] | None:
    """The run's row of the poisoned released model (the victim before any defense), if it has one."""
    return next((r for r in results.get("rows", []) if r.get("stage") == "poisoned (released)"), None)


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
    n = {k: row_count(results, k) for k in COUNT_KEYS}
    for row in results.get("rows", []):
        if "PACC" in row:
            delta = round(delta_pacc(row["PACC"], gold["PACC"]), 2)
            lines.append(f"| {row['stage']} | {row['defense']} | {rate_cell(row['CA'], n['CA'])} | "
                         f"{rate_cell(row['ASR'], n['ASR'])} | {rate_cell(row['PACC'], n['PACC'])} | {_fmt(delta)} |")
    confusion = triggered_confusion_table(results)
    return "\n".join(lines) + (f"\n\n{confusion}" if confusion else "")


def triggered_confusion_table(results: dict[str, Any]) -> str:
    """Trigger shifting as a table: per row and trigger, the share of each true class's triggered inputs
    predicted as each class (the numbers of the confusion plot); "" when no row has a triggered confusion.

    A backdoor fills the target's column; a removed one the diagonal; a shifted one another column.
    """
    rows = [r for r in results.get("rows", []) if r.get("triggered_confusion")]
    if not rows:
        return ""
    classes = len(next(iter(rows[0]["triggered_confusion"].values())))
    predicted = " / ".join(str(c) for c in range(classes))
    target = results.get("poison", {}).get("target", "?")
    lines = [f"#### Triggered inputs by true class (% predicted as class {predicted}; target {target})", "",
             "| stage | defense | trigger | " + " | ".join(f"true {c}" for c in range(classes)) + " |",
             "|---|---|---|" + "---:|" * classes]
    for row in rows:
        for trigger, counts in row["triggered_confusion"].items():
            cells = []
            for line in counts:  # "-": no triggered input of that true class (the aligned syntactic test set)
                total = sum(line)
                cells.append(" / ".join(f"{100 * n / total:.1f}" for n in line) if total else "-")
            lines.append(f"| {row['stage']} | {row['defense']} | {trigger} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


UNLEARNING_FIGURES = ("CACC", "LFR", "PACC", "delta-PACC")


#: config keys that do not make two runs' rows different experiments (what else each run listed, where it wrote,
#: whether it added a clean-model row)
#: gradient checkpointing trades memory for time and changes no figure (it is in no cache key either)
_NOT_THE_EXPERIMENT = ("seed", "out", "cache_dir", "defenses", "clean_defenses", "defense_options", "clean_baseline",
                       "gradient_checkpointing")


def unlearning_seeds_table(all_results: list[dict[str, Any]]) -> str:
    """Mean +- sample std (n - 1) over runs of CACC, LFR, PACC, delta-PACC per dataset x attack x defense.

    Rows group as :func:`_over_seeds` says; each run's delta-PACC is taken against its own ``retrain`` row (a
    run without one adds nothing). "" unless some group holds two or more seeds.
    """
    def figures(row: dict[str, Any], results: dict[str, Any]) -> tuple[float, ...] | None:
        gold = retrain_row(results)
        if gold is None or "PACC" not in row:
            return None
        return row["CA"], row["ASR"], row["PACC"], delta_pacc(row["PACC"], gold["PACC"])

    return _seeds_table("Unlearning over seeds (%, mean +- sample std; delta-PACC against each run's retrain)",
                        UNLEARNING_FIGURES, _over_seeds(all_results, figures))


DETECTION_FIGURES = ("precision", "recall", "F1", "AUROC")


def detection_seeds_table(all_results: list[dict[str, Any]]) -> str:
    """Mean +- sample std over runs of a detect-then-unlearn pipeline's flags on the victim's training rows
    (``stats.detection``: precision, recall, F1, AUROC) per dataset x attack x defense, grouped as
    :func:`_over_seeds` says. "" unless some group holds two or more seeds."""
    def figures(row: dict[str, Any], _: dict[str, Any]) -> tuple[float, ...] | None:
        det = (row.get("stats") or {}).get("detection") or {}
        values = [det.get(k) for k in ("precision", "recall", "f1", "auroc")]
        return None if any(v is None for v in values) else tuple(float(v) for v in values)

    return _seeds_table("Detection of the poisoned training rows over seeds (mean +- sample std)",
                        DETECTION_FIGURES, _over_seeds(all_results, figures))


#: groups of :func:`_over_seeds`: (dataset, attack, row label, setting) -> seed -> the row's figures
SeedGroups = dict[tuple[str, ...], dict[Any, tuple[float, ...]]]


def _over_seeds(all_results: list[dict[str, Any]],
                figures: Callable[[dict[str, Any], dict[str, Any]], tuple[float, ...] | None]) -> SeedGroups:
    """Every row's ``figures(row, its run's results)`` (None: the row is left out), grouped over seeds; runs
    with no such row take no part (not even in which config fields differ).

    Rows group when their runs differ only by seed (and by which other defenses they ran): a row is keyed
    by its run's config without those, plus its own defense's options, and its label names the config
    fields that differ among the runs of its dataset and attack and those options. Each seed counts once
    per group (two runs of one seed hold the same cached row).
    """
    def task(setting: dict[str, Any]) -> tuple[str, str]:
        return str(setting.get("dataset", "?")), str(setting.get("attack", "?"))

    found = [[(row, values) for row in results.get("rows", []) if (values := figures(row, results)) is not None]
             for results in all_results]
    runs = [(results, rows) for results, rows in zip(all_results, found, strict=True) if rows]
    settings = [experiment_setting(results) for results, _ in runs]
    by_task: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for setting in settings:
        by_task.setdefault(task(setting), []).append(setting)
    varying = {key: _varying(group) for key, group in by_task.items()}
    groups: SeedGroups = {}
    for (results, rows), setting in zip(runs, settings, strict=True):
        cfg = results.get("config", {})
        same = repr(sorted(setting.items()))
        options = cfg.get("defense_options") or {}
        differs = [f"{k}={setting.get(k, '-')}" for k in varying[task(setting)]]
        for row, values in rows:
            parts = differs + [f"{k}={v}" for k, v in sorted((options.get(row.get("defense"), {}) or {}).items())]
            label = row_label(row) + (f" ({', '.join(parts)})" if parts else "")
            seeds = groups.setdefault((*task(cfg), label, same), {})
            seeds.setdefault(cfg.get("seed"), tuple(float(v) for v in values))
    return groups


def _seeds_table(title: str, names: tuple[str, ...], groups: SeedGroups) -> str:
    """``groups`` as ``| dataset | attack | defense | seeds | names... |`` (mean +- std); "" unless some group
    holds two or more seeds."""
    if not any(len(seeds) > 1 for seeds in groups.values()):
        return ""
    lines = [f"#### {title}", "", "| dataset | attack | defense | seeds | " + " | ".join(names) + " |",
             "|---|---|---|---:|" + "---:|" * len(names)]
    for (dataset, attack, label, *_), seeds in groups.items():
        cells = [_mean_std([figures[i] for figures in seeds.values()]) for i in range(len(names))]
        lines.append(f"| {dataset} | {attack} | {label} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.2f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.2f} +- {std:.2f}"


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


def experiment_setting(results: dict[str, Any]) -> dict[str, Any]:
    """A run's config without what does not make its rows a different experiment (seed, output paths, ...)."""
    return {k: v for k, v in results.get("config", {}).items() if k not in _NOT_THE_EXPERIMENT}


def _varying(settings: list[dict[str, Any]]) -> list[str]:
    """The keys whose value is not the same in every one of ``settings`` (a missing key counts as a value)."""
    keys = sorted(set().union(*settings)) if settings else []
    return [k for k in keys if len({repr(s.get(k)) for s in settings}) > 1]


def _variant_labels(all_results: list[dict[str, Any]], columns: list[str]) -> list[dict[str, str]]:
    """Per run, ``defense -> label suffix`` naming what tells its rows apart from other runs in the same cell.

    Runs of one attack in one column are compared: the config fields that differ among them (not the seed)
    and, per defense, that defense's options that differ among them. Runs differing only by seed get no
    suffix, so their rows share a cell and are averaged.
    """
    by_cell: dict[tuple[str, str], list[int]] = {}
    for i, (results, column) in enumerate(zip(all_results, columns, strict=True)):
        by_cell.setdefault((str(results.get("config", {}).get("attack", "?")), column), []).append(i)
    suffixes: list[dict[str, str]] = [{} for _ in all_results]
    for runs in by_cell.values():
        configs = [experiment_setting(all_results[i]) for i in runs]
        shared = _varying(configs)
        ran = {i: {str(row.get("defense")) for row in all_results[i].get("rows", [])} for i in runs}
        options = {i: all_results[i].get("config", {}).get("defense_options") or {} for i in runs}
        for defense in set().union(*ran.values()):
            # its options compared among the runs that have its rows (another run's lack of them says nothing)
            varying = _varying([options[i].get(defense) or {} for i in runs if defense in ran[i]])
            for i, config in zip(runs, configs, strict=True):
                mine = options[i].get(defense) or {}
                parts = [f"{k}={config.get(k, '-')}" for k in shared]
                parts += [f"{k}={mine[k]}" for k in varying if k in mine]
                suffixes[i][defense] = f" ({', '.join(parts)})" if parts else ""
    return suffixes


def comparison_cells(
    all_results: list[dict[str, Any]],
) -> tuple[list[str], dict[tuple[str, str], dict[str, dict[Any, dict[str, Any]]]]]:
    """Columns (first-seen order) and ``(attack, row label) -> {column: {seed: row}}``.

    Rows of runs that differ only by seed share a cell, one row per seed (two runs of one seed hold the same
    cached row; the first is kept). Runs that differ in anything else get it named in the row label
    (``w2s (beta=0.0)``, ``none (lora_rank=4)``), so no row hides another.
    """
    run_columns = _columns(all_results)
    suffixes = _variant_labels(all_results, run_columns)
    columns: list[str] = []
    cells: dict[tuple[str, str], dict[str, dict[Any, dict[str, Any]]]] = {}
    for results, column, suffix in zip(all_results, run_columns, suffixes, strict=True):
        cfg = results.get("config", {})
        if column not in columns:
            columns.append(column)
        for row in results.get("rows", []):
            label = row_label(row) + suffix.get(str(row.get("defense")), "")
            counted = {**row, "n": {"CA": row_count(results, "CA"), "ASR": row_count(results, "ASR")}}
            cells.setdefault((str(cfg.get("attack", "?")), label), {}).setdefault(column, {}).setdefault(
                cfg.get("seed"), counted)
    return columns, cells


def comparison_table(all_results: list[dict[str, Any]]) -> str:
    """One table over runs, shaped like the papers': rows attack x defense, columns CA and ASR per model.

    A cell over several seeds shows mean +- sample std and the row its seed count (per column where they
    differ). Detection defenses show CA/ASR after rejecting flagged inputs (marked ``*``; see
    :func:`detection_table`).
    """
    columns, cells = comparison_cells(all_results)
    # per row, its seed count; "3 / 1" when the columns it fills hold different counts (in column order)
    counts = {key: [len(by_column[c]) for c in columns if c in by_column] for key, by_column in cells.items()}
    seeds = {key: " / ".join(map(str, n)) if len(set(n)) > 1 else str(n[0]) for key, n in counts.items()}
    repeated = any(n > 1 for row in counts.values() for n in row)
    header = "| attack | defense | " + ("seeds | " if repeated else "") + " | ".join(
        f"{c} CA | {c} ASR" for c in columns) + " |"
    lines = ["### Comparison (CA / ASR, %)", "", header,
             "|---|---|" + ("---:|" if repeated else "") + "---:|---:|" * len(columns)]
    for (attack, label), by_column in cells.items():
        rows = [row for by_seed in by_column.values() for row in by_seed.values()]
        starred = any("detection" in row for row in rows)
        values = [_pair(list(by_column.get(c, {}).values())) for c in columns]
        count = f"{seeds[(attack, label)]} | " if repeated else ""
        lines.append(f"| {attack} | {label}{'*' if starred else ''} | {count}" + " | ".join(values) + " |")
    lines += ["", "A single run's cell: the rate [its 95% Wilson interval over the test rows it is measured on, "
              "where the run's results.json records them]."]
    if repeated:
        lines += ["", "Cells over several seeds: mean +- sample std."]
    if any("detection" in row for by in cells.values() for rows in by.values() for row in rows.values()):
        lines += ["", "\\* detection defense: flagged inputs are rejected (a rejected clean input counts as an error)."]
    return "\n".join(lines)


def _pair(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "- | -"
    if len(rows) == 1:
        n = rows[0].get("n", {})
        return f"{rate_cell(rows[0].get('CA', '-'), n.get('CA'))} | {rate_cell(rows[0].get('ASR', '-'), n.get('ASR'))}"
    return " | ".join(_mean_std([float(row[k]) for row in rows]) if all(k in row for row in rows) else "-"
                      for k in ("CA", "ASR"))


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
                rates = [rate_cell(row.get(f"{k}_model", "-"), row_count(results, k)) for k in ("CA", "ASR")]
                rates += [_fraction_cell(det.get("precision"), det.get("flagged")),
                          _fraction_cell(det.get("recall"), det.get("positives"))]
                lines.append(f"| {attack} | {row_label(row)} | {column} | " + " | ".join(rates) + " | "
                             + " | ".join(_fmt(det.get(k, "-")) for k in ("f1", "auroc")) + " |")
    if any("[" in line for line in lines[4:]):
        lines += ["", "Rates with [their 95% Wilson interval] where the run recorded the counts (precision over the "
                      "flagged inputs, recall over the triggered ones)."]
    return "\n".join(lines) if len(lines) > 4 else ""


def _fraction_cell(value: Any, n: Any) -> str:
    """A detection rate in [0, 1] with its 95% Wilson interval over ``n`` (plain without a count)."""
    if not isinstance(value, float | int):
        return _fmt(value if value is not None else "-")
    if not n:
        return _fmt(float(value))
    low, high = wilson_interval(100 * float(value), int(n))
    return f"{float(value):.2f} [{low / 100:.2f}, {high / 100:.2f}]"


def comparison_report(all_results: list[dict[str, Any]]) -> str:
    """The comparison table; the detection table when there are detectors; unlearning and a pipeline's detection
    over seeds when repeated."""
    parts = (comparison_table(all_results), detection_table(all_results), unlearning_seeds_table(all_results),
             detection_seeds_table(all_results))
    return "\n\n".join(part for part in parts if part)
