"""Security: safetensors only (pickles refused, never unpickled), no remote code, no writes outside out/cache."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from unbackdoor.cache import StageCache, atomic_write_json
from unbackdoor.errors import ConfigError
from unbackdoor.models import check_model_dir
from unbackdoor.plugins import get_plugin_manager
from unbackdoor.runner import write_results

PACKAGES = Path(__file__).resolve().parents[1] / "packages"


class _Trap:
    """Unpickling this touches a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _backend(name: str):
    return get_plugin_manager().backend(name).create()


def test_pickle_only_model_dir_is_refused(tmp_path, backend_name) -> None:
    marker = tmp_path / "unpickled"
    model = tmp_path / "pickle-only"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(ConfigError, match=r"no \.safetensors weights.*pytorch_model\.bin.*refused"):
        check_model_dir(model)
    with pytest.raises(ConfigError, match="refused"):
        _backend(backend_name).load_classifier(model, 2)
    assert not marker.exists()


def test_pickle_beside_safetensors_is_never_read(tmp_path, tiny_dirs, backend_name) -> None:
    """A trapped pytorch_model.bin next to good safetensors: the model loads, the pickle stays unopened."""
    marker = tmp_path / "unpickled"
    model = tmp_path / "both"
    shutil.copytree(tiny_dirs["llama"], model)
    for name in ("pytorch_model.bin", "training_args.bin", "head.pt"):
        (model / name).write_bytes(pickle.dumps(_Trap(marker)))
    backend = _backend(backend_name)
    loaded = backend.load_classifier(model, 2)
    backend.save(loaded, tmp_path / "saved")
    assert not marker.exists()
    assert not any(p.suffix in {".bin", ".pt", ".pth", ".pkl"} for p in (tmp_path / "saved").iterdir())


def test_remote_code_never_runs(tmp_path, tiny_dirs, backend_name) -> None:
    """A config whose auto_map points at a Python file in the model dir: loading never imports that file."""
    marker = tmp_path / "remote-code-ran"
    model = tmp_path / "remote"
    shutil.copytree(tiny_dirs["llama"], model)
    (model / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    backend = _backend(backend_name)
    backend.load_classifier(model, 2)
    assert not marker.exists()


def test_no_trust_remote_code_or_unpickling_in_the_source() -> None:
    """Neither trust_remote_code=True, torch.load, pickle nor numpy's allow_pickle appear in our code."""
    bad = ("trust_remote_code=True", "torch.load(", "pickle.load", "allow_pickle=True", "use_safetensors=False")
    found = [f"{path.relative_to(PACKAGES)}: {needle}" for path in PACKAGES.rglob("*.py")
             for needle in bad if needle in path.read_text(encoding="utf-8")]
    assert not found, found


@pytest.mark.parametrize("stage", ["..", ".", "../outside", "a/b", "/abs", "", "x\0y", "a\\..", 5])
def test_cache_stage_names_cannot_leave_the_cache(tmp_path, stage) -> None:
    cache = StageCache(tmp_path / "cache")
    with pytest.raises(ConfigError, match="stage name"):
        cache.get_or_build(stage, {"k": 1}, lambda tmp: (tmp / "f").write_text("x"))  # type: ignore[arg-type]
    assert not (tmp_path / "outside").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["cache"])


def test_symlinked_stage_dir_pointing_outside_is_refused(tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "cache").mkdir()
    os.symlink(outside, tmp_path / "cache" / "victim")
    cache = StageCache(tmp_path / "cache")
    with pytest.raises(ConfigError, match="outside"):
        cache.get_or_build("victim", {"k": 1}, lambda tmp: (tmp / "f").write_text("x"))
    assert not any(outside.iterdir())


def test_results_symlink_is_replaced_not_followed(tmp_path) -> None:
    """A results.json planted as a symlink to a file elsewhere: writing replaces the link, the target is intact."""
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(target, out / "results.json")
    write_results(out, {"config": {}, "rows": [{"stage": "s", "defense": "d", "CA": 1.0, "ASR": 2.0}]})
    assert target.read_text() == "keep me"
    assert not (out / "results.json").is_symlink()
    assert json.loads((out / "results.json").read_text())["rows"][0]["CA"] == 1.0


def test_atomic_write_leaves_no_temp_file_on_failure(tmp_path) -> None:
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "x.json", _Unserialisable())
    assert list(tmp_path.iterdir()) == []


class _Unserialisable:
    def __repr__(self) -> str:
        raise TypeError("cannot serialise")
