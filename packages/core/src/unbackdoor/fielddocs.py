"""One line of help per option, read from the ``Attributes:`` section of a dataclass's docstring.

The config and every plugin document their options where they are declared (Google style), so the
command-line help, ``unbackdoor list --options NAME`` and the docs read the same text:

    Attributes:
        alpha, beta: weights of CE and KD (one entry may name several fields).
        teacher_epochs: the teacher's epochs; a description may continue
            on indented lines.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

from .options import is_group

_ENTRY = re.compile(r"^(?P<names>[A-Za-z_][\w ,]*?):\s*(?P<text>.*)$")
_ROLE = re.compile(r":\w+:`~?\.?(?:[\w.]*\.)?(?P<name>[\w]+)`")  # :class:`~.a.B` -> B


def plain(text: str) -> str:
    """Docstring markup as plain terminal text: ````x```` -> ``x``, ``:class:`~.m.Name``` -> ``Name``."""
    return _ROLE.sub(lambda m: m["name"], text).replace("``", "")


def attribute_docs(cls: type) -> dict[str, str]:
    """``{field: help}`` from the ``Attributes:`` sections of ``cls`` and its bases (the class's own wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(_parse(inspect.getdoc(klass) if "__doc__" in vars(klass) else None))
    return docs


def _parse(doc: str | None) -> dict[str, str]:
    lines = (doc or "").splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
    if start is None:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    indent = None
    pending = ""  # an entry's names that continue on the next line ("a, b,")
    for line in lines[start:]:
        if not line.strip():
            break
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if pending or (depth == indent and line.strip().endswith(",") and ":" not in line):
            pending = f"{pending} {line.strip()}".strip()
            if pending.endswith(","):
                continue
            line, depth, pending = " " * indent + pending, indent, ""
        match = _ENTRY.match(line.strip())
        if depth == indent and match:
            names = [n.strip() for n in match["names"].split(",")]
            for name in names:
                out[name] = match["text"].strip()
        elif depth > indent and names:  # a continuation line of the entry above
            for name in names:
                out[name] = f"{out[name]} {line.strip()}"
        else:
            break
    return out


def option_rows(obj: Any) -> list[tuple[str, str, str, str]]:
    """``(name, type, default, help)`` of every option (dataclass field) of a plugin object or class; a group
    option (a dataclass value, :mod:`unbackdoor.options`) gives one row per option of it, ``group.option``,
    with that option's own help (and its older spelling, from ``option_aliases``)."""
    cls = obj if isinstance(obj, type) else type(obj)
    docs, old = attribute_docs(cls), _old_spellings(cls)
    rows = []
    for f in dataclasses.fields(obj):
        default = getattr(obj, f.name) if not isinstance(obj, type) else f.default
        if is_group(default):
            owner = getattr(default, "name", type(default).__name__)
            for name, kind, shown, text in option_rows(default):
                also = f" (also {old[f'{f.name}.{name}']})" if f"{f.name}.{name}" in old else ""
                rows.append((f"{f.name}.{name}", kind, shown, f"{owner}'s {name}: {text}{also}"))
            continue
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append((f.name, kind, _shown(default), plain(docs.get(f.name, ""))))
    return rows


def _old_spellings(cls: type) -> dict[str, str]:
    """``{option: older spelling}`` from ``option_aliases`` (a prefix alias for each option of its group)."""
    out: dict[str, str] = {}
    for old, new in getattr(cls, "option_aliases", {}).items():
        if old.endswith("_") and new.endswith("."):
            out.update({name: old + name[len(new):] for name in _group_names(cls, new[:-1])})
        else:
            out[new] = old
    return out


def _group_names(cls: type, group: str) -> list[str]:
    field = next((f for f in dataclasses.fields(cls) if f.name == group), None)
    value = field.default if field is not None else None
    if not is_group(value):
        return []
    return [f"{group}.{f.name}" for f in dataclasses.fields(value)]


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "(none)"
    return "(none)" if value is None else str(value)
