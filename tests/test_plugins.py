"""Tests of the plugin manager: entry-point discovery, in-process plugins, blocking and failure reporting."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pluggy
import pytest

import unbackdoor.plugins
from unbackdoor import cli
from unbackdoor.attack import Attack, InsertionAttack, Paraphraser, PoisonConfig
from unbackdoor.backend import BackendInfo
from unbackdoor.data import TextDataset
from unbackdoor.defense import Defense
from unbackdoor.errors import ConfigError, PluginError, UnknownNameError
from unbackdoor.hookspecs import hookimpl
from unbackdoor.plugins import DISABLE_ENV, ENTRY_POINT_GROUP, PluginManager, Registered
from unbackdoor_attacks.insertion import BadNet

BUILTINS = {
    # hook: {name: (entry-point name, distribution)}
    "backends": {"torch": ("torch", "unbackdoor-torch"), "jax": ("jax", "unbackdoor-jax")},
    "attacks": {name: ("attacks", "unbackdoor-attacks")
                for name in ("badnet", "insent", "addsent", "syntactic", "style", "proattack", "multi")},
    "defenses": {"none": ("defenses", "unbackdoor-defenses"), "w2s": ("defenses", "unbackdoor-defenses")},
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DISABLE_ENV, raising=False)


# ----------------------------------------------------------------------------------------- test plugins


@dataclass(frozen=True)
class Shout(InsertionAttack):
    """A made-up attack: appends ``word`` to the text."""

    name = "shout"
    description = "test attack appending a loud word"
    word: str = "LOUD"

    def insert(self, text: str, rng: np.random.Generator) -> str:
        return f"{text} {self.word}"


class ShoutPlugin:
    @hookimpl
    def unbackdoor_attacks(self) -> list[Attack]:
        return [Shout()]


class BoomPlugin:
    @hookimpl
    def unbackdoor_attacks(self) -> list[Attack]:
        raise RuntimeError("kaboom")


class DuplicatePlugin:
    @hookimpl
    def unbackdoor_attacks(self) -> list[Attack]:
        return [BadNet()]


class MisspeltPlugin:
    @hookimpl
    def unbackdoor_atacks(self) -> list[Attack]:
        return [Shout()]


def small_dataset() -> TextDataset:
    texts = [f"sentence {i} is here" for i in range(10)]
    return TextDataset(texts, np.array([0, 1] * 5), "tiny", ("negative", "positive"))


# ----------------------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize("hook", sorted(BUILTINS))
def test_builtins_found_through_entry_points(hook: str) -> None:
    pm = PluginManager()
    found: dict[str, Registered[Any]] = getattr(pm, hook)()
    for name, (plugin, package) in BUILTINS[hook].items():
        assert name in found, f"{hook}: {name!r} missing from {sorted(found)}"
        reg = found[name]
        assert reg.obj.name == name
        assert reg.plugin == plugin
        assert reg.package == package
        assert reg.version == importlib.metadata.version(package)
    assert pm.failures == {}


def test_builtin_objects_have_the_right_types() -> None:
    pm = PluginManager()
    assert isinstance(pm.backend("torch"), BackendInfo)
    assert pm.backend("jax").factory.startswith("unbackdoor_jax")
    assert isinstance(pm.attack("insent"), Attack)
    assert isinstance(pm.defense("w2s"), Defense)


def test_builtins_registered_in_entry_point_group() -> None:
    names = {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert {"torch", "jax", "attacks", "defenses"} <= names


def test_listing_backends_imports_no_framework() -> None:
    code = ("import sys; from unbackdoor.plugins import PluginManager; pm = PluginManager(); "
            "assert set(pm.backends()) >= {'torch', 'jax'}; "
            "print(sorted(m for m in ('torch', 'jax', 'flax', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_no_entry_points_means_nothing_registered() -> None:
    pm = PluginManager(entry_points=False)
    assert pm.attacks() == {} and pm.backends() == {} and pm.defenses() == {}
    with pytest.raises(UnknownNameError, match=r"\(none registered\)"):
        pm.attack("badnet")


# ----------------------------------------------------------------------------------------- in-process plugins


def test_registered_plugin_appears_in_attacks() -> None:
    pm = PluginManager()
    pm.register(ShoutPlugin(), "shout-plugin", package="shout-pkg", version="1.2")
    attacks = pm.attacks()
    assert {"badnet", "insent", "shout"} <= set(attacks)
    reg = attacks["shout"]
    assert isinstance(reg.obj, Shout)
    assert (reg.plugin, reg.package, reg.version) == ("shout-plugin", "shout-pkg", "1.2")
    assert pm.attack("shout").configure(word="HEY").word == "HEY"


def test_registered_plugin_appears_in_cli_list(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pm = PluginManager()
    pm.register(ShoutPlugin(), "shout-plugin", package="shout-pkg", version="1.2")
    monkeypatch.setattr(unbackdoor.plugins, "_DEFAULT", pm)
    monkeypatch.setattr(cli, "get_plugin_manager", lambda: pm)
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    shout = [line for line in lines if line.split() and line.split()[0] == "shout"]
    assert len(shout) == 1, out
    assert Shout.description in shout[0] and "[shout-pkg 1.2]" in shout[0]
    for title in ("backends:", "attacks:", "defenses:"):
        assert title in lines
    for name in ("torch", "jax", "badnet", "insent", "none", "w2s"):
        assert any(line.split()[:1] == [name] for line in lines), f"{name} missing from:\n{out}"
    assert "unbackdoor-attacks" in out
    assert "failed" not in out


def test_cli_list_uses_the_default_manager(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pm = PluginManager()
    pm.register(ShoutPlugin(), "shout-plugin")
    monkeypatch.setattr(unbackdoor.plugins, "_DEFAULT", pm)  # only the module global, not cli's import
    assert unbackdoor.plugins.get_plugin_manager() is pm
    assert cli.main(["list"]) == 0
    shout = [line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["shout"]]
    assert len(shout) == 1 and Shout.description in shout[0] and "(in-process)" in shout[0]


def test_registered_attack_runs() -> None:
    pm = PluginManager(entry_points=False)
    pm.register(ShoutPlugin(), "shout-plugin")
    data = small_dataset()
    cfg = PoisonConfig(target=1, rate=0.3, seed=0)
    out = pm.attack("shout").poison_train(data, cfg)
    rows = np.flatnonzero(out.poisoned)
    assert len(rows) == 3
    assert np.all(data.labels[rows] == 0) and np.all(out.labels[rows] == 1)
    assert all(out.texts[i] == data.texts[i] + " LOUD" for i in rows)
    assert all(out.texts[i] == data.texts[i] for i in np.flatnonzero(~out.poisoned))
    asr = pm.attack("shout").asr_test(data, cfg)
    assert len(asr) == 5 and all(t.endswith(" LOUD") for t in asr.texts)


# ----------------------------------------------------------------------------------------- blocking


def test_disable_env_removes_builtin_attacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "attacks")
    pm = PluginManager()
    assert pm.blocked() == {"attacks"}
    assert "badnet" not in pm.attacks() and "insent" not in pm.attacks()
    assert {"torch", "jax"} <= set(pm.backends())  # other plugins untouched
    assert {"none", "w2s"} <= set(pm.defenses())
    pm.register(ShoutPlugin(), "shout-plugin")
    with pytest.raises(UnknownNameError) as err:
        pm.attack("badnet")
    msg = str(err.value)
    assert "badnet" in msg and "choose one of: " in msg and "shout" in msg
    assert "shout" in err.value.choices and not set(BUILTINS["attacks"]) & set(err.value.choices)


def test_disable_env_several_names_with_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, " attacks , jax,, ")
    pm = PluginManager()
    assert pm.blocked() == {"attacks", "jax"}
    assert set(pm.backends()) >= {"torch"} and "jax" not in pm.backends()
    assert not any(reg.package == "unbackdoor-attacks" for reg in pm.attacks().values())  # third-party ones may stay
    with pytest.raises(UnknownNameError, match=r"jax.*choose one of: torch"):
        pm.backend("jax")


# ----------------------------------------------------------------------------------------- failures


def test_raising_hook_is_recorded_and_hides_nothing() -> None:
    pm = PluginManager()
    pm.register(BoomPlugin(), "boom", package="boom-pkg", version="0.1")
    pm.register(ShoutPlugin(), "shout-plugin")
    attacks = pm.attacks()
    assert {"badnet", "insent", "shout"} <= set(attacks)
    assert set(pm.failures) == {"boom"}
    msg = pm.failures["boom"]
    assert "kaboom" in msg and "RuntimeError" in msg and "boom-pkg" in msg and "unbackdoor_attacks" in msg


def test_raising_hook_shown_by_cli_list(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pm = PluginManager()
    pm.register(BoomPlugin(), "boom", package="boom-pkg")
    monkeypatch.setattr(unbackdoor.plugins, "_DEFAULT", pm)
    monkeypatch.setattr(cli, "get_plugin_manager", lambda: pm)
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "plugin 'boom' failed to load" in out and "kaboom" in out
    assert "badnet" in out


def test_duplicate_attack_name_names_both_plugins() -> None:
    pm = PluginManager()
    pm.register(DuplicatePlugin(), "dup")
    with pytest.raises(PluginError) as err:
        pm.attacks()
    msg = str(err.value)
    assert "'dup'" in msg and "'attacks'" in msg and "'badnet'" in msg
    assert err.value.plugin in {"dup", "attacks"}


def test_misspelt_hook_fails_at_register_time() -> None:
    pm = PluginManager()
    with pytest.raises(pluggy.PluginValidationError, match="unbackdoor_atacks"):
        pm.register(MisspeltPlugin(), "typo")
    # the bad plugin is not left behind: later registrations and lookups still work
    pm.register(ShoutPlugin(), "shout-plugin")
    assert {"badnet", "shout"} <= set(pm.attacks())
    assert "typo" not in pm.failures


def fake_entry_point(name: str, load: Any, package: str = "broken-pkg", version: str = "6.6.6") -> SimpleNamespace:
    dist = SimpleNamespace(metadata={"Name": package}, version=version)
    return SimpleNamespace(name=name, dist=dist, load=load, group=ENTRY_POINT_GROUP)


def test_entry_point_that_fails_to_import_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    real = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))

    def cannot_import() -> Any:
        raise ImportError("No module named 'broken_plugin'")

    fake = fake_entry_point("broken", cannot_import)
    seen_groups: list[str] = []

    def entry_points(group: str) -> list[Any]:
        seen_groups.append(group)
        return [fake, *real]

    monkeypatch.setattr(unbackdoor.plugins.metadata, "entry_points", entry_points)
    pm = PluginManager()
    assert seen_groups == [ENTRY_POINT_GROUP]
    assert set(pm.failures) == {"broken"}
    msg = pm.failures["broken"]
    assert "ImportError" in msg and "No module named 'broken_plugin'" in msg and "broken-pkg 6.6.6" in msg
    assert {"badnet", "insent"} <= set(pm.attacks())  # the real ones still load
    assert pm.attacks()["badnet"].package == "unbackdoor-attacks"


def test_entry_point_with_misspelt_hook_hides_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    fake = fake_entry_point("typo", MisspeltPlugin)  # load() returns a plugin object with a bad hook name
    monkeypatch.setattr(unbackdoor.plugins.metadata, "entry_points", lambda group: [fake, *real])
    pm = PluginManager()
    assert set(pm.failures) == {"typo"}
    assert "unbackdoor_atacks" in pm.failures["typo"]
    assert {"badnet", "insent"} <= set(pm.attacks())
    assert pm.attacks()["badnet"].package == "unbackdoor-attacks"
    assert {"torch", "jax"} <= set(pm.backends())


def test_entry_point_without_dist(monkeypatch: pytest.MonkeyPatch) -> None:
    def cannot_import() -> Any:
        raise ImportError("gone")

    fake = SimpleNamespace(name="orphan", dist=None, load=cannot_import)
    monkeypatch.setattr(unbackdoor.plugins.metadata, "entry_points", lambda group: [fake])
    pm = PluginManager()
    assert "gone" in pm.failures["orphan"]


def test_blocked_entry_point_is_not_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_load() -> Any:
        raise AssertionError("a blocked entry point was loaded")

    monkeypatch.setattr(unbackdoor.plugins.metadata, "entry_points",
                        lambda group: [fake_entry_point("blocked-one", must_not_load)])
    monkeypatch.setenv(DISABLE_ENV, "blocked-one")
    pm = PluginManager()
    assert pm.failures == {}


# ----------------------------------------------------------------------------------------- paraphrasers


@dataclass(frozen=True)
class Echo(Paraphraser):
    """A made-up paraphraser."""

    name = "echo"
    description = "test paraphraser repeating the style"

    def paraphrase(self, texts: list[str], style: str) -> list[str]:
        return [f"{t} ({style})" for t in texts]


class EchoPlugin:
    @hookimpl
    def unbackdoor_paraphrasers(self) -> list[Paraphraser]:
        return [Echo()]


def test_paraphraser_hook_registers_and_lists(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pm = PluginManager()
    assert pm.paraphrasers() == {}
    pm.register(EchoPlugin(), "echo-plugin", package="echo-pkg", version="2.0")
    assert isinstance(pm.paraphraser("echo"), Echo)
    assert pm.paraphrasers()["echo"].package == "echo-pkg"
    with pytest.raises(UnknownNameError, match="unknown paraphraser 'scpn'; choose one of: echo"):
        pm.paraphraser("scpn")
    monkeypatch.setattr(cli, "get_plugin_manager", lambda: pm)
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "paraphrasers:" in lines
    echo = [line for line in lines if line.split()[:1] == ["echo"]]
    assert len(echo) == 1 and Echo.description in echo[0] and echo[0].endswith("[echo-pkg 2.0]")


def test_cli_list_without_version_or_paraphrasers(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    pm = PluginManager(entry_points=False)
    pm.register(ShoutPlugin(), "shout-plugin", package="shout-pkg")
    monkeypatch.setattr(cli, "get_plugin_manager", lambda: pm)
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "[shout-pkg]" in out and "[shout-pkg ]" not in out
    assert out.count("(none registered)") == 5  # backends, defenses, paraphrasers, losses, auditors


# ----------------------------------------------------------------------------------------- run-time failures


def test_source_of_names_plugin_and_package() -> None:
    pm = PluginManager()
    pm.register(ShoutPlugin(), "shout-plugin", package="shout-pkg", version="1.2")
    reg = pm.source_of("attack", "shout")
    assert (reg.plugin, reg.package, reg.version) == ("shout-plugin", "shout-pkg", "1.2")
    assert reg.source == "plugin 'shout-plugin' (shout-pkg 1.2)"
    assert pm.source_of("defense", "none").package == "unbackdoor-defenses"
    assert pm.source_of("backend", "torch").plugin == "torch"
    with pytest.raises(UnknownNameError, match=r"unknown attack 'nope'.*badnet"):
        pm.source_of("attack", "nope")
    with pytest.raises(UnknownNameError, match=r"unknown plugin kind 'attacks'; choose one of: attack, auditor, backend"):
        pm.source_of("attacks", "badnet")


def test_running_wraps_plugin_errors_with_their_source() -> None:
    pm = PluginManager()
    pm.register(ShoutPlugin(), "shout-plugin", package="shout-pkg", version="1.2")
    with pytest.raises(PluginError) as err, pm.running("attack", "shout"):
        raise RuntimeError("disk full")
    msg = str(err.value)
    assert err.value.plugin == "shout-plugin"
    assert "attack 'shout' from plugin 'shout-plugin' (shout-pkg 1.2) raised RuntimeError: disk full" in msg
    assert isinstance(err.value.__cause__, RuntimeError)
    assert "disk full" in pm.failures["shout-plugin"]


def test_running_lets_our_own_errors_through() -> None:
    pm = PluginManager()
    with pytest.raises(ConfigError, match="bad option") as err, pm.running("defense", "w2s"):
        raise ConfigError("bad option")
    assert not isinstance(err.value, PluginError) and pm.failures == {}


def test_run_error_for_an_unregistered_name() -> None:
    err = PluginManager(entry_points=False).run_error("defense", "ghost", ValueError("boo"))
    assert "defense 'ghost' from an unregistered plugin raised ValueError: boo" in str(err)


def test_the_gguf_converter_is_found_through_the_backend_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """No framework module is named in the core: the torch backend's BackendInfo offers the converter."""
    from unbackdoor import models
    from unbackdoor_torch.convert import convert_gguf

    assert "unbackdoor_torch" not in Path(models.__file__).read_text(encoding="utf-8")
    assert models._converter() is convert_gguf
    bare = PluginManager(entry_points=False)
    bare.register(SimpleNamespace(unbackdoor_backends=hookimpl(lambda: [BackendInfo("mlx", "no converter", "m:f")])),
                  "mlx-only")
    monkeypatch.setattr(unbackdoor.plugins, "_DEFAULT", bare)
    with pytest.raises(ConfigError, match=r"converting a GGUF model needs a backend with a GGUF converter, and none "
                                          r"imports \(backends offering one: torch\): pip install unbackdoor-torch"):
        models._converter()
    missing = BackendInfo("other", "its framework is not installed", "m:f", gguf_converter="no_such_module:convert")
    assert missing.converter() is None
