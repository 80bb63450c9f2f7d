"""A typed facade over pluggy: discovery, blocking and error reporting.

Plugins are found through the ``unbackdoor`` entry-point group (built-ins
too). ``UNBACKDOOR_DISABLE_PLUGINS=a,b`` blocks entry points by name. A
plugin that fails to import or whose hook raises is recorded by name with its
package and shown by ``unbackdoor list``; it never takes the others down.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pluggy

from . import hookspecs
from .attack import Attack, Paraphraser
from .auditor import Auditor
from .backend import BackendInfo
from .defense import Defense
from .errors import PluginError, UnbackdoorError, UnknownNameError
from .lossdef import LossInfo

ENTRY_POINT_GROUP = "unbackdoor"
DISABLE_ENV = "UNBACKDOOR_DISABLE_PLUGINS"
#: what a plugin can register: kind -> the hook that registers it
KINDS = {"backend": "unbackdoor_backends", "attack": "unbackdoor_attacks", "defense": "unbackdoor_defenses",
         "paraphraser": "unbackdoor_paraphrasers", "loss": "unbackdoor_losses", "auditor": "unbackdoor_auditors"}

T = TypeVar("T")


@dataclass(frozen=True)
class Registered(Generic[T]):
    """An object a plugin registered, with where it came from."""

    obj: T
    plugin: str
    package: str
    version: str

    @property
    def source(self) -> str:
        """``"plugin 'attacks' (unbackdoor-attacks 0.1.0)"``: where the object came from, for messages."""
        return f"plugin {self.plugin!r} ({' '.join(x for x in (self.package, self.version) if x)})"


class PluginManager:
    """Loads plugins and answers "which backends/attacks/defenses exist"."""

    def __init__(self, *, entry_points: bool = True) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._sources: dict[str, tuple[str, str]] = {}
        self.failures: dict[str, str] = {}
        if entry_points:
            self._load_entry_points()

    def register(self, plugin: object, name: str, package: str = "(in-process)", version: str = "") -> None:
        """Register a plugin object or module; misspelt hooks fail loudly."""
        self._pm.register(plugin, name=name)
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError:
            self._pm.unregister(name=name)  # else its bad hook fails every later registration too
            raise
        self._sources[name] = (package, version)

    def blocked(self) -> set[str]:
        """Entry-point names blocked by ``UNBACKDOOR_DISABLE_PLUGINS``."""
        return {x.strip() for x in os.environ.get(DISABLE_ENV, "").split(",") if x.strip()}

    def _load_entry_points(self) -> None:
        blocked = self.blocked()
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in blocked or self._pm.has_plugin(ep.name):
                continue
            dist = ep.dist
            package, version = (dist.metadata["Name"], dist.version) if dist else ("?", "")
            try:
                self.register(ep.load(), ep.name, package, version)
            except Exception as exc:
                self.failures[ep.name] = f"{package} {version}: {type(exc).__name__}: {exc}"

    def _collect(self, hook: str, thing: str) -> dict[str, Registered[Any]]:
        found: dict[str, Registered[Any]] = {}
        for impl in getattr(self._pm.hook, hook).get_hookimpls():
            package, version = self._sources.get(impl.plugin_name, ("?", ""))
            try:
                objs = impl.function() or []
            except Exception as exc:
                self.failures[impl.plugin_name] = f"{package} {version}: {hook} raised {type(exc).__name__}: {exc}"
                continue
            for obj in objs:
                if obj.name in found:
                    raise PluginError(impl.plugin_name, f"{thing} {obj.name!r} is already registered by "
                                                        f"plugin {found[obj.name].plugin!r}")
                found[obj.name] = Registered(obj, impl.plugin_name, package, version)
        return found

    def backends(self) -> dict[str, Registered[BackendInfo]]:
        """Every registered backend by name."""
        return self._collect("unbackdoor_backends", "backend")

    def attacks(self) -> dict[str, Registered[Attack]]:
        """Every registered attack by name."""
        return self._collect("unbackdoor_attacks", "attack")

    def defenses(self) -> dict[str, Registered[Defense]]:
        """Every registered defense by name."""
        return self._collect("unbackdoor_defenses", "defense")

    def backend(self, name: str) -> BackendInfo:
        """The backend called ``name`` (clear error listing the choices otherwise)."""
        return _pick(self.backends(), "backend", name)

    def attack(self, name: str) -> Attack:
        """The attack called ``name`` with its default options."""
        return _pick(self.attacks(), "attack", name)

    def defense(self, name: str) -> Defense:
        """The defense called ``name`` with its default options."""
        return _pick(self.defenses(), "defense", name)

    def paraphrasers(self) -> dict[str, Registered[Paraphraser]]:
        """Every registered paraphraser by name."""
        return self._collect("unbackdoor_paraphrasers", "paraphraser")

    def paraphraser(self, name: str) -> Paraphraser:
        """The paraphraser called ``name``."""
        return _pick(self.paraphrasers(), "paraphraser", name)

    def losses(self) -> dict[str, Registered[LossInfo]]:
        """Every registered loss by name."""
        return self._collect("unbackdoor_losses", "loss")

    def loss(self, name: str) -> LossInfo:
        """The loss called ``name``."""
        return _pick(self.losses(), "loss", name)

    def auditors(self) -> dict[str, Registered[Auditor]]:
        """Every registered auditor by name."""
        return self._collect("unbackdoor_auditors", "auditor")

    def auditor(self, name: str) -> Auditor:
        """The auditor called ``name`` with its default options."""
        return _pick(self.auditors(), "auditor", name)

    def source_of(self, kind: str, name: str) -> Registered[Any]:
        """Which plugin and package registered the ``kind`` (attack, defense...) called ``name``."""
        if kind not in KINDS:
            raise UnknownNameError("plugin kind", kind, KINDS)
        found = self._collect(KINDS[kind], kind)
        if name not in found:
            raise UnknownNameError(kind, name, found)
        return found[name]

    def run_error(self, kind: str, name: str, exc: BaseException) -> PluginError:
        """A :class:`PluginError` naming the plugin and package whose ``kind`` ``name`` raised ``exc``.

        The failure is also recorded in :attr:`failures` (``unbackdoor list`` shows those).
        """
        try:
            reg = self.source_of(kind, name)
            plugin, where = reg.plugin, reg.source
        except UnknownNameError:
            plugin, where = f"?{kind}:{name}", "an unregistered plugin"
        detail = f"{kind} {name!r} from {where} raised {type(exc).__name__}: {exc}"
        self.failures[plugin] = detail
        return PluginError(plugin, detail)

    @contextmanager
    def running(self, kind: str, name: str) -> Iterator[None]:
        """Run plugin code; an unexpected exception becomes a :class:`PluginError` naming the plugin and package.

        Our own errors (:class:`~unbackdoor.errors.UnbackdoorError`) already name the bad value
        and pass through unchanged::

            with pm.running("defense", defense.name):
                outcome = defense.apply(ctx)
        """
        try:
            yield
        except UnbackdoorError:
            raise
        except Exception as exc:
            raise self.run_error(kind, name, exc) from exc


def _pick(found: dict[str, Registered[T]], thing: str, name: str) -> T:
    if name not in found:
        raise UnknownNameError(thing, name, found)
    return found[name].obj


_DEFAULT: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, loaded from entry points on first use."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = PluginManager()
    return _DEFAULT
