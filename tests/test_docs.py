"""Docs as tests: docs/plugins.md documents every hook with an example, and its python blocks run."""

from __future__ import annotations

import re
import types
from pathlib import Path

import numpy as np
import pytest

import unbackdoor.plugins
from unbackdoor import hookspecs
from unbackdoor.attack import PoisonConfig
from unbackdoor.backend import BackendInfo
from unbackdoor.data import load_dataset
from unbackdoor.lossdef import LossInfo
from unbackdoor.losses import cross_entropy, log_softmax, reference_loss, softmax
from unbackdoor.plugins import KINDS, PluginManager
from unbackdoor.testing import check_attack_contract, check_defense_contract, check_paraphraser_contract, check_plugin_object
from unbackdoor_attacks.paraphrase import StyleBkd

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
TEXT = DOC.read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```", TEXT, flags=re.S | re.M)
HOOKS = sorted(name for name, fn in vars(hookspecs).items()
               if name.startswith("unbackdoor_") and hasattr(fn, f"{hookspecs.PROJECT}_spec"))


def example_of(hook: str) -> str:
    """The python block that implements ``hook``."""
    found = [b for b in BLOCKS if re.search(rf"@hookimpl\ndef {hook}\(", b)]
    assert found, f"docs/plugins.md has no ```python block with '@hookimpl' + 'def {hook}(...)'"
    return found[0]


def test_the_hookspecs_are_found() -> None:
    assert {"unbackdoor_attacks", "unbackdoor_defenses", "unbackdoor_backends", "unbackdoor_paraphrasers"} <= set(HOOKS)
    assert set(KINDS.values()) == set(HOOKS), "PluginManager.source_of must know every hook"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_section_and_an_example(hook: str) -> None:
    assert f"### `{hook}`" in TEXT, f"docs/plugins.md has no section '### `{hook}`'"
    section = TEXT.split(f"### `{hook}`", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    assert example_of(hook) in section, f"the example of {hook} is not in its own section"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_blocks_compile(index: int) -> None:
    compile(BLOCKS[index], f"docs/plugins.md python block {index}", "exec", dont_inherit=True)


def test_the_page_runs_top_to_bottom(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """All blocks in one namespace, like a reader pasting them in order; then the page's own tests (its loss
    through ``check_loss`` on both backends)."""
    namespace: dict[str, object] = {"__name__": "docs_plugins"}
    for index, block in enumerate(BLOCKS):
        exec(compile(block, f"docs/plugins.md python block {index}", "exec", dont_inherit=True), namespace)
    namespace["test_my_plugin"]()  # type: ignore[operator]
    namespace["test_my_loss"](tmp_path)  # type: ignore[operator]
    assert "plugin 'attacks' (unbackdoor-attacks" in capsys.readouterr().out


def _register(hook: str) -> PluginManager:
    module = types.ModuleType(f"docs_example_{hook}")
    exec(compile(example_of(hook), f"docs/plugins.md {hook}", "exec", dont_inherit=True), module.__dict__)
    pm = PluginManager(entry_points=False)
    pm.register(module, f"docs-{hook}")
    return pm


@pytest.mark.parametrize("hook", HOOKS)
def test_each_hook_example_registers_and_keeps_its_contract(hook: str, sst2) -> None:
    pm = _register(hook)
    kind = next(k for k, h in KINDS.items() if h == hook)
    found = getattr(pm, "losses" if kind == "loss" else f"{kind}s")()  # pm.attacks(), pm.defenses(), ...
    assert len(found) == 1 and pm.failures == {}
    obj = next(iter(found.values())).obj
    if kind == "attack":
        check_attack_contract(obj, sst2.train.shuffled(0).head(300), sst2.test.head(100))
    elif kind == "defense":
        check_defense_contract(obj)
    elif kind == "paraphraser":
        check_paraphraser_contract(obj, ["a fine film", "dull"], "bible")
    elif kind == "loss":
        check_documented_loss(obj)
    elif kind == "auditor":
        check_plugin_object(obj, "auditor")
    else:
        assert isinstance(obj, BackendInfo) and ":" in obj.factory


def check_documented_loss(info: LossInfo) -> None:
    """The documented loss: a hashable spec whose one definition the NumPy reference evaluates."""
    spec = info.spec()
    assert info.written_once and hash(spec) == hash(info.spec())
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(5, 3)), rng.integers(0, 3, 5)
    value = reference_loss(spec, {"logits": logits}, {"labels": labels})
    entropy = -(softmax(logits) * log_softmax(logits)).sum(-1).mean()
    assert value == pytest.approx(cross_entropy(logits, labels).mean() - spec.weight * entropy, rel=1e-12)


def test_the_documented_paraphraser_drives_the_style_attack(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(unbackdoor.plugins, "_DEFAULT", _register("unbackdoor_paraphrasers"))
    mr = load_dataset("mr")  # no style files in the shared data: the paraphraser writes the trigger
    out = StyleBkd().configure(paraphraser="opener").triggered_test(mr.test.head(20), PoisonConfig(dataset="mr"))
    assert all(t.startswith("and it came to pass that ") for t in out.texts)
