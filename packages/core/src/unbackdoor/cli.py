"""The ``unbackdoor`` command: ``list``, ``run`` and ``report``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import ExperimentConfig, build_config, read_config_file
from .errors import ConfigError, UnbackdoorError
from .plugins import get_plugin_manager
from .preflight import resume_config
from .report import comparison_report, merge_tables

DICT_FIELDS = {"attack_options", "defense_options"}


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
    lst.set_defaults(func=cmd_list)
    run = sub.add_parser("run", help="run attack -> victim -> defense -> evaluation and write a report",
                         argument_default=argparse.SUPPRESS)
    run.add_argument("--config", help="TOML or YAML file with any of the options below")
    run.add_argument("--resume", action="store_true",
                     help="rerun the run recorded in --out (its run.json); finished stages come from the cache")
    _add_config_flags(run)
    run.set_defaults(func=cmd_run)
    rep = sub.add_parser("report", help="merge results.json files of run directories into one markdown table")
    rep.add_argument("runs", nargs="+", help="run directories (or results.json files)")
    rep.add_argument("--plots", metavar="DIR", help="also write PNG plots (CA/ASR bars, detector scores) into DIR")
    rep.set_defaults(func=cmd_report)
    return parser


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    defaults = ExperimentConfig()
    for f in dataclasses.fields(ExperimentConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name in DICT_FIELDS:
            parser.add_argument(flag.removesuffix("s"), dest=f.name, action="append", metavar="KEY=VALUE",
                                help=f"{f.name.replace('_', ' ')} (repeatable; defense ones as NAME.KEY=VALUE)")
        else:
            shown = ",".join(default) if isinstance(default, tuple) else default
            parser.add_argument(flag, dest=f.name, metavar=f.name.upper(), help=f"default: {shown}")


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
    """``unbackdoor run``: prints the markdown table at the end."""
    from .report import markdown_table
    from .runner import run_experiment

    cfg = config_from_args(args)
    results = run_experiment(cfg)
    print(markdown_table(results))
    print(f"\nwrote {Path(cfg.out) / 'results.json'} and results.md")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """``unbackdoor list``: every backend, attack, defense and paraphraser with its plugin and package."""
    pm = get_plugin_manager()
    sections = (("backends", pm.backends()), ("attacks", pm.attacks()), ("defenses", pm.defenses()),
                ("paraphrasers", pm.paraphrasers()))
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
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
