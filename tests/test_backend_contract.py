"""What every backend must do the same way, run against the session's backend (``--backend``)."""

from __future__ import annotations

import pytest

from unbackdoor.errors import ConfigError
from unbackdoor.plugins import get_plugin_manager
from unbackdoor.specs import CrossEntropy, TrainSpec, W2SLoss


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
