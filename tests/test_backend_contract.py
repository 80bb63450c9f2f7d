"""What every backend must do the same way, run against the session's backend (``--backend``)."""

from __future__ import annotations

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
