"""Tests of the experiment config: defaults, TOML/YAML files, command-line flags and user errors."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

import unbackdoor.plugins
from unbackdoor import cli
from unbackdoor.backend import BACKEND_ENV
from unbackdoor.config import ExperimentConfig, build_config, field_names, read_config_file
from unbackdoor.errors import ConfigError, UnknownNameError
from unbackdoor.plugins import DISABLE_ENV, PluginManager
from unbackdoor.preflight import check_run_inputs
from unbackdoor.specs import AUTO_TARGETS, resolve_targets


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.delenv(DISABLE_ENV, raising=False)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def run_args(*argv: str) -> argparse.Namespace:
    """Parse ``unbackdoor run ARGV`` with the real parser."""
    return cli._parser().parse_args(["run", *argv])


# ----------------------------------------------------------------------------------------- LoRA targets


LLAMA = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")]
BERT = [f"encoder.layer.{i}.{m}" for i in range(2) for m in ("attention.self.query", "attention.self.value",
                                                                 "attention.self.key", "intermediate.dense")]


@pytest.mark.parametrize(("layers", "targets"), [(LLAMA, ("q_proj", "v_proj")), (BERT, ("query", "value"))])
def test_auto_lora_targets_are_the_family_attention_projections(layers, targets) -> None:
    assert ExperimentConfig().lora_targets == (AUTO_TARGETS,)
    assert resolve_targets((AUTO_TARGETS,), layers) == targets
    assert resolve_targets(("up_proj", "all-linear"), LLAMA) == ("up_proj", "all-linear")  # named ones stay


def test_lora_targets_naming_no_layer_are_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"lora_targets \['query'\] match no linear layer; choose from "
                                          r"\['q_proj', 'up_proj', 'v_proj'\] or 'all-linear'"):
        resolve_targets(("query",), LLAMA)
    with pytest.raises(ConfigError, match=r"lora_targets 'auto' knows none of this model's attention layers \(it tries "
                                          r"\['q_proj,v_proj', 'query,value'.*choose from \['in_proj', 'out_proj'\]"):
        resolve_targets((AUTO_TARGETS,), ["mixer.in_proj", "mixer.out_proj"])


def test_the_teacher_is_checked_only_when_a_defense_distils_from_it(tiny_dirs, tmp_path: Path) -> None:
    """A run of RGA or PSIM needs no teacher package; one with w2s fails in seconds naming the teacher."""
    cfg = ExperimentConfig(model=str(tiny_dirs["llama"]), teacher=str(tmp_path / "no-teacher"),
                           out=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"))
    checked, _, _ = check_run_inputs(cfg, uses_teacher=False)
    assert checked.lora_targets == ("q_proj", "v_proj") and checked.teacher == cfg.teacher
    with pytest.raises(ConfigError, match=r"^teacher: .*no-teacher"):
        check_run_inputs(cfg)
    pm = unbackdoor.plugins.get_plugin_manager()
    assert [name for name in pm.defenses() if pm.defense(name).uses_teacher] == ["w2s"]


# ----------------------------------------------------------------------------------------- defaults and files


def test_defaults_are_valid() -> None:
    cfg = build_config()
    assert cfg == ExperimentConfig()
    assert cfg.validate() is cfg
    assert cfg.defenses == ("none", "w2s") and cfg.attack == "badnet" and cfg.dataset == "sst2"
    assert cfg.attacker_spec().lr == cfg.attacker_lr and cfg.user_spec().epochs == cfg.user_epochs
    assert cfg.lora().rank == cfg.lora_rank
    assert set(cfg.to_dict()) == set(field_names())


TOML_BODY = """\
seed = 3
user_epochs = 1
attacker_lr = 1e-4
defenses = ["w2s"]
lora_targets = ["q_proj", "k_proj", "v_proj"]
clean_label = true
[attack_options]
words = ["cf", "bb"]
[defense_options.w2s]
beta = 0.5
"""


def check_file_values(cfg: ExperimentConfig) -> None:
    assert cfg.seed == 3
    assert cfg.user_epochs == 1.0 and isinstance(cfg.user_epochs, float)
    assert cfg.attacker_lr == 1e-4
    assert cfg.defenses == ("w2s",)
    assert cfg.lora_targets == ("q_proj", "k_proj", "v_proj")
    assert cfg.clean_label is True
    assert cfg.attack_options == {"words": ["cf", "bb"]}
    assert cfg.defense_options == {"w2s": {"beta": 0.5}}
    assert cfg.user_rows == ExperimentConfig.user_rows  # untouched keys keep their defaults


def test_toml_flat(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.toml", TOML_BODY)
    check_file_values(build_config(read_config_file(path)))


def test_toml_under_experiment_table(tmp_path: Path) -> None:
    body = "[experiment]\n" + TOML_BODY.replace("[attack_options]", "[experiment.attack_options]").replace(
        "[defense_options.w2s]", "[experiment.defense_options.w2s]")
    path = write(tmp_path / "exp.toml", body)
    assert set(read_config_file(path)) == {"seed", "user_epochs", "attacker_lr", "defenses", "lora_targets",
                                           "clean_label", "attack_options", "defense_options"}
    check_file_values(build_config(read_config_file(path)))


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml(tmp_path: Path, suffix: str) -> None:
    import yaml  # noqa: F401 - the yaml extra is installed by every nox session
    body = """\
seed: 3
user_epochs: 1
attacker_lr: 1.0e-4
defenses: [w2s]
lora_targets: [q_proj, k_proj, v_proj]
clean_label: true
attack_options:
  words: [cf, bb]
defense_options:
  w2s: {beta: 0.5}
"""
    check_file_values(build_config(read_config_file(write(tmp_path / f"exp{suffix}", body))))


def test_yaml_under_experiment_key(tmp_path: Path) -> None:
    import yaml  # noqa: F401 - the yaml extra is installed by every nox session
    path = write(tmp_path / "exp.yaml", "experiment:\n  seed: 9\n  dataset: hsol\n")
    cfg = build_config(read_config_file(path))
    assert (cfg.seed, cfg.dataset) == (9, "hsol")


def test_empty_files_give_defaults(tmp_path: Path) -> None:
    assert read_config_file(write(tmp_path / "empty.toml", "")) == {}
    import yaml  # noqa: F401 - the yaml extra is installed by every nox session
    assert read_config_file(write(tmp_path / "empty.yaml", "")) == {}


def test_later_layers_win_and_none_is_ignored() -> None:
    cfg = build_config({"seed": 1, "model": "a"}, {"seed": 2, "model": None}, {"user-rows": 5})
    assert (cfg.seed, cfg.model, cfg.user_rows) == (2, "a", 5)


# ----------------------------------------------------------------------------------------- command line


def test_cli_flags_override_file(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.toml", TOML_BODY)
    cfg = cli.config_from_args(run_args("--config", str(path), "--seed", "7", "--user-epochs", "0.5",
                                        "--defenses", "none,w2s"))
    assert cfg.seed == 7 and cfg.user_epochs == 0.5
    assert cfg.defenses == ("none", "w2s")
    assert cfg.attacker_lr == 1e-4 and cfg.clean_label is True  # file values not overridden stay
    assert cfg.lora_targets == ("q_proj", "k_proj", "v_proj")


def test_cli_flags_alone_are_typed() -> None:
    cfg = cli.config_from_args(run_args("--seed", "5", "--poison-rate", "0.3", "--clean-label", "yes",
                                        "--lora-targets", "all-linear", "--backend", "jax", "--data-dir", "/x"))
    assert cfg.seed == 5 and isinstance(cfg.seed, int)
    assert cfg.poison_rate == 0.3 and cfg.clean_label is True
    assert cfg.lora_targets == ("all-linear",)
    assert cfg.backend == "jax" and cfg.data_dir == "/x"


def test_no_flags_means_defaults() -> None:
    args = run_args()
    assert set(vars(args)) == {"func"}  # argument_default=SUPPRESS: absent flags stay absent
    assert cli.config_from_args(args) == ExperimentConfig()


def test_defenses_flag_becomes_tuple() -> None:
    assert cli.config_from_args(run_args("--defenses", "none,w2s")).defenses == ("none", "w2s")
    assert cli.config_from_args(run_args("--defenses", "w2s")).defenses == ("w2s",)
    assert cli.config_from_args(run_args("--defenses", " none, w2s ,")).defenses == ("none", "w2s")


def test_attack_option_flags() -> None:
    cfg = cli.config_from_args(run_args("--attack-option", "words=cf,bb", "--attack-option", "count=2"))
    assert cfg.attack_options == {"words": "cf,bb", "count": "2"}


def test_defense_option_flags() -> None:
    cfg = cli.config_from_args(run_args("--defense-option", "w2s.beta=0.5", "--defense-option", "w2s.gamma=0",
                                        "--defense-option", "none.x=a=b"))
    assert cfg.defense_options == {"w2s": {"beta": "0.5", "gamma": "0"}, "none": {"x": "a=b"}}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--defense-option", "beta=0.5"], "DEFENSE.KEY=VALUE"),
        (["--defense-option", "w2s.beta"], "KEY=VALUE"),
        (["--attack-option", "words"], "KEY=VALUE"),
        (["--attack-option", "=cf"], "KEY=VALUE"),
    ],
)
def test_malformed_option_flags(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as err:
        cli.config_from_args(run_args(*argv))
    assert argv[1] in str(err.value)


# ----------------------------------------------------------------------------------------- bad values


def test_unknown_key_in_file_lists_valid_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.toml", "epochs = 3\n")
    with pytest.raises(ConfigError) as err:
        build_config(read_config_file(path))
    msg = str(err.value)
    assert "'epochs'" in msg
    assert "valid options:" in msg
    for key in ("user_epochs", "attacker_epochs", "poison_rate", "defenses"):
        assert key in msg


@pytest.mark.parametrize(
    ("layer", "needle"),
    [
        ({"user_epochs": "abc"}, "user_epochs"),
        ({"seed": "x"}, "seed"),
        ({"user_batch_size": 16.5}, "user_batch_size"),
        ({"clean_label": "maybe"}, "clean_label"),
        ({"defenses": 5}, "defenses"),
        ({"attack_options": "words=cf"}, "attack_options"),
    ],
)
def test_wrong_type_names_the_option(layer: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as err:
        build_config(layer)
    assert repr(next(iter(layer.values()))) in str(err.value)


@pytest.mark.parametrize(
    ("layer", "needle"),
    [
        ({"user_lr": -1e-4}, "learning rate"),
        ({"attacker_lr": 0}, "learning rate"),
        ({"user_lr": float("nan")}, "learning rate"),
        ({"user_epochs": 0}, "epochs"),
        ({"user_batch_size": 0}, "batch_size"),
        ({"attacker_batch_size": -2}, "batch_size"),
        ({"max_length": 0}, "max_length"),
        ({"lora_rank": 0}, "rank"),
        ({"lora_dropout": 1.5}, "dropout"),
        ({"lora_targets": ()}, "target"),
        ({"precision": "fp8"}, "precision"),
        ({"user_rows": 0}, "user_rows"),
        ({"test_rows": -1}, "test_rows"),
        ({"defenses": ""}, "defenses"),
        ({"defenses": " , "}, "defenses"),
        ({"lora_targets": ""}, "target"),
    ],
)
def test_bad_values(layer: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        build_config(layer)


def test_bad_precision_lists_choices() -> None:
    with pytest.raises(UnknownNameError) as err:
        build_config({"precision": "fp8"})
    assert err.value.choices == ["auto", "bf16", "fp32"]
    assert "'fp8'" in str(err.value)


def test_option_tables_merge_key_by_key_across_layers(tmp_path: Path) -> None:
    """A flag adding one defense option keeps the file's other options of that defense (and its other defenses)."""
    path = write(tmp_path / "exp.toml", "[defense_options.w2s]\nalpha = 5.0\ngamma = 0.001\n"
                                        "[defense_options.psim]\nthreshold = 0.8\n[attack_options]\nwords = 'cf'\n")
    cfg = cli.config_from_args(run_args("--config", str(path), "--defense-option", "w2s.gamma=0.01",
                                        "--defense-option", "w2s.teacher_epochs=1", "--attack-option", "count=2"))
    assert cfg.defense_options == {"w2s": {"alpha": 5.0, "gamma": "0.01", "teacher_epochs": "1"},
                                   "psim": {"threshold": 0.8}}
    assert cfg.attack_options == {"words": "cf", "count": "2"}


def test_the_w2s_paper_preset_is_the_released_setting() -> None:
    """``--config w2s-paper``: the shipped preset, by name; the released script's budget and objective."""
    cfg = cli.config_from_args(run_args("--config", "w2s-paper"))
    assert (cfg.user_rows, cfg.user_epochs, cfg.user_batch_size, cfg.user_lr) == (6120, 5.0, 32, 2e-4)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.max_length, cfg.precision) == (
        512, 512.0, 0.1, 128, "auto")  # the released bf16 where the device has it natively
    assert cfg.defense_options["w2s"] == {"alpha": 5.0, "beta": 0.001, "gamma": 0.001, "temperature": 2.0,
                                          "alignment": "released", "reduce": "sum", "teacher_activation": "relu"}
    w2s = unbackdoor.plugins.get_plugin_manager().defense("w2s").configure(**cfg.defense_options["w2s"])
    assert w2s.loss.batch_term and w2s.loss.reduce == "sum"
    with pytest.raises(ConfigError, match=r"config file 'w2s-papers' does not exist \(presets: demo, w2s-paper\)"):
        read_config_file("w2s-papers")


@pytest.mark.parametrize("name", ["demo", "w2s-paper"])
def test_every_preset_is_a_valid_config_with_valid_defense_options(name: str) -> None:
    assert name in cli.presets()
    cfg = build_config(read_config_file(name))
    pm = unbackdoor.plugins.get_plugin_manager()
    for defense in cfg.defenses:
        pm.defense(defense).configure(**cfg.defense_options.get(defense, {}))
    assert set(cfg.defense_options) <= set(cfg.defenses)


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        build_config().seed = 1  # type: ignore[misc]


@pytest.mark.parametrize("name", ["missing.toml", "exp.ini", "exp.json"])
def test_bad_config_file_paths(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name != "missing.toml":
        write(path, "[experiment]\nseed = 1\n")
    with pytest.raises(ConfigError) as err:
        read_config_file(path)
    assert name in str(err.value)
    assert ("does not exist" if name == "missing.toml" else ".toml, .yaml or .yml") in str(err.value)


def test_config_dir_is_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match="does not exist"):
        read_config_file(tmp_path / "dir.toml")


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_config_file(write(tmp_path / "bad.toml", "seed = = 3\n"))


def test_invalid_yaml(tmp_path: Path) -> None:
    import yaml  # noqa: F401 - the yaml extra is installed by every nox session
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_config_file(write(tmp_path / "bad.yaml", "seed: [1, 2\n"))


# ----------------------------------------------------------------------------------------- the CLI's error path


@pytest.fixture
def fresh_pm(monkeypatch: pytest.MonkeyPatch) -> PluginManager:
    """A plugin manager loaded with a clean environment, used by the CLI."""
    pm = PluginManager()
    monkeypatch.setattr(unbackdoor.plugins, "_DEFAULT", pm)
    return pm


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--backend", "tensorflow"], ["unknown backend 'tensorflow'", "jax", "torch"]),
        (["--attack", "ripples"], ["unknown attack 'ripples'", "badnet", "insent"]),
        (["--defenses", "none,magic"], ["unknown defense 'magic'", "none", "w2s"]),
        (["--dataset", "no-such-dataset"], ["unknown dataset 'no-such-dataset'", "sst2", "agnews"]),
        (["--data-dir", "/nonexistent"], ["/nonexistent", "does not exist", "sst2"]),
        (["--attack-option", "colour=red"], ["colour", "valid options: count, positions, words"]),
        (["--defense-option", "w2s.beta=-1"], ["beta"]),
        (["--defense-option", "magic.beta=1"], ["magic"]),
        (["--poison-rate", "1.5"], ["poison rate", "1.5"]),
        (["--target", "7"], ["target", "7"]),
        (["--user-rows", "10000"], ["exceeds", "training rows"]),
        (["--lora-rank", "0"], ["rank"]),
        (["--user-epochs", "abc"], ["user_epochs", "'abc'"]),
        (["--config", "/nonexistent/exp.toml"], ["/nonexistent/exp.toml"]),
    ],
    ids=["backend", "attack", "defense", "dataset", "data-dir", "attack-option", "defense-value",
         "defense-option-name", "rate", "target", "rows", "lora-rank", "type", "config-file"],
)
def test_cli_user_errors_exit_2_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fresh_pm: PluginManager, argv: list[str], needles: list[str]
) -> None:
    out_dir, cache_dir = tmp_path / "out", tmp_path / "cache"
    rc = cli.main(["run", *argv, "--out", str(out_dir), "--cache-dir", str(cache_dir)])
    captured = capsys.readouterr()
    assert rc == 2
    err = captured.err.strip()
    assert err.startswith("unbackdoor: error: "), captured.err
    assert "\n" not in err, f"error is not one line:\n{captured.err}"
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert not (out_dir / "results.json").exists()
    assert not any(out_dir.rglob("*")) if out_dir.exists() else True
    assert not cache_dir.exists() or not any(cache_dir.rglob("*"))


def test_cli_bad_config_suffix_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "exp.ini", "seed = 1\n")
    assert cli.main(["run", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "must end in .toml, .yaml or .yml" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()


def test_cli_unknown_flag_is_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--no-such-flag", "1"])
    assert exc.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- help text
def test_every_config_field_is_in_one_help_group_with_help_text() -> None:
    from unbackdoor.config import FIELD_GROUPS
    from unbackdoor.fielddocs import attribute_docs

    grouped = [name for _, names in FIELD_GROUPS for name in names]
    assert sorted(grouped) == sorted(field_names())  # each field exactly once
    docs = attribute_docs(ExperimentConfig)
    assert all(len(docs.get(name, "")) > 10 for name in field_names()), set(field_names()) - set(docs)


def test_every_option_of_every_built_in_plugin_has_help_text() -> None:
    from unbackdoor.fielddocs import option_rows

    pm = unbackdoor.plugins.get_plugin_manager()
    found = {**pm.attacks(), **pm.defenses(), **pm.paraphrasers()}
    built_in = {name: reg for name, reg in found.items() if reg.package.startswith("unbackdoor")}
    assert {"badnet", "w2s", "psim+rga"} <= set(built_in)
    missing = [(name, option) for name, reg in built_in.items() for option, _, _, text in option_rows(reg.obj)
               if len(text) < 10]
    assert missing == []


def test_run_help_shows_groups_help_and_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for group in ("experiment:", "attacker (weight setting):", "user fine-tune:", "LoRA:", "evaluation:", "output:"):
        assert group in out
    assert "--backend BACKEND the training backend" in out and "Choose from: jax, torch." in out
    assert "Choose from: weight, data. (default: weight)" in out and "Choose from: fp32, bf16, auto." in out
    assert "Choose from: backtranslate, cube, cube+retrain, cube+rga, finetune, ga," in out  # --defenses: registered
    assert "``" not in out and "default: None" not in out


def test_list_options_prints_a_plugins_options_and_refuses_an_unknown_name(capsys) -> None:
    assert cli.main(["list", "--options", "w2s"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("w2s: W2SDefense") and "loss.alignment (str, default pooled)" in out
    assert "loss.gamma (float, default 0.2)" in out and "weight of the feature-alignment term. (also gamma)" in out
    assert cli.main(["list", "--options", "w2z"]) == 2
    assert "unknown plugin 'w2z'; choose one of: addsent, backtranslate, badnet," in capsys.readouterr().err
