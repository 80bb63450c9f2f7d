"""Fuzz-style bad inputs to the CLI and the Python API: each gives ONE clear line and writes nothing.

Every case runs ``unbackdoor run`` (or the API) with the backend under test and one bad input: unknown
names, wrong types, empty and huge values, non-UTF-8 files, malformed TSV rows, config files with unknown
keys or the wrong shape, broken model directories (no weights, pickle only, bad JSON, garbage
safetensors, no tokenizer), output paths that are files. A seeded random section adds junk values for
every name and number option. The last test prints how many inputs were tried.
"""

from __future__ import annotations

import random
import shutil
import string
from pathlib import Path

import pytest

from unbackdoor import cli
from unbackdoor.backend import BACKEND_ENV
from unbackdoor.config import ExperimentConfig
from unbackdoor.data import load_dataset
from unbackdoor.errors import UnbackdoorError
from unbackdoor.models import resolve_model
from unbackdoor.plugins import DISABLE_ENV, get_plugin_manager
from unbackdoor.runner import resume_experiment, run_experiment

TRIED = {"cli": 0, "api": 0}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub-looking name must fail fast, not wait on the network


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path]) -> Path:
    """A folder of broken inputs: config files, datasets and model directories."""
    root = tmp_path_factory.mktemp("bad")
    files = {
        "nonutf8.toml": b"seed = 1\n# caf\xe9 \xff\n", "unknown.toml": "epochs = 3\n",
        "nested.toml": "[attack_options]\ncolour = 'red'\n", "experiment.toml": "experiment = 5\n",
        "defopt.toml": "defenses = ['w2s']\n[defense_options]\nw2s = 5\n", "list.yaml": "- 1\n- 2\n",
        "wrongtype.yaml": "seed: [1, 2]\n", "unknown.yaml": "experiment:\n  colour: red\n",
        "badsyntax.toml": "seed = = 1\n", "file.txt": "not a directory\n", "empty.txt": "",
        "nonutf8/train.tsv": b"sentence\tlabel\nbad \xff\xfe byte\t1\n",
        "nolabel/train.tsv": "sentence\tlabel\ngood movie\t\n", "notab/train.tsv": "sentence\tlabel\ngood movie 1\n",
        "wordlabel/train.tsv": "sentence\tlabel\ngood movie\tpositive\n",
        "neglabel/train.tsv": "sentence\tlabel\ngood movie\t-1\n", "header-only/train.tsv": "sentence\tlabel\n",
        "nosplits/readme.md": "no tsv here\n",
        "model-noweights/config.json": '{"model_type": "llama"}', "model-noconfig/model.safetensors": b"",
        "model-pickle/config.json": '{"model_type": "llama"}', "model-pickle/pytorch_model.bin": b"\x80\x02}q\x00.",
        "model-badjson/config.json": "{not json", "model-jsonlist/config.json": "[1, 2]",
        "model-garbage/config.json": '{"model_type": "llama"}', "model-garbage/model.safetensors": b"\x00garbage",
    }
    for name, data in files.items():
        _write(root / name, data)
    for name in ("model-badjson", "model-jsonlist"):
        shutil.copy(tiny_dirs["llama"] / "model.safetensors", root / name / "model.safetensors")
    for name, broken in (("model-notok", None), ("model-badtok", "{broken")):
        shutil.copytree(tiny_dirs["llama"], root / name)
        (root / name / "tokenizer.json").unlink()
        if broken:
            _write(root / name / "tokenizer.json", broken)
    return root


# (id, argv with {bad}/{tmp}/{bert} placeholders, substrings the one-line error must contain)
CLI_CASES = [
    # unknown names
    ("backend", ["--backend", "tensorflow"], ["unknown backend 'tensorflow'", "torch"]),
    ("attack", ["--attack", "ripples"], ["unknown attack 'ripples'", "badnet"]),
    ("defense", ["--defenses", "none,magic"], ["unknown defense 'magic'", "w2s"]),
    ("dataset", ["--dataset", "no-such-dataset"], ["unknown dataset 'no-such-dataset'", "sst2"]),
    ("model-name", ["--model", "no-such-model"], ["unknown model 'no-such-model'", "smollm2-135m"]),
    ("teacher-name", ["--teacher", "a/b/c"], ["unknown model 'a/b/c'", "minilm-l6"]),
    ("hub-offline", ["--model", "nobody/nothing"], ["'nobody/nothing'", "hub"]),
    ("precision", ["--precision", "fp8"], ["unknown precision 'fp8'", "bf16"]),
    ("attack-option", ["--attack-option", "colour=red"], ["colour", "valid options"]),
    ("defense-option-name", ["--defense-option", "magic.x=1"], ["magic"]),
    ("defense-option-key", ["--defenses", "w2s", "--defense-option", "w2s.nope=1"], ["'nope'", "valid options"]),
    ("encoding", ["--encoding", "no-such-codec"], ["encoding 'no-such-codec'", "utf-8"]),
    # wrong types
    ("seed-type", ["--seed", "x"], ["'seed'", "'x'"]),
    ("rows-float", ["--user-rows", "1.5"], ["'user_rows'", "'1.5'"]),
    ("bool", ["--clean-label", "maybe"], ["'clean_label'", "'maybe'"]),
    ("lr-type", ["--user-lr", "abc"], ["'user_lr'", "'abc'"]),
    ("defense-value", ["--defenses", "w2s", "--defense-option", "w2s.beta=abc"], ["beta", "'abc'"]),
    ("attack-value", ["--attack-option", "count=many"], ["count", "'many'"]),
    ("option-shape", ["--attack-option", "=cf"], ["KEY=VALUE"]),
    ("yaml-wrong-type", ["--config", "{bad}/wrongtype.yaml"], ["'seed'", "[1, 2]"]),
    ("toml-not-table", ["--config", "{bad}/experiment.toml"], ["experiment.toml", "table"]),
    ("yaml-list", ["--config", "{bad}/list.yaml"], ["list.yaml", "table"]),
    ("defense-options-not-table", ["--config", "{bad}/defopt.toml"], ["'w2s'", "table"]),
    # empty
    ("defenses-empty", ["--defenses", ""], ["defenses is empty"]),
    ("dataset-empty", ["--dataset", ""], ["unknown dataset ''"]),
    ("model-empty", ["--model", ""], ["model is empty"]),
    ("out-empty", ["--out", ""], ["output directory (out) is empty"]),
    ("cache-empty", ["--cache-dir", " "], ["cache directory (cache_dir) is empty"]),
    ("targets-empty", ["--lora-targets", ""], ["target"]),
    ("tsv-header-only", ["--dataset", "{bad}/header-only"], ["exceeds the 0 training rows"]),
    ("txt-empty", ["--dataset", "{bad}/empty.txt"], ["exceeds the 0 training rows"]),
    ("no-splits", ["--dataset", "{bad}/nosplits"], ["none of train.tsv"]),
    # huge
    ("seed-huge", ["--seed", str(10**30)], ["seed", str(10**30)]),
    ("seed-negative", ["--seed", "-1"], ["seed", "-1"]),
    ("rows-huge", ["--user-rows", str(10**30)], ["exceeds", "training rows"]),
    ("lr-inf", ["--user-lr", "1e400"], ["learning rate", "inf"]),
    ("epochs-inf", ["--attacker-epochs", "1e400"], ["epochs", "inf"]),
    ("rate-huge", ["--poison-rate", "1e308"], ["poison rate"]),
    ("dataset-long", ["--dataset", "x" * 5000], ["name too long"]),
    ("model-long", ["--model", "m" * 5000], ["name too long"]),
    ("model-nul", ["--model", "a\0b"], ["NUL"]),
    ("dataset-nul", ["--dataset", "a\0b"], ["NUL"]),
    ("data-dir-nul", ["--data-dir", "x\0y"], ["NUL"]),
    # non-UTF-8 files, malformed TSV
    ("config-nonutf8", ["--config", "{bad}/nonutf8.toml"], ["nonutf8.toml", "not UTF-8", "0xe9"]),
    ("config-syntax", ["--config", "{bad}/badsyntax.toml"], ["not valid TOML"]),
    ("tsv-nonutf8", ["--dataset", "{bad}/nonutf8"], ["cannot decode", "utf-8", "--encoding"]),
    ("tsv-no-label", ["--dataset", "{bad}/nolabel"], ["train.tsv:2", "label '' is not an integer"]),
    ("tsv-no-tab", ["--dataset", "{bad}/notab"], ["train.tsv:2", "no tab"]),
    ("tsv-word-label", ["--dataset", "{bad}/wordlabel"], ["label 'positive' is not an integer"]),
    ("tsv-negative-label", ["--dataset", "{bad}/neglabel"], ["label -1 is negative"]),
    ("data-dir-file", ["--data-dir", "{bad}/file.txt"], ["is not a directory"]),
    # config files with unknown keys
    ("toml-unknown", ["--config", "{bad}/unknown.toml"], ["'epochs'", "valid options"]),
    ("toml-nested-unknown", ["--config", "{bad}/nested.toml"], ["colour", "valid options"]),
    ("yaml-unknown", ["--config", "{bad}/unknown.yaml"], ["'colour'", "valid options"]),
    # model directories
    ("model-noweights", ["--model", "{bad}/model-noweights"], ["no .safetensors weights"]),
    ("model-pickle", ["--model", "{bad}/model-pickle"], ["pytorch_model.bin", "refused"]),
    ("teacher-pickle", ["--teacher", "{bad}/model-pickle"], ["pytorch_model.bin", "refused"]),
    ("model-noconfig", ["--model", "{bad}/model-noconfig"], ["no config.json"]),
    ("model-badjson", ["--model", "{bad}/model-badjson"], ["config.json", "not valid JSON"]),
    ("model-jsonlist", ["--model", "{bad}/model-jsonlist"], ["JSON object", "list"]),
    ("model-garbage", ["--model", "{bad}/model-garbage"], ["model.safetensors", "not a readable safetensors"]),
    ("model-notok", ["--model", "{bad}/model-notok"], ["no tokenizer.json"]),
    ("model-badtok", ["--model", "{bad}/model-badtok"], ["cannot read the tokenizer"]),
    ("model-file", ["--model", "{bad}/file.txt"], ["no config.json"]),
    # LoRA targets that name no linear layer of the student (checked before any training)
    ("lora-targets", ["--lora-targets", "qkv"], ["model: lora_targets (--lora-targets) ['qkv'] match no linear layer",
                                                  "'q_proj'", "'all-linear'"]),
    ("lora-targets-bert", ["--model", "{bert}", "--lora-targets", "q_proj,v_proj"],
     ["lora_targets (--lora-targets) ['q_proj', 'v_proj']", "'query'"]),
    # where the run writes
    ("out-file", ["--out", "{bad}/file.txt"], ["file.txt", "not a directory"]),
    ("cache-file", ["--cache-dir", "{bad}/file.txt"], ["file.txt", "not a directory"]),
    ("out-is-cache", ["--out", "{tmp}/same", "--cache-dir", "{tmp}/same"], ["same directory"]),
    ("resume-nothing", ["--resume"], ["nothing to resume", "run.json"]),
]


def _base(tiny_dirs: dict[str, Path], tmp: Path, backend: str) -> list[str]:
    return ["--backend", backend, "--model", str(tiny_dirs["llama"]), "--teacher", str(tiny_dirs["bert"]),
            "--user-rows", "16", "--attacker-rows", "16", "--test-rows", "8", "--defenses", "none,w2s",
            "--out", str(tmp / "out"), "--cache-dir", str(tmp / "cache")]


def _check_cli(argv: list[str], needles: list[str], tmp: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI; assert exit 2, one line naming ``needles``, no traceback, nothing written."""
    TRIED["cli"] += 1
    rc = cli.main(["run", *argv])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, f"exit {rc} for {argv!r}:\n{captured.err[-2000:]}"
    assert err.startswith("unbackdoor: error: ") and "\n" not in err, f"not one line:\n{captured.err[-2000:]}"
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    for folder in (tmp / "out", tmp / "cache", tmp / "same"):
        assert not folder.exists() or not any(folder.rglob("*")), f"{folder} written: {list(folder.rglob('*'))}"
    return err


@pytest.mark.parametrize(("argv", "needles"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(argv, needles, bad, tiny_dirs, tmp_path, backend_name, capsys) -> None:
    subs = {"{bad}": str(bad), "{tmp}": str(tmp_path), "{bert}": str(tiny_dirs["bert"])}
    argv = [_sub(a, subs) for a in argv]
    needles = [_sub(n, subs) for n in needles]
    _check_cli(_base(tiny_dirs, tmp_path, backend_name) + argv, needles, tmp_path, capsys)
    assert (bad / "file.txt").read_text() == "not a directory\n"


def _sub(text: str, subs: dict[str, str]) -> str:
    for key, value in subs.items():
        text = text.replace(key, value)
    return text


def _junk(rng: random.Random) -> str:
    """A random string no option accepts: letters, punctuation, a bell, a non-ASCII letter."""
    alphabet = string.ascii_letters + string.punctuation.replace("/", "").replace(",", "") + "é\u4e2d\x07"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) + "\x07z"


RANDOM_FLAGS = ["--backend", "--attack", "--dataset", "--model", "--teacher", "--precision", "--encoding",
                "--defenses", "--seed", "--user-rows", "--attacker-rows", "--test-rows", "--user-lr", "--attacker-lr",
                "--user-epochs", "--lora-rank", "--lora-alpha", "--poison-rate", "--target", "--max-length",
                "--user-batch-size", "--clean-label", "--lora-dropout", "--clean-baseline"]


def test_cli_random_junk(bad, tiny_dirs, tmp_path, backend_name, capsys) -> None:
    """Seeded junk for every name and number flag: always exit 2 with one line naming the bad value."""
    rng = random.Random(9)
    for flag in RANDOM_FLAGS:
        value = _junk(rng)
        _check_cli([*_base(tiny_dirs, tmp_path, backend_name), flag, value], [repr(value)], tmp_path, capsys)


def _api_kwargs(tiny_dirs: dict[str, Path], tmp: Path, backend: str) -> dict[str, object]:
    return dict(backend=backend, model=str(tiny_dirs["llama"]), teacher=str(tiny_dirs["bert"]), user_rows=16,
                attacker_rows=16, test_rows=8, defenses=("none",), out=str(tmp / "out"), cache_dir=str(tmp / "cache"))


API_CASES = [
    ("seed-str", {"seed": "x"}, ["'seed'", "'x'"]),
    ("seed-negative", {"seed": -5}, ["seed", "-5"]),
    ("rows-none", {"user_rows": None}, ["'user_rows'", "None"]),
    ("rows-list", {"user_rows": [1]}, ["'user_rows'", "[1]"]),
    ("backend-int", {"backend": 5}, ["'backend'", "5"]),
    ("data-dir-int", {"data_dir": 5}, ["'data_dir'", "5"]),
    ("attack-options-int", {"attack_options": 5}, ["attack_options", "5"]),
    ("defense-options-value", {"defense_options": {"none": 5}}, ["'none'", "table"]),
    ("defenses-unknown", {"defenses": ("none", "magic")}, ["unknown defense 'magic'"]),
    ("model-none", {"model": None}, ["'model'", "None"]),
    ("dataset-bytes", {"dataset": b"sst2"}, ["dataset", "b'sst2'"]),
    ("lora-targets-int", {"lora_targets": 5}, ["lora_targets", "5"]),
    ("model-pickle", {"model": "{bad}/model-pickle"}, ["refused"]),
    ("model-path-object", {"model": Path("{bad}/model-noweights")}, ["no .safetensors weights"]),
    ("out-file", {"out": "{bad}/file.txt"}, ["not a directory"]),
]


@pytest.mark.parametrize(("overrides", "needles"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input(overrides, needles, bad, tiny_dirs, tmp_path, backend_name) -> None:
    TRIED["api"] += 1
    subs = {"{bad}": str(bad)}
    overrides = {k: type(v)(_sub(str(v), subs)) if isinstance(v, str | Path) else v for k, v in overrides.items()}
    cfg = ExperimentConfig(**{**_api_kwargs(tiny_dirs, tmp_path, backend_name), **overrides})
    with pytest.raises(UnbackdoorError) as err:
        run_experiment(cfg, log=lambda _: None)
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_api_loaders_bad_input(bad, tmp_path) -> None:
    """The loaders users call directly: each bad input is one UnbackdoorError line."""
    calls = [
        lambda: load_dataset(str(bad / "nonutf8")),
        lambda: load_dataset(str(bad / "nolabel")),
        lambda: load_dataset("sst2", encoding="no-such-codec"),
        lambda: load_dataset("x" * 5000),
        lambda: resolve_model(str(bad / "model-pickle")),
        lambda: resolve_model(str(bad / "model-garbage")),
        lambda: resolve_model("a\0b"),
        lambda: get_plugin_manager().defense("magic"),
        lambda: get_plugin_manager().attack(""),
        lambda: resume_experiment(tmp_path / "never-ran"),
    ]
    for call in calls:
        TRIED["api"] += 1
        with pytest.raises(UnbackdoorError) as err:
            call()
        assert "\n" not in str(err.value) and str(err.value)


def test_zz_count_tried() -> None:
    """Runs last: how many bad inputs the module tried (shown by ``pytest -s`` or ``-rA``)."""
    total = TRIED["cli"] + TRIED["api"]
    print(f"\nfuzz: tried {total} bad inputs ({TRIED['cli']} through the CLI, {TRIED['api']} through the API); "
          "each gave one clear line and wrote nothing")
    assert total >= len(CLI_CASES) + len(RANDOM_FLAGS) + len(API_CASES)
