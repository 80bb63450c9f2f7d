"""The torch backend on tiny random models: pooling, LoRA, saving, the fused W2S step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unbackdoor import losses as ref
from unbackdoor.data import TextDataset
from unbackdoor.errors import ConfigError
from unbackdoor.specs import CrossEntropy, LoRASpec, TrainSpec, W2SLoss
from unbackdoor_torch.backend import TorchBackend


@pytest.fixture(scope="module")
def backend() -> TorchBackend:
    return TorchBackend("cpu")


@pytest.fixture(scope="module")
def rows(sst2) -> TextDataset:
    return sst2.train.head(24)


def test_last_token_pooling_ignores_padding(backend, tiny_dirs, rows) -> None:
    model = backend.load_classifier(tiny_dirs["llama"], 2, seed=1)
    together = backend.predict(model, rows, batch_size=24, hidden=True)
    alone = [backend.predict(model, rows.subset([i]), batch_size=1, hidden=True) for i in range(4)]
    np.testing.assert_allclose(together.logits[:4], np.concatenate([a.logits for a in alone]), atol=1e-5)
    np.testing.assert_allclose(together.hidden[:4], np.concatenate([a.hidden for a in alone]), atol=1e-5)
    assert together.hidden.shape == (24, 32)


def test_teacher_projection_sets_hidden_width(backend, tiny_dirs, rows) -> None:
    teacher = backend.load_classifier(tiny_dirs["bert"], 2, projection_dim=32, seed=0)
    assert backend.hidden_size(teacher) == 32
    assert backend.predict(teacher, rows, hidden=True).hidden.shape == (24, 32)


def test_lora_trains_only_adapter_and_head(backend, tiny_dirs, rows) -> None:
    model = backend.add_lora(backend.load_classifier(tiny_dirs["llama"], 2), LoRASpec(rank=4, alpha=8))
    trainable = {n for n, p in model.module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("classifier.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    backend.train(model, rows, CrossEntropy(), TrainSpec(epochs=1, lr=1e-2, batch_size=8))
    after = dict(model.module.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable


def test_save_merges_lora_and_reloads_identically(backend, tiny_dirs, rows, tmp_path) -> None:
    model = backend.add_lora(backend.load_classifier(tiny_dirs["llama"], 2), LoRASpec(rank=4, alpha=8))
    backend.train(model, rows, CrossEntropy(), TrainSpec(epochs=1, lr=1e-2, batch_size=8))
    expected = backend.predict(model, rows).logits
    backend.save(model, tmp_path / "saved")
    reloaded = backend.load_classifier(tmp_path / "saved", 2, seed=99)  # the seed must not matter now
    np.testing.assert_allclose(backend.predict(reloaded, rows).logits, expected, atol=1e-5)


def test_w2s_step_loss_equals_numpy_reference(backend, tiny_dirs, rows) -> None:
    """The first fused step's loss is the reference loss on the model's own outputs."""
    student = backend.add_lora(backend.load_classifier(tiny_dirs["llama"], 2, seed=3), LoRASpec(rank=4))
    teacher = backend.load_classifier(tiny_dirs["bert"], 2, projection_dim=32, seed=4)
    t = backend.predict(teacher, rows, hidden=True)
    s = backend.predict(student, rows, hidden=True)
    spec = W2SLoss(1.0, 0.5, 2.0, 2.0)
    aux = {"teacher_logits": t.logits, "teacher_hidden": t.hidden}
    expected = ref.reference_loss(spec, {"logits": s.logits, "hidden": s.hidden}, {"labels": rows.labels, **aux})
    stats = backend.train(student, rows, spec, TrainSpec(epochs=1, lr=1e-3, batch_size=len(rows)), aux)
    assert stats.steps == 1 and stats.samples == len(rows)
    assert stats.losses[0] == pytest.approx(expected, rel=1e-5)


def test_training_reduces_loss_and_is_deterministic(backend, tiny_dirs, rows) -> None:
    spec = TrainSpec(epochs=4, lr=5e-3, batch_size=8, seed=5)

    def run() -> tuple[float, ...]:
        model = backend.add_lora(backend.load_classifier(tiny_dirs["llama"], 2, seed=5), LoRASpec(rank=4), seed=5)
        return backend.train(model, rows, CrossEntropy(), spec).losses

    first, second = run(), run()
    assert first == second
    assert np.mean(first[-3:]) < np.mean(first[:3])


def test_bf16_autocast_runs_close_to_fp32(backend, tiny_dirs, rows) -> None:
    model = backend.load_classifier(tiny_dirs["llama"], 2, seed=1)
    fp32 = backend.predict(model, rows).logits
    bf16 = TorchBackend("cpu", precision="bf16")
    np.testing.assert_allclose(bf16.predict(model, rows).logits, fp32, atol=5e-2)
    assert np.isfinite(bf16.train(model, rows, CrossEntropy(), TrainSpec(epochs=1, lr=1e-3, batch_size=8)).final_loss)
    with pytest.raises(ConfigError, match=r"precision 'fp8'; choose one of: bf16, fp32"):
        TorchBackend("cpu", precision="fp8")


def test_bf16_held_weights_change_no_product(backend, tiny_dirs, rows) -> None:
    """Held in bf16, the frozen linear weights give exactly what autocast computes from float32 ones (it casts
    them to bf16 per matmul); only embedding tables round, and with those pre-rounded the logits are equal.
    Trainable parameters stay float32; run in fp32 the model is refused by name."""
    held = TorchBackend("cpu")
    held.precision = "bf16"
    model = held.add_lora(held.load_classifier(tiny_dirs["llama"], 2, seed=1), LoRASpec(rank=4), seed=1)
    reference = backend.add_lora(backend.load_classifier(tiny_dirs["llama"], 2, seed=1), LoRASpec(rank=4), seed=1)
    with torch.no_grad():
        for module in reference.module.modules():
            if isinstance(module, torch.nn.Embedding):
                module.weight.copy_(module.weight.bfloat16().float())
    dtypes = {n: p.dtype for n, p in model.module.named_parameters()}
    assert {d for n, d in dtypes.items() if model.module.get_parameter(n).requires_grad} == {torch.float32}
    assert {d for n, d in dtypes.items() if n.endswith(("embed_tokens.weight", "base_layer.weight"))} == {torch.bfloat16}
    np.testing.assert_array_equal(held.predict(model, rows).logits, held.predict(reference, rows).logits)
    with pytest.raises(ConfigError, match=r"holds its frozen weights in bfloat16.*precision 'bf16', not 'fp32'"):
        backend.predict(model, rows)
