"""What every backend must do the same way, run against the session's backend (``--backend``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from unbackdoor.errors import ConfigError
from unbackdoor.plugins import get_plugin_manager
from unbackdoor.specs import CrossEntropy, LoRASpec, TrainSpec, W2SLoss


def test_bad_inputs_are_clear(backend_name, tiny_dirs, sst2, tmp_path) -> None:
    backend = get_plugin_manager().backend(backend_name).create()
    rows = sst2.train.head(16)
    model = backend.load_classifier(tiny_dirs["llama"], 2)
    with pytest.raises(ValueError, match="teacher_logits"):
        backend.train(model, rows, W2SLoss(), TrainSpec())
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ConfigError, match="pickle"):
        backend.load_classifier(tmp_path / "pickled", 2)
    with pytest.raises(ConfigError, match=r"no config\.json"):
        backend.load_classifier(tmp_path, 2)
    with pytest.raises(ValueError, match="empty"):
        backend.train(model, rows.subset([]), CrossEntropy(), TrainSpec())
    with pytest.raises(ValueError, match="empty"):
        backend.predict(model, rows.subset([]))
    with pytest.raises(ConfigError, match=r"LoRA target_modules \['query'\] match no linear layer; choose from "
                                          r"\[.*'q_proj'.*\] or 'all-linear'"):
        backend.add_lora(model, LoRASpec(target_modules=("query",)))


def test_train_head_false_trains_the_adapter_only(backend_name, tiny_dirs, sst2, tmp_path) -> None:
    """TrainSpec.train_head=False: the head is saved unchanged while the LoRA adapter still learns."""
    backend = get_plugin_manager().backend(backend_name).create()
    rows = sst2.train.head(32)

    def trained_head(train_head: bool | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        model = backend.add_lora(backend.load_classifier(tiny_dirs["llama"], 2, seed=3), LoRASpec(rank=4), seed=3)
        if train_head is not None:
            backend.train(model, rows, CrossEntropy(), TrainSpec(epochs=2, lr=1e-2, batch_size=8, max_length=32,
                                                                  train_head=train_head))
        out = tmp_path / f"head-{train_head}"
        backend.save(model, out)
        return load_file(out / "head.safetensors"), backend.predict(model, rows, max_length=32).logits

    untrained, logits = trained_head(None)
    frozen, frozen_logits = trained_head(False)
    free, _ = trained_head(True)
    for key, value in untrained.items():
        np.testing.assert_array_equal(frozen[key], value, err_msg=key)
    assert not np.allclose(frozen_logits, logits, atol=1e-4)  # the adapter learned
    assert any(not np.allclose(free[k], v) for k, v in untrained.items())  # by default the head learns too


def _saved_dtypes(path) -> dict[str, str]:
    """``tensor name -> safetensors dtype code`` from a file's header (no tensor read)."""
    with open(path, "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_bf16_holds_frozen_weights_in_bf16(backend_name, tiny_dirs, sst2, tmp_path) -> None:
    """precision bf16: once LoRA freezes the base, its linear and embedding weights are held (and saved) in bf16
    while norms, the head and the merged layers stay float32; it computes what float32-held weights compute
    under bf16 matmuls (up to the embedding table's rounding), still learns, and reloads as it was saved."""
    rows, spec = sst2.train.head(32), TrainSpec(epochs=3, lr=1e-2, batch_size=8, max_length=32)
    kept, held = (get_plugin_manager().backend(backend_name).create() for _ in range(2))
    kept.precision, held.precision = "fp32", "bf16"
    lora = LoRASpec(rank=4, alpha=8)
    reference = kept.add_lora(kept.load_classifier(tiny_dirs["llama"], 2, seed=3), lora, seed=3)
    model = held.add_lora(held.load_classifier(tiny_dirs["llama"], 2, seed=3), lora, seed=3)
    kept.precision = "bf16"  # the same bf16 matmuls over float32-held weights
    np.testing.assert_allclose(held.predict(model, rows, max_length=32).logits,
                               kept.predict(reference, rows, max_length=32).logits, atol=1e-2)
    losses = held.train(model, rows, CrossEntropy(), spec).losses
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    expected = held.predict(model, rows, max_length=32).logits
    held.save(model, tmp_path / "saved")
    dtypes = _saved_dtypes(tmp_path / "saved" / "model.safetensors")
    merged = {k for k in dtypes if k.endswith(("q_proj.weight", "v_proj.weight"))}
    bf16 = {k for k in dtypes if k.endswith(("proj.weight", "embed_tokens.weight")) and k not in merged}
    assert merged and bf16 and {dtypes[k] for k in merged} == {"F32"} and {dtypes[k] for k in bf16} == {"BF16"}
    assert {dtypes[k] for k in dtypes.keys() - merged - bf16} == {"F32"}  # norms
    assert set(_saved_dtypes(tmp_path / "saved" / "head.safetensors").values()) == {"F32"}
    reloaded = held.load_classifier(tmp_path / "saved", 2, seed=9)
    np.testing.assert_allclose(held.predict(reloaded, rows, max_length=32).logits, expected, atol=5e-2)


def test_gradient_checkpointing_changes_no_number(backend_name, tiny_dirs, sst2) -> None:
    """Recomputing the layers in the backward pass gives the same losses and weights (LoRA with dropout,
    whose masks must be drawn again the same, and a full fine-tune)."""
    rows, spec = sst2.train.head(16), TrainSpec(epochs=2, lr=1e-2, batch_size=8, max_length=32)
    backend = get_plugin_manager().backend(backend_name).create()

    def run(checkpointing: bool, adapter: bool) -> tuple[tuple[float, ...], np.ndarray]:
        backend.gradient_checkpointing = checkpointing
        model = backend.load_classifier(tiny_dirs["llama"], 2, seed=2)
        if adapter:
            model = backend.add_lora(model, LoRASpec(rank=4, dropout=0.1), seed=2)
        losses = backend.train(model, rows, CrossEntropy(), spec).losses
        return losses, backend.predict(model, rows, max_length=32).logits

    for adapter in (True, False):
        (plain, plain_logits), (recomputed, logits) = run(False, adapter), run(True, adapter)
        np.testing.assert_allclose(recomputed, plain, rtol=1e-5)
        np.testing.assert_allclose(logits, plain_logits, atol=1e-5)


#: the optional capabilities each built-in backend implements (``unbackdoor.backend``'s protocols)
CAPABILITIES = {"torch": {"DeviceBackend", "PrecisionBackend", "AutoPrecisionBackend", "CheckpointingBackend",
                          "AnchorBackend", "TriggerBackend", "TriggerCacheBackend", "LossGradBackend"},
                "jax": {"DeviceBackend", "PrecisionBackend", "AutoPrecisionBackend", "CheckpointingBackend",
                        "AnchorBackend", "TriggerBackend", "TriggerCacheBackend", "LossGradBackend",
                        "AdapterExportBackend"}}


def test_capabilities_are_protocols_the_backend_implements_and_the_docs_list(backend_name) -> None:
    import inspect
    from pathlib import Path
    from types import SimpleNamespace

    from unbackdoor import backend as contract
    from unbackdoor.config import ExperimentConfig
    from unbackdoor.runner import set_runtime

    protocols = {name: cls for name, cls in vars(contract).items() if inspect.isclass(cls)
                 and getattr(cls, "_is_runtime_protocol", False) and cls.__module__ == contract.__name__
                 and name != "Backend"}
    engine = get_plugin_manager().backend(backend_name).create()
    assert isinstance(engine, contract.Backend)
    assert {name for name, cls in protocols.items() if isinstance(engine, cls)} == CAPABILITIES[backend_name]
    docs = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    assert all(f"| `{name}` |" in docs for name in protocols), "docs/plugins.md lists every capability protocol"
    set_runtime(engine, ExperimentConfig(precision="bf16", gradient_checkpointing=True))
    assert (engine.precision, engine.gradient_checkpointing) == ("bf16", True)
    bare = SimpleNamespace()
    set_runtime(bare, ExperimentConfig(precision="bf16"))  # a backend without the knobs is left alone
    assert vars(bare) == {} and not isinstance(bare, contract.AnchorBackend)


def test_precision_auto_resolves_to_the_backends_choice_before_any_stage(backend_name) -> None:
    from types import SimpleNamespace

    from unbackdoor.config import ExperimentConfig
    from unbackdoor.runner import resolve_precision

    engine = get_plugin_manager().backend(backend_name).create()
    native = engine.native_bf16()
    assert isinstance(native, bool) and engine.auto_precision() == ("bf16" if native else "fp32")
    said: list[str] = []
    resolved = resolve_precision(ExperimentConfig(precision="auto"), engine, said.append)
    assert resolved.precision == engine.auto_precision() and said == [f"precision auto: {resolved.precision} on this "
                                                                      "device"]
    said.clear()
    resolve_precision(ExperimentConfig(precision="bf16"), engine, said.append)
    assert bool(said) == (not native)  # a note only where bf16 is emulated
    assert said == [] or "without native bf16 matmuls" in said[0]
    plain = SimpleNamespace(name="plain")  # a backend that cannot say: auto means fp32, silently for bf16
    assert resolve_precision(ExperimentConfig(precision="auto"), plain, said.append).precision == "fp32"
    with pytest.raises(ConfigError, match=r"unknown precision 'fp16'; choose one of: auto, bf16, fp32"):
        ExperimentConfig(precision="fp16").validate()
