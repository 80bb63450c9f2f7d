"""The example third-party plugin, installed the way a user would (``nox -s plugins``).

Skipped where ``unbackdoor-example-plugin`` is not installed (the normal ``tests``
session); the ``plugins`` session installs it (not editable) and runs
``pytest -m plugins tests/test_example_plugin.py``.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

example = pytest.importorskip("unbackdoor_example_plugin", reason="needs `pip install examples/unbackdoor-example-plugin`")

from unbackdoor import cli  # noqa: E402
from unbackdoor.data import TextDataset  # noqa: E402
from unbackdoor.errors import ConfigError  # noqa: E402
from unbackdoor.plugins import PluginManager  # noqa: E402
from unbackdoor.testing import check_attack_contract, check_defense_contract, check_loss, tiny_model  # noqa: E402

pytestmark = pytest.mark.plugins
PACKAGE = "unbackdoor-example-plugin"


def test_installed_as_a_package_not_from_the_source_tree() -> None:
    assert "site-packages" in Path(example.__file__).parts, example.__file__


def test_entry_point_registers_the_attack_the_defenses_and_the_loss() -> None:
    pm = PluginManager()
    version = importlib.metadata.version(PACKAGE)
    for reg in (pm.attacks()["cf-suffix"], pm.defenses()["rare-word-filter"], pm.defenses()["abl"],
                pm.losses()["local-gradient-ascent"]):
        assert (reg.plugin, reg.package, reg.version) == ("example", PACKAGE, version)
    assert pm.failures == {}
    assert {"badnet", "none"} <= set(pm.attacks()) | set(pm.defenses())  # the built-ins are still there


def test_cli_list_shows_them_with_package_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    tag = f"[{PACKAGE} {importlib.metadata.version(PACKAGE)}]"
    for name in ("cf-suffix", "rare-word-filter", "abl", "local-gradient-ascent"):
        assert any(line.split()[:1] == [name] and line.endswith(tag) for line in out.splitlines()), out
    assert "failed" not in out


def test_contracts(sst2) -> None:
    pm = PluginManager()
    check_attack_contract(pm.attack("cf-suffix"), sst2.train.shuffled(0).head(400), sst2.test.head(100))
    check_defense_contract(pm.defense("rare-word-filter"))
    check_defense_contract(pm.defense("abl"))


def test_filter_drops_rows_with_a_rare_short_word(sst2) -> None:
    from unbackdoor_example_plugin.defense import suspicious_words

    data = sst2.train.head(300)
    triggered = TextDataset([*data.texts, "a fine film cf"], [*data.labels, 1], data.name, data.label_names)
    kept = PluginManager().defense("rare-word-filter").filtered(triggered)
    assert "cf" in suspicious_words(triggered, 1, 2)
    assert "a fine film cf" not in kept.texts and 0 < len(kept) < len(triggered)
    assert all(not suspicious_words(triggered, 1, 2) & set(t.split()) for t in kept.texts)


def test_its_loss_passes_check_loss_on_both_backends(tmp_path: Path) -> None:
    """Written once in the plugin: values and gradients against NumPy float64 on both backends, and 3 AdamW
    steps of a LoRA model compared between them."""
    from unbackdoor_example_plugin.loss import LocalGradientAscent

    report = check_loss(LocalGradientAscent(0.6), tiny_model(tmp_path / "llama"), backends=("torch", "jax"))
    for backend in ("torch", "jax"):
        assert {"loss", "d_logits", "step 1 loss"} <= report.quantities(backend)
    assert "step losses of run 3" in report.quantities("jax")
    with pytest.raises(ConfigError, match=r"loss 'local-gradient-ascent': gamma must be a finite number > 0, got 0"):
        LocalGradientAscent(0)


def flags_for(tiny_dirs: dict[str, Path], tmp_path: Path, backend: str) -> list[str]:
    return ["--backend", backend, "--model", str(tiny_dirs["llama"]), "--teacher", str(tiny_dirs["bert"]),
            "--attacker-rows", "96", "--user-rows", "48", "--test-rows", "32", "--attacker-epochs", "1",
            "--attacker-lr", "3e-3", "--user-epochs", "1", "--lora-rank", "4", "--max-length", "24",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_abl_trains_with_the_plugins_loss_on_each_backend(tiny_dirs, tmp_path: Path, backend: str) -> None:
    """``--setting data``: the user's rows are poisoned; ``abl`` isolates some of them and retrains."""
    flags = flags_for(tiny_dirs, tmp_path, backend)
    flags[flags.index("--user-rows") + 1] = "96"
    assert cli.main(["run", *flags, "--setting", "data", "--attack", "cf-suffix", "--defenses", "none,abl",
                     "--defense-option", "abl.isolation_rate=0.25"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    abl = next(r for r in results["rows"] if r["defense"] == "abl")
    assert results["config"]["backend"] == backend and 0 <= abl["CA"] <= 100
    assert abl["stats"]["isolation"]["flagged_rows"] == 24  # a quarter of the 96 poisoned user rows' set
    assert 0 <= abl["stats"]["isolation"]["recall"] <= 1 and abl["stats"]["train"]["steps"] > 0
    with pytest.raises(ConfigError, match=r"defense 'abl': isolation_rate must be in \(0, 1\), got 1\.5"):
        PluginManager().defense("abl").configure(isolation_rate=1.5)


def test_tiny_run_with_the_example_attack_and_defense(tiny_dirs, tmp_path: Path, backend_name: str) -> None:
    flags = flags_for(tiny_dirs, tmp_path, backend_name)
    assert cli.main(["run", *flags, "--attack", "cf-suffix", "--defenses", "none,rare-word-filter"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    stages = [(r["stage"], r["defense"]) for r in results["rows"]]
    assert stages == [("poisoned (released)", "-"), ("poisoned + defense", "none"),
                      ("poisoned + defense", "rare-word-filter")]
    assert results["config"]["attack"] == "cf-suffix" and results["attack"] == {"word": "cf"}
    assert all(0 <= r["CA"] <= 100 and 0 <= r["ASR"] <= 100 for r in results["rows"])
    assert results["rows"][2]["stats"]["dropped_rows"] >= 0
