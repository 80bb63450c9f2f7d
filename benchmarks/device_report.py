"""The device check's JSON (``device_check.py``): checked, rendered as markdown, merged into the results.

``python benchmarks/run.py --merge FILE`` calls :func:`merge`: it adds the check to
``benchmarks/results/device.json`` (every check merged so far, by label) and rewrites
``benchmarks/results/device.md`` from it. Standard library only, like the check's own parent process (which
runs before our packages are installed on the device machine), hence its own atomic write.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

KIND = "unbackdoor-device-check"
SCHEMA = 1
#: keys every check file has (a partial check too: it is written after each part)
REQUIRED = ("kind", "schema", "created", "mode", "parts")
#: the parts in the order the check runs them
PARTS = ("install", "env", "models", "parity", "step-torch", "step-jax", "experiment-torch", "experiment-jax")
TITLE = "Device check: parity, bf16 fused W2S step time, default experiment per backend"


class DeviceReportError(ValueError):
    """A device-check file (or the results it merges into) is missing or is not a device check."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(file: Path, what: str) -> Any:
    """The JSON in ``file``; a missing or ill-formed file raises :class:`DeviceReportError` naming it."""
    if not file.is_file():
        raise DeviceReportError(f"{what} {str(file)!r} does not exist (or is not a file)")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeviceReportError(f"{what} {str(file)!r} is not valid JSON ({exc})") from None


def check_file(data: Any, file: Path) -> dict[str, Any]:
    """``data`` if it is a device check (kind, schema, the required keys), else :class:`DeviceReportError`."""
    if not isinstance(data, dict):
        raise DeviceReportError(f"device check {str(file)!r} must hold a JSON object, got {type(data).__name__}")
    if data.get("kind") != KIND:
        raise DeviceReportError(f"{str(file)!r} is not a device check: its 'kind' is {data.get('kind')!r}, expected "
                                f"{KIND!r} (the JSON `benchmarks/device_check.py --run/--cpu` writes)")
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise DeviceReportError(f"device check {str(file)!r} lacks the keys {missing}; it needs all of {list(REQUIRED)}")
    if data["schema"] != SCHEMA:
        raise DeviceReportError(f"device check {str(file)!r} has schema {data['schema']!r}; this checkout reads "
                                f"schema {SCHEMA}")
    if not isinstance(data["parts"], dict) or not all(isinstance(p, dict) for p in data["parts"].values()):
        raise DeviceReportError(f"device check {str(file)!r}: 'parts' must map part names ({', '.join(PARTS)}) "
                                "to objects")
    return data


def label(check: dict[str, Any]) -> str:
    """The check's key in ``device.json``: when it was made, and on what."""
    device = (check.get("machine") or {}).get("device") or "no GPU"
    return f"{check['created']} {device} ({check['mode']})"


def merge(file: Path, results: Path) -> str:
    """Add the check in ``file`` to ``results/device.json`` (replacing one of the same label), rewrite
    ``results/device.md``; returns the label."""
    check = check_file(read_json(file, "device check"), file)
    store = results / "device.json"
    history = read_json(store, "device results") if store.exists() else {"title": TITLE, "runs": {}}
    if not isinstance(history, dict) or not isinstance(history.get("runs"), dict):
        raise DeviceReportError(f"device results {str(store)!r} must be an object with a 'runs' object")
    key = label(check)
    history["runs"][key] = check
    history["runs"] = dict(sorted(history["runs"].items(), key=lambda kv: kv[1]["created"], reverse=True))
    write_json(store, history)
    atomic_write_text(results / "device.md", render(history))
    return key


# ------------------------------------------------------------------------------------------------ markdown
def render(history: dict[str, Any]) -> str:
    """``device.md``: every merged check, newest first."""
    out = [f"# {history.get('title') or TITLE}", "",
           "Recorded by `python benchmarks/run.py --merge FILE` from the JSON that `benchmarks/device_check.py` "
           "writes (how to build its bundle and run it: docs/scaling.md, \"The device check\"). Newest first.", ""]
    for key, check in history["runs"].items():
        out += render_check(key, check)
    return "\n".join(out).rstrip("\n") + "\n"


def render_check(key: str, check: dict[str, Any]) -> list[str]:
    """One check: where it ran, the parts' outcome, parity, step time, the experiments, the errors."""
    parts = check["parts"]
    out = [f"## {key}", "", *_machine(check), "", *_parts_table(parts), ""]
    out += _parity(parts.get("parity"))
    out += _steps(parts)
    out += _experiments(parts)
    errors = [(name, p["error"]) for name, p in parts.items() if p.get("error")]
    if errors:
        out += ["### Errors", ""] + [f"- `{name}`: {_one_line(text, 400)}" for name, text in errors] + [""]
    return out


def _machine(check: dict[str, Any]) -> list[str]:
    machine, versions = check.get("machine") or {}, check.get("versions") or {}
    shown = ", ".join(f"{name} {version}" for name, version in versions.items()) or "not recorded"
    bundle = check.get("bundle") or {}
    tiny = "; tiny random models at reduced sizes" if bundle.get("mode") == "tiny" else ""
    lines = [f"Mode: **{check['mode']}**" + (f" (on the CPU: a test of the check, not a device figure{tiny})"
                                             if check["mode"] == "cpu" else "") + ".",
             f"Machine: {machine.get('device') or 'no GPU'}; {machine.get('platform', '?')}, "
             f"{machine.get('cpus', '?')} CPUs, Python {machine.get('python', '?')}.",
             f"Versions: {shown}.",
             f"Missing there: {', '.join(check.get('missing') or []) or 'nothing the check needs'}."]
    models = check.get("models") or (check["parts"].get("models") or {}).get("models") or {}
    for role, info in models.items():
        lines.append(f"{role.capitalize()}: {info.get('name', '?')}, weights: {info.get('weights', '?')}.")
    if bundle:
        lines.append(f"Bundle: {bundle.get('size_mib', '?')} MiB ({bundle.get('holds', '?')}).")
    if "total_s" in check:
        lines.append(f"Total wall time: {check['total_s']:.0f} s (budget {num(check.get('budget_s'), 0)} s).")
    return [line + "  " for line in lines[:-1]] + lines[-1:]


def _parts_table(parts: dict[str, Any]) -> list[str]:
    lines = ["| part | outcome | seconds |", "|---|---|---:|"]
    for name in [*PARTS, *(p for p in parts if p not in PARTS)]:
        part = parts.get(name)
        if part is None:
            continue
        outcome = "skipped: " + part["skipped"] if part.get("skipped") else ("ok" if part.get("ok") else "FAILED")
        lines.append(f"| {name} | {outcome} | {num(part.get('seconds'), 1)} |")
    return lines


def _parity(part: dict[str, Any] | None) -> list[str]:
    if not part or "passed" not in part:
        return []
    out = [f"### Parity (`tests/test_parity.py`; torch on {part.get('torch_device', '?')}, jax on "
           f"{part.get('jax_device', '?')})", "",
           f"passed {part['passed']}, failed {part.get('failed', 0)}, errors {part.get('errors', 0)}, "
           f"skipped {part.get('skipped', 0)} of {part.get('total', '?')}" +
           (f" (selected with `-k {part['k']}`)" if part.get("k") else "") + ".", ""]
    for failure in part.get("failures") or []:
        out.append(f"- `{failure['test']}`: {_one_line(failure.get('message', ''), 300)}")
    return out + ([""] if part.get("failures") else [])


def _steps(parts: dict[str, Any]) -> list[str]:
    rows = [(name.removeprefix("step-"), parts[name]) for name in ("step-torch", "step-jax")
            if parts.get(name, {}).get("step_s") is not None]
    if not rows:
        return []
    out = ["### Fused W2S step time", "", f"{rows[0][1].get('setting', '?')}.", "",
           "| backend | device | first step (s) | compile (s) | step (s, median) | samples/s | tokens/s | model "
           "TFLOP/s | matmul peak TFLOP/s | % of peak |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, p in rows:
        share = 100 * p["model_tflops"] / p["peak_tflops"] if p.get("peak_tflops") and p.get("model_tflops") else None
        out.append(f"| {name} | {p.get('device', '?')} | {num(p.get('first_step_s'), 3)} | "
                   f"{num(p.get('compile_s'), 3)} | {num(p['step_s'], 4)} | {num(p.get('samples_per_s'), 1)} | "
                   f"{num(p.get('tokens_per_s'), 0)} | {num(p.get('model_tflops'), 2)} | "
                   f"{num(p.get('peak_tflops'), 1)} | {num(share, 1)} |")
    if len(rows) == 2:
        out += ["", f"jax / torch step time: **{rows[1][1]['step_s'] / rows[0][1]['step_s']:.2f}x**."]
    note = rows[0][1].get("flops_note")
    return out + ([f"Model FLOPs: {note}."] if note else []) + [""]


def _experiments(parts: dict[str, Any]) -> list[str]:
    rows = [(name.removeprefix("experiment-"), parts[name]) for name in ("experiment-torch", "experiment-jax")
            if parts.get(name, {}).get("rows")]
    if not rows:
        return []
    out = ["### The default experiment, per backend", ""]
    for name, p in rows:
        out += [f"{name}: `{p.get('command', '?')}` on {p.get('device', '?')}: {num(p.get('seconds'), 1)} s wall "
                "(stages, s: " + ", ".join(f"{k} {v}" for k, v in p.get("timings_s", {}).items()) + ").", ""]
    out += ["| backend | stage | defense | CA | ASR |", "|---|---|---|---:|---:|"]
    for name, p in rows:
        out += [f"| {name} | {r.get('stage')} | {r.get('defense')} | {num(r.get('CA'), 2)} | {num(r.get('ASR'), 2)} |"
                for r in p["rows"]]
    return [*out, ""]


def num(value: Any, digits: int) -> str:
    """``value`` with ``digits`` decimals, ``-`` when it is no number."""
    return "-" if not isinstance(value, int | float) else f"{value:.{digits}f}"


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
