"""The ``unbackdoor`` command: ``list``, ``run``, ``report`` and ``audit``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import FIELD_GROUPS, OPTION_TABLES, SETTINGS, ExperimentConfig, build_config, presets, read_config_file
from .data import DATASETS
from .errors import ConfigError, UnbackdoorError, UnknownNameError
from .fielddocs import attribute_docs, option_rows, plain
from .plugins import get_plugin_manager
from .preflight import resume_config
from .report import comparison_report, merge_tables
from .specs import CONFIG_PRECISIONS

DICT_FIELDS = set(OPTION_TABLES)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for a user error, with a one-line message)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UnbackdoorError as exc:
        print(f"unbackdoor: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unbackdoor", description="Remove and detect backdoors in language models.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    lst = sub.add_parser("list", help="list backends, attacks and defenses with their source packages")
    lst.add_argument("--options", metavar="NAME", help="print the options of plugin NAME (an attack, defense, "
                     "paraphraser or auditor): type, default and help")
    lst.set_defaults(func=cmd_list)
    run = sub.add_parser("run", help="run attack -> victim -> defense -> evaluation and write a report",
                         argument_default=argparse.SUPPRESS)
    run.add_argument("--config", help="TOML or YAML file with any of the options below, or a shipped preset: "
                     f"{', '.join(presets())}")
    run.add_argument("--resume", action="store_true",
                     help="rerun the run recorded in --out (its run.json); finished stages come from the cache")
    _add_config_flags(run)
    run.set_defaults(func=cmd_run)
    rep = sub.add_parser("report", help="merge results.json files of run directories into one markdown table")
    rep.add_argument("runs", nargs="+", help="run directories (or results.json files)")
    rep.add_argument("--plots", metavar="DIR", help="also write PNG plots (CA/ASR bars, detector scores) into DIR")
    rep.add_argument("--html", metavar="FILE", help="also write one self-contained HTML page (verdicts, tables, "
                     "every plot inlined) to FILE")
    rep.set_defaults(func=cmd_report)
    _add_audit(sub)
    return parser


def _add_audit(sub: Any) -> None:
    """``unbackdoor audit``: its flags."""
    from .auditing import DEFAULT_AUDITOR, DEFAULT_ROWS

    aud = sub.add_parser("audit", help="is a released sequence classifier backdoored? search for its trigger")
    aud.add_argument("--model", required=True, help="the classifier: a directory saved by unbackdoor (head "
                     "included), or a named model")
    aud.add_argument("--dataset", required=True, help=f"clean rows of the model's task: {', '.join(DATASETS)} or a path")
    aud.add_argument("--reference", help="a clean classifier of the same task and tokenizer; candidates that flip "
                     "it too (universal adversarial words) rank lower")
    aud.add_argument("--backend", help=f"backend (default: $UNBACKDOOR_BACKEND, else torch); choose from: "
                     f"{', '.join(sorted(get_plugin_manager().backends()))}")
    aud.add_argument("--auditor", default=DEFAULT_AUDITOR, help=f"auditor (default: {DEFAULT_AUDITOR}); choose "
                     f"from: {', '.join(sorted(get_plugin_manager().auditors()))}")
    aud.add_argument("--auditor-option", dest="auditor_options", action="append", default=[], metavar="KEY=VALUE",
                     help="an auditor option (`unbackdoor list --options AUDITOR` lists them). Repeatable.")
    aud.add_argument("--out", help="write audit.json, audit.md and audit.png (the top candidates) into this directory")
    aud.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="clean dev rows used, a seeded sample "
                     f"(default: {DEFAULT_ROWS})")
    aud.add_argument("--seed", type=int, default=0, help="seed of the row sample and the search (default: 0)")
    aud.add_argument("--data-dir", help="the data root (default: ../shared/data or $UNBACKDOOR_DATA_DIR)")
    aud.set_defaults(func=cmd_audit)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, grouped by topic, each with its documented help, choices and default."""
    defaults = ExperimentConfig()
    docs = attribute_docs(ExperimentConfig)
    choices = _finite_choices()
    for title, names in FIELD_GROUPS:
        group = parser.add_argument_group(title)
        for name in names:
            flag, default = "--" + name.replace("_", "-"), getattr(defaults, name)
            text = plain(docs[name]) + (f" Choose from: {', '.join(choices[name])}." if name in choices else "")
            if name in DICT_FIELDS:
                group.add_argument(flag.removesuffix("s"), dest=name, action="append", metavar="KEY=VALUE",
                                   help=f"{text} Repeatable.")
            else:
                shown = ",".join(default) if isinstance(default, tuple) else default
                suffix = "" if default is None else f" (default: {shown})"  # None: the help says what happens
                group.add_argument(flag, dest=name, metavar=name.upper(), help=text + suffix)


def _finite_choices() -> dict[str, list[str]]:
    """The config fields whose values come from a finite set: registered plugins and fixed names."""
    pm = get_plugin_manager()
    return {"backend": sorted(pm.backends()), "attack": sorted(pm.attacks()), "defenses": sorted(pm.defenses()),
            "clean_defenses": sorted(pm.defenses()), "setting": list(SETTINGS), "precision": list(CONFIG_PRECISIONS),
            "dataset": [*DATASETS, "or a path"]}


def _pairs(items: list[str], nested: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"option {item!r} must look like KEY=VALUE")
        if nested:
            name, dot, sub = key.partition(".")
            if not dot:
                raise ConfigError(f"defense option {item!r} must look like DEFENSE.KEY=VALUE (e.g. w2s.beta=0.5)")
            out.setdefault(name, {})[sub] = value
        else:
            out[key] = value
    return out


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """Defaults < the recorded run (``--resume``) < ``--config`` file < flags."""
    flags = {k: v for k, v in vars(args).items() if k not in {"func", "config", "resume"}}
    for name in DICT_FIELDS & set(flags):
        flags[name] = _pairs(flags[name], nested=name == "defense_options")
    layers = [read_config_file(args.config)] if getattr(args, "config", None) else []
    if getattr(args, "resume", False):
        layers.insert(0, resume_config(flags.get("out", ExperimentConfig.out)))
    return build_config(*layers, flags)


def cmd_run(args: argparse.Namespace) -> int:
    """``unbackdoor run``: prints the markdown table at the end (under torchrun: rank 0 alone)."""
    from .ranks import launched_rank
    from .report import markdown_table
    from .runner import run_experiment

    cfg = config_from_args(args)
    results = run_experiment(cfg)
    if launched_rank() != 0:  # every rank ran the experiment; rank 0 wrote and reports it
        return 0
    print(markdown_table(results))
    print(f"\nwrote {Path(cfg.out) / 'results.json'} and results.md")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """``unbackdoor list``: every backend, attack, defense, paraphraser, loss and auditor with its plugin and package;
    ``--options NAME``: that plugin's options."""
    pm = get_plugin_manager()
    if getattr(args, "options", None):
        return print_options(pm, args.options)
    sections = (("backends", pm.backends()), ("attacks", pm.attacks()), ("defenses", pm.defenses()),
                ("paraphrasers", pm.paraphrasers()), ("losses", pm.losses()), ("auditors", pm.auditors()))
    width = max((len(name) for _, found in sections for name in found), default=0)
    for title, found in sections:
        print(f"{title}:")
        for name, reg in sorted(found.items()):
            where = " ".join(x for x in (reg.package, reg.version) if x)
            print(f"  {name:<{max(width, 12)}} {reg.obj.description}  [{where}]")
        if not found:
            print("  (none registered)")
    for plugin, error in sorted(pm.failures.items()):
        print(f"plugin {plugin!r} failed to load: {error}")
    return 0


def print_options(pm: Any, name: str) -> int:
    """Print plugin ``name``'s options (``unbackdoor list --options NAME``): name, type, default, help."""
    found = {**pm.paraphrasers(), **pm.attacks(), **pm.defenses(), **pm.auditors()}
    if name not in found:
        raise UnknownNameError("plugin", name, sorted(found))
    reg = found[name]
    print(f"{name}: {reg.obj.description}  [{' '.join(x for x in (reg.package, reg.version) if x)}]")
    rows = option_rows(reg.obj)
    if not rows:
        print("  (no options)")
    width = max((len(f"{n} ({t}, default {d})") for n, t, d, _ in rows), default=0)
    for option, kind, default, text in rows:
        print(f"  {f'{option} ({kind}, default {default})':<{width}}  {text}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """``unbackdoor audit``: prints the verdict, the score, the suspected target and the top-5 candidates."""
    from .auditing import audit, summary_line

    report = audit(args.model, args.dataset, reference=args.reference, backend=args.backend, auditor=args.auditor,
                   auditor_options=_pairs(args.auditor_options, nested=False), out=args.out, rows=args.rows,
                   seed=args.seed, data_dir=args.data_dir)
    print(summary_line(report))
    for rank, cand in enumerate(report["candidates"][:5], 1):
        ref = "" if cand["reference_flip_rate"] is None else f", reference {cand['reference_flip_rate']:.3f}"
        print(f"  {rank}. {cand['text']!r} -> {report['label_names'][cand['target']]}: flip rate "
              f"{cand['flip_rate']:.3f}{ref}")
    if args.out:
        print(f"\nwrote {Path(args.out) / 'audit.json'}, audit.md and audit.png")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``unbackdoor report RUN... [--plots DIR]``: each run's table, the comparison across runs, and plots."""
    results = []
    for run in args.runs:
        file = Path(run) / "results.json" if Path(run).is_dir() else Path(run)
        if not file.is_file():
            raise ConfigError(f"no results.json at {str(file)!r}")
        results.append(json.loads(file.read_text()))
    print(merge_tables(results))
    print()
    print(comparison_report(results))
    if getattr(args, "plots", None):
        from .plots import report_plots

        written = report_plots(results, args.plots)
        print(f"\nwrote {len(written)} plots to {args.plots}")
    if getattr(args, "html", None):
        from .html import write_report_html

        print(f"\nwrote {write_report_html(results, args.html)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
