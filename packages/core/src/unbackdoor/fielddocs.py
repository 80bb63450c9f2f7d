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

_ENTRY = re.compile(r"^(?P<names>[A-Za-z_][\w ,]*?):\s*(?P<text>.*)$")
_ROLE = re.compile(r":\w+:`~?\.?(?:[\w.]*\.)?(?P<name>[\w]+)`")  # :class:`~.a.B` -> B


def plain(text: str) -> str:
    """Docstring markup as plain terminal text: ````x```` -> ``x``, ``:class:`~.m.Name``` -> ``Name``."""
    return _ROLE.sub(lambda m: m["name"], text).replace("``", "")


def attribute_docs(cls: type) -> dict[str, str]:
    """``{field: help}`` from the ``Attributes:`` sections of ``cls`` and its bases (the class's own wins).

    A class that forwards options to another plugin under a prefix (``psim+rga``'s ``psim_threshold`` is
    PSIM's ``threshold``) names it in ``option_docs_from = {"psim_": PSIM}``: those options read the other
    class's help.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(_parse(inspect.getdoc(klass) if "__doc__" in vars(klass) else None))
    for prefix, source in getattr(cls, "option_docs_from", {}).items():
        owner = getattr(source, "name", source.__name__)
        docs.update({prefix + name: f"{owner}'s {name}: {text}" for name, text in attribute_docs(source).items()})
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
    """``(name, type, default, help)`` of every option (dataclass field) of a plugin object or class."""
    docs = attribute_docs(obj if isinstance(obj, type) else type(obj))
    rows = []
    for f in dataclasses.fields(obj):
        default = getattr(obj, f.name) if not isinstance(obj, type) else f.default
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append((f.name, kind, _shown(default), plain(docs.get(f.name, ""))))
    return rows


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "(none)"
    return "(none)" if value is None else str(value)
