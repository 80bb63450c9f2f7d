"""The jax backend on tiny random models: pooling, LoRA, saving, the fused W2S step, lazy imports."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from unbackdoor import losses as ref
from unbackdoor.data import TextDataset
from unbackdoor.errors import ConfigError
from unbackdoor.specs import CrossEntropy, LabelResetLoss, LoRASpec, PromptSpec, TrainSpec, W2SLoss
from unbackdoor_jax.backend import JaxBackend
from unbackdoor_jax.train import trainable_filter

# Tests share one LoRA layout, row count and length cap so they share compiled steps (compiling dominates here).
LORA = LoRASpec(rank=4, alpha=8)
MAX_LENGTH = 32


def _spec(**kw) -> TrainSpec:
    return TrainSpec(**{"epochs": 1, "lr": 1e-2, "batch_size": 8, "max_length": MAX_LENGTH, **kw})


@pytest.fixture(scope="module")
def backend() -> JaxBackend:
    return JaxBackend()


@pytest.fixture(scope="module")
def rows(sst2) -> TextDataset:
    return sst2.train.head(24)


def _params(model) -> dict[tuple, np.ndarray]:
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model.module, nnx.Param))}


def test_last_token_pooling_ignores_padding(backend, tiny_dirs, rows) -> None:
    model = backend.load_classifier(tiny_dirs["llama"], 2, seed=1)
    together = backend.predict(model, rows, batch_size=24, max_length=MAX_LENGTH, hidden=True)
    alone = [backend.predict(model, rows.subset([i]), batch_size=1, max_length=MAX_LENGTH, hidden=True)
             for i in range(4)]
    np.testing.assert_allclose(together.logits[:4], np.concatenate([a.logits for a in alone]), atol=1e-5)
    np.testing.assert_allclose(together.hidden[:4], np.concatenate([a.hidden for a in alone]), atol=1e-5)
    assert together.hidden.shape == (24, 32)


def test_partial_last_batch_matches_full_batch(backend, tiny_dirs, rows) -> None:
    """Zero-weight filler rows (one compiled shape per length bucket) never leak into real rows."""
    model = backend.load_classifier(tiny_dirs["llama"], 2, seed=1)
    full = backend.predict(model, rows, batch_size=24, max_length=MAX_LENGTH, hidden=True)
    ragged = backend.predict(model, rows, batch_size=10, max_length=MAX_LENGTH, hidden=True)  # 10, 10, 4 rows
    np.testing.assert_allclose(ragged.logits, full.logits, atol=1e-5)
    np.testing.assert_allclose(ragged.hidden, full.hidden, atol=1e-5)


def test_teacher_projection_sets_hidden_width(backend, tiny_dirs, rows) -> None:
    teacher = backend.load_classifier(tiny_dirs["bert"], 2, projection_dim=32, seed=0)
    assert backend.hidden_size(teacher) == 32
    assert backend.predict(teacher, rows, max_length=MAX_LENGTH, hidden=True).hidden.shape == (24, 32)


def test_lora_trains_only_adapter_and_head(backend, tiny_dirs, rows) -> None:
    model = backend.add_lora(backend.load_classifier(tiny_dirs["llama"], 2), LORA)
    trainable = {path for path, _ in nnx.to_flat_state(nnx.state(model.module, trainable_filter(model.module)))}
    assert trainable and all("lora_" in path[-1] or path[0] == "classifier" for path in trainable)
    before = _params(model)
    backend.train(model, rows, CrossEntropy(), _spec())
    after = _params(model)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed and changed <= trainable


def test_lora_targets_follow_peft_names(backend, tiny_dirs) -> None:
    model = backend.add_lora(backend.load_classifier(tiny_dirs["bert"], 2), LoRASpec(rank=2, target_modules=("dense",)))
    names = {k.rsplit(".lora_", 1)[0] for k in backend.export_adapter(model)}
    assert "backbone.pooler.dense" in names and "backbone.encoder.layer.1.attention.output.dense" in names
    assert "backbone.encoder.layer.0.intermediate.dense" in names and len(names) == 7
    every = backend.add_lora(backend.load_classifier(tiny_dirs["llama"], 2), LoRASpec(target_modules=("all-linear",)))
    assert len(backend.export_adapter(every)) == 2 * 2 * 7  # A and B, 2 layers, 7 linears each
    with pytest.raises(ConfigError, match="q_proj"):
        backend.add_lora(backend.load_classifier(tiny_dirs["llama"], 2), LoRASpec(target_modules=("nope",)))


def test_prompt_tuning_trains_only_prompt_and_head(backend, tiny_dirs, rows, tmp_path) -> None:
    model = backend.add_adapter(backend.load_classifier(tiny_dirs["llama"], 2), PromptSpec("prompt-tuning", 4))
    assert model.module.prompt[...].shape == (4, 32)
    before = _params(model)
    backend.train(model, rows, LabelResetLoss(), _spec(), {"reset_labels": 1 - rows.labels})
    changed = {p for p, v in _params(model).items() if not np.array_equal(before[p], v)}
    assert changed == {("prompt",), ("classifier", "weight")}
    with pytest.raises(ValueError, match="prompt-learning"):
        backend.save(model, tmp_path / "nope")
    for method in ("p-tuning", "prefix-tuning"):
        with pytest.raises(ConfigError, match=method):
            backend.add_adapter(backend.load_classifier(tiny_dirs["llama"], 2), PromptSpec(method, 4))


def test_full_finetune_trains_everything_with_bert_dropout(backend, tiny_dirs, rows) -> None:
    spec = _spec(epochs=2, lr=1e-3, batch_size=12, seed=2)

    def run() -> tuple[tuple[float, ...], dict]:
        model = backend.load_classifier(tiny_dirs["bert"], 2, projection_dim=8, seed=0)
        return backend.train(model, rows.head(12), CrossEntropy(), spec).losses, _params(model)

    (first, params), (second, _) = run(), run()
    assert first == second  # dropout masks come from the spec's seed
    fresh = _params(backend.load_classifier(tiny_dirs["bert"], 2, projection_dim=8, seed=0))
    assert all(not np.array_equal(fresh[p], params[p]) for p in fresh if "position" not in p[-2])


def test_save_merges_lora_and_reloads_identically(backend, tiny_dirs, rows, tmp_path) -> None:
    model = backend.add_lora(backend.load_classifier(tiny_dirs["llama"], 2), LORA)
    backend.train(model, rows, CrossEntropy(), _spec())
    expected = backend.predict(model, rows, max_length=MAX_LENGTH).logits
    backend.save(model, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "unbackdoor.json").read_text())["decoder"] is True
    reloaded = backend.load_classifier(tmp_path / "saved", 2, seed=99)  # the seed must not matter now
    assert not backend.export_adapter(reloaded)
    np.testing.assert_allclose(backend.predict(reloaded, rows, max_length=MAX_LENGTH).logits, expected, atol=1e-5)


def test_w2s_step_loss_equals_numpy_reference(backend, tiny_dirs, rows) -> None:
    """The first fused step's loss is the reference loss on the model's own outputs."""
    student = backend.add_lora(backend.load_classifier(tiny_dirs["llama"], 2, seed=3), LORA)
    teacher = backend.load_classifier(tiny_dirs["bert"], 2, projection_dim=32, seed=4)
    t = backend.predict(teacher, rows, max_length=MAX_LENGTH, hidden=True)
    s = backend.predict(student, rows, max_length=MAX_LENGTH, hidden=True)
    spec = W2SLoss(1.0, 0.5, 2.0, 2.0)
    aux = {"teacher_logits": t.logits, "teacher_hidden": t.hidden}
    expected = ref.reference_loss(spec, {"logits": s.logits, "hidden": s.hidden}, {"labels": rows.labels, **aux})
    stats = backend.train(student, rows, spec, _spec(lr=1e-3, batch_size=len(rows)), aux)
    assert stats.steps == 1 and stats.samples == len(rows)
    assert stats.losses[0] == pytest.approx(expected, rel=1e-5)


def test_training_reduces_loss_and_is_deterministic(backend, tiny_dirs, rows) -> None:
    spec = _spec(epochs=4, lr=5e-3, seed=5)

    def run() -> tuple[float, ...]:
        model = backend.add_lora(backend.load_classifier(tiny_dirs["llama"], 2, seed=5), LORA, seed=5)
        return backend.train(model, rows, CrossEntropy(), spec).losses

    first, second = run(), run()
    assert first == second and len(first) == 12
    assert np.mean(first[-3:]) < np.mean(first[:3])


def test_bf16_runs_close_to_fp32(backend, tiny_dirs, rows) -> None:
    model, few = backend.load_classifier(tiny_dirs["llama"], 2, seed=1), rows.head(8)
    fp32 = backend.predict(model, few, max_length=16).logits
    bf16 = JaxBackend(precision="bf16")
    np.testing.assert_allclose(bf16.predict(model, few, max_length=16).logits, fp32, atol=5e-2)
    spec = _spec(lr=1e-3, max_length=16)
    assert np.isfinite(bf16.train(backend.add_lora(model, LORA), few, CrossEntropy(), spec).final_loss)
    with pytest.raises(ConfigError, match=r"precision 'fp8'; choose one of: bf16, fp32"):
        JaxBackend(precision="fp8")
    bf16.precision = "fp8"
    with pytest.raises(ConfigError, match="fp32"):
        bf16.predict(model, few)


def test_unsupported_architecture_is_named(backend, tiny_dirs, tmp_path) -> None:
    odd = tmp_path / "odd"
    odd.mkdir()
    config = json.loads((tiny_dirs["llama"] / "config.json").read_text()) | {"model_type": "gpt2"}
    (odd / "config.json").write_text(json.dumps(config))
    (odd / "model.safetensors").write_bytes((tiny_dirs["llama"] / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=r"'gpt2'.*llama"):
        backend.load_classifier(odd, 2)


def test_selecting_jax_never_imports_torch() -> None:
    code = ("import sys; from unbackdoor.plugins import PluginManager; PluginManager().backend('jax').create(); "
            "bad = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules); "
            "assert 'jax' in sys.modules and not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_bf16_held_weights_change_no_product(backend, tiny_dirs, rows) -> None:
    """Held in bf16, the frozen weights give exactly what bf16 matmuls over float32 ones give (they are cast
    per matmul); only embedding tables round, and with those pre-rounded the logits are equal. Adapters, head
    and norms stay float32, and the trained parameters (so the AdamW state) too."""
    import jax.numpy as jnp

    held = JaxBackend()
    held.precision = "bf16"
    model = held.add_lora(held.load_classifier(tiny_dirs["llama"], 2, seed=1), LORA, seed=1)
    reference = backend.add_lora(backend.load_classifier(tiny_dirs["llama"], 2, seed=1), LORA, seed=1)
    table = reference.module.backbone.embed_tokens.weight
    table.set_value(table.get_value().astype(jnp.bfloat16).astype(jnp.float32))
    dtypes = {path: np.asarray(v).dtype for path, v in _params(model).items()}
    frozen = {p for p in dtypes if p[-1] == "weight" and ("proj" in p[-2] or p[-2] == "embed_tokens")}
    assert frozen and {dtypes[p] for p in frozen} == {np.dtype(jnp.bfloat16)}
    assert {dtypes[p] for p in dtypes.keys() - frozen} == {np.dtype(np.float32)}
    few = rows.head(8)
    np.testing.assert_array_equal(held.predict(model, few, max_length=MAX_LENGTH).logits,
                                  held.predict(reference, few, max_length=MAX_LENGTH).logits)
