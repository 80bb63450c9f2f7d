"""Parity: NumPy reference vs torch vs jax on the same weights and inputs (fp32).

Both backends read the same safetensors backbone and draw the new head,
LoRA A and soft prompt from the core's NumPy initialisers (checked below);
where a test needs non-zero LoRA B it sets the same values in both (peft
names), so every difference below is numerical. Tolerances: logits and pooled states 1e-4
absolute; feed-forward activations 1e-4 relative; causal-LM NLL and loss
values 1e-5 relative (losses against float64 NumPy); LoRA and head
gradients 1e-4 absolute; adapter weights after 3 AdamW steps 1e-4
absolute; real models' logits 1e-3 absolute; soft-trigger logits 1e-4 absolute (a one-hot trigger
against the tokens themselves, within a backend: 1e-3 of the tokens' own effect on the logits), their
loss 1e-5 relative and its gradient with respect to the trigger weights 1e-4 of the largest entry. Matmuls run at full fp32
precision (jax "highest", torch's CPU default). A failure names the first
diverging tensor. Torch runs on the CPU unless ``UNBACKDOOR_TEST_TORCH_DEVICE`` names another device (the
device check, ``benchmarks/device_check.py``, sets ``cuda``; jax takes its default device either way).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from tiny_models import moved_copy

from unbackdoor import losses as ref
from unbackdoor.batching import cached_trigger_batch, iter_batches, pad_batch, trigger_batch
from unbackdoor.errors import ConfigError
from unbackdoor.parity import assert_tree_close
from unbackdoor.specs import (
    AdaptiveGALoss,
    CrossEntropy,
    GALoss,
    LabelResetLoss,
    LoRASpec,
    NPOLoss,
    PromptSpec,
    TrainSpec,
    W2SLoss,
    reads_token_states,
)
from unbackdoor_jax import losses as jax_losses
from unbackdoor_jax import train as jax_train
from unbackdoor_jax.backend import JaxBackend
from unbackdoor_jax.checkpoint import backbone_tensors
from unbackdoor_jax.lora import export_adapter
from unbackdoor_jax.modeling import head_tensors
from unbackdoor_torch import losses as torch_losses
from unbackdoor_torch.backend import TorchBackend
from unbackdoor_torch.train import to_tensors

LORA = LoRASpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "query", "value"))
W2S = W2SLoss(alpha=1.0, beta=0.5, gamma=2.0, temperature=2.0)
#: the alignments over every token's state (the released script's, and each row's real tokens)
RELEASED = W2SLoss(alpha=5.0, beta=0.5, gamma=0.05, temperature=2.0, alignment="released", reduce="sum")
TOKENS = W2SLoss(alpha=1.0, beta=0.5, gamma=2.0, temperature=2.0, alignment="tokens")
MAX_LENGTH = 32
#: where torch runs (``UNBACKDOOR_TEST_TORCH_DEVICE``, default cpu)
TORCH_DEVICE = torch.device(os.environ.get("UNBACKDOOR_TEST_TORCH_DEVICE") or "cpu")


# ---------------------------------------------------------------- the comparator (unbackdoor.parity)
def test_comparator_names_the_first_diverging_leaf() -> None:
    a = {"x": np.zeros(3), "y": [np.ones(2), np.ones(2)]}
    b = {"x": np.zeros(3), "y": [np.ones(2), np.array([1.0, 1.5])]}
    assert_tree_close(a, a, atol=0)
    with pytest.raises(AssertionError, match=r"'y\[1\]': max \|diff\| 0\.5"):
        assert_tree_close(a, b, atol=1e-3)
    with pytest.raises(AssertionError, match=r"'x': max \|diff\| inf .*1/3 elements off"):  # NaN is never close
        assert_tree_close({"x": np.array([0.0, np.nan, 0.0])}, {"x": np.zeros(3)}, atol=1.0)


# ---------------------------------------------------------------- shared set-up
@pytest.fixture(autouse=True)
def full_fp32_matmuls() -> Iterator[None]:
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def backends() -> tuple[JaxBackend, TorchBackend]:
    return JaxBackend(), TorchBackend(str(TORCH_DEVICE))


@pytest.fixture(scope="module")
def rows(sst2):
    return sst2.train.head(16)


def _aux(n: int, width: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"teacher_logits": rng.normal(size=(n, 2)).astype(np.float32) * 2,
            "teacher_hidden": rng.normal(size=(n, width)).astype(np.float32)}


def _peft_name(name: str) -> str:
    """torch parameter name -> the jax backend's adapter names (peft's, minus the wrapper and adapter name)."""
    return name.replace("base_model.model.", "").replace(".default", "")


def torch_adapter(model, grads: bool = False) -> dict[str, np.ndarray]:
    return {_peft_name(n): (p.grad if grads else p).detach().cpu().numpy().copy()
            for n, p in model.module.named_parameters() if "lora_" in n}


def set_torch_adapter(model, arrays: Mapping[str, np.ndarray]) -> None:
    with torch.no_grad():
        for name, param in model.module.named_parameters():
            if "lora_" in name:
                param.copy_(torch.from_numpy(np.asarray(arrays[_peft_name(name)])))


def twin_models(backends, path, *, projection_dim=None, lora: bool = False, seed: int = 0, **head):
    """The same classifier in both backends (same seed, so the same head and LoRA A; random non-zero B set in both)."""
    jb, tb = backends
    jm = jb.load_classifier(path, 2, projection_dim=projection_dim, seed=seed, **head)
    tm = tb.load_classifier(path, 2, projection_dim=projection_dim, seed=seed, **head)
    if lora:
        jb.add_lora(jm, LORA, seed=seed)
        tb.add_lora(tm, LORA, seed=seed)
        rng = np.random.default_rng(seed)
        adapter = {k: (v if ".lora_A." in k else rng.normal(0, 0.05, v.shape)).astype(np.float32)
                   for k, v in jb.export_adapter(jm).items()}  # B != 0 so A gets gradients too
        jb.import_adapter(jm, adapter)
        set_torch_adapter(tm, adapter)
    return jm, tm


# ---------------------------------------------------------------- initial values
@pytest.mark.parametrize(("arch", "projection_dim"), [("llama", None), ("bert", 32)])
def test_fresh_models_start_from_the_same_numbers(backends, tiny_dirs, arch, projection_dim) -> None:
    """Same seed -> identical new head, LoRA A (B = 0) and soft prompt in both backends: runs differ only numerically."""
    jb = backends[0]
    fresh = [(b, b.load_classifier(tiny_dirs[arch], 2, projection_dim=projection_dim, seed=7)) for b in backends]
    for b, m in fresh:
        b.add_lora(m, LoRASpec(rank=4, target_modules=("all-linear",)), seed=7)
    (_, jm), (_, tm) = fresh
    torch_head = {k: v.cpu().numpy() for k, v in tm.module.state_dict().items() if not k.startswith("backbone.")}
    assert_tree_close({**jb.export_adapter(jm), **head_tensors(jm.module)}, {**torch_adapter(tm), **torch_head}, atol=0)
    assert len(torch_adapter(tm)) > 4 and np.abs(torch_head["classifier.weight"]).max() > 0
    prompts = [b.load_classifier(tiny_dirs[arch], 2, seed=7) for b in backends]
    for b, m in zip(backends, prompts, strict=True):
        b.add_adapter(m, PromptSpec("prompt-tuning", 3), seed=9)
    (torch_prompt,) = [p.detach().cpu().numpy() for n, p in prompts[1].module.named_parameters() if "prompt_encoder" in n]
    assert_tree_close({"prompt": np.asarray(prompts[0].module.prompt[...])}, {"prompt": torch_prompt}, atol=0)


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize(("arch", "projection_dim", "activation"),
                         [("llama", None, "none"), ("bert", 32, "none"), ("bert", 32, "relu"), ("bert", 32, "tanh")])
def test_logits_and_pooled_states_match_torch(backends, tiny_dirs, rows, arch, projection_dim, activation) -> None:
    """The W2S teacher's head (projection g, then its activation) included; relu leaves zeros in the state."""
    head = {} if activation == "none" else {"projection_activation": activation}
    jm, tm = twin_models(backends, tiny_dirs[arch], projection_dim=projection_dim, lora=True, seed=1, **head)
    outs = [b.predict(m, rows, batch_size=8, max_length=MAX_LENGTH, hidden=True)
            for b, m in zip(backends, (jm, tm), strict=True)]
    assert_tree_close({"logits": outs[0].logits, "hidden": outs[0].hidden},
                      {"logits": outs[1].logits, "hidden": outs[1].hidden}, atol=1e-4)
    assert (outs[1].hidden.min() >= 0) == (activation == "relu")


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_soft_prompt_forward_matches_peft(backends, tiny_dirs, rows, arch) -> None:
    """Prompt tuning: the same virtual tokens in front, the same positions, pooling shifted alike."""
    jb, tb = backends
    jm, tm = twin_models(backends, tiny_dirs[arch], seed=5)
    spec = PromptSpec("prompt-tuning", 3)
    jb.add_adapter(jm, spec, seed=5)
    tb.add_adapter(tm, spec, seed=5)
    outs = [b.predict(m, rows, batch_size=8, max_length=MAX_LENGTH, hidden=True)
            for b, m in zip(backends, (jm, tm), strict=True)]
    assert_tree_close({"logits": outs[0].logits, "hidden": outs[0].hidden},
                      {"logits": outs[1].logits, "hidden": outs[1].hidden}, atol=1e-4)


def test_saved_classifier_reads_back_in_the_other_backend(backends, tiny_dirs, rows, tmp_path) -> None:
    """One on-disk layout: a LoRA-merged jax save predicts the same in torch, and a torch save in jax."""
    jb, tb = backends
    jm, tm = twin_models(backends, tiny_dirs["llama"], lora=True, seed=2)
    jb.save(jm, tmp_path / "from_jax")
    tb.save(tm, tmp_path / "from_torch")
    expected = jb.predict(jm, rows, max_length=MAX_LENGTH).logits
    for backend, folder in ((tb, "from_jax"), (jb, "from_torch")):
        got = backend.predict(backend.load_classifier(tmp_path / folder, 2), rows, max_length=MAX_LENGTH).logits
        assert_tree_close({folder: got}, {folder: expected}, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_feed_forward_activations_match_torch(backends, tiny_dirs, rows, arch) -> None:
    """Fine-pruning statistics: mean |neuron| per layer over real tokens."""
    outs = [b.mlp_activations(b.load_classifier(tiny_dirs[arch], 2), rows, batch_size=8, max_length=MAX_LENGTH)
            for b in backends]
    assert_tree_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)


def test_causal_lm_nll_matches_torch(backends, tiny_dirs) -> None:
    texts = ["a great movie", "movie", "", "the plot is thin but the acting is fine", "mn cf"]
    outs = [b.lm_nll(tiny_dirs["llama"], texts, batch_size=2, max_length=8) for b in backends]
    assert np.isnan(outs[0][2]) and np.isnan(outs[1][2])
    assert_tree_close(np.nan_to_num(outs[0]), np.nan_to_num(outs[1]), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- losses
@pytest.mark.parametrize("spec", [CrossEntropy(), W2S, W2SLoss(0.5, 0.0, 0.3, 1.0), LabelResetLoss(1.0, 3)],
                         ids=["ce", "w2s", "w2s-no-kd", "label-reset"])
def test_loss_values_match_numpy_and_torch(spec) -> None:
    rng = np.random.default_rng(0)
    v = {"logits": rng.normal(size=(6, 3)) * 3, "labels": rng.integers(0, 3, 6),
         "teacher_logits": rng.normal(size=(6, 3)) * 2, "hidden": rng.normal(size=(6, 10)),
         "teacher_hidden": rng.normal(size=(6, 10)), "reset_labels": rng.integers(0, 3, 6)}
    expected = ref.reference_loss(spec, v, v)
    f32 = {k: x.astype(np.float32) if x.dtype.kind == "f" else x for k, x in v.items()}
    t = to_tensors(f32, TORCH_DEVICE)
    torch_value = float(torch_losses.per_example_loss(spec, t["logits"], t["hidden"], t).mean())

    def jax_loss(logits, hidden):
        return jax_losses.per_example_loss(spec, logits, hidden, jax_train.device_batch(f32)).mean()

    jax_value, (d_logits, d_hidden) = jax.value_and_grad(jax_loss, argnums=(0, 1))(f32["logits"], f32["hidden"])
    assert float(jax_value) == pytest.approx(expected, rel=1e-5)
    assert torch_value == pytest.approx(expected, rel=1e-5)
    if isinstance(spec, W2SLoss):
        want = ref.w2s_grads(spec, v["logits"], v["labels"], v["teacher_logits"], v["hidden"], v["teacher_hidden"])
        assert_tree_close({"d_logits": d_logits, "d_hidden": d_hidden},
                          {"d_logits": want[0], "d_hidden": want[1]}, atol=1e-6)


@pytest.mark.parametrize("spec", [RELEASED, TOKENS, W2SLoss(1.0, 0.0, 0.5, 1.0, "tokens", "sum"),
                                  W2SLoss(1.0, 0.2, 0.3, 2.0, "released", "mean")], ids=str)
def test_token_alignment_values_and_gradients_match_numpy_and_torch(spec) -> None:
    """Every token's state: value and d/d logits, d/d states on both backends vs NumPy's closed form; then jax
    with the batch as it trains it (a filler row and widened columns, weight 0) gives the same value."""
    rng = np.random.default_rng(2)
    mask = (np.arange(5)[None] < np.array([[5], [2], [4]])).astype(np.int64)
    v = {"logits": rng.normal(size=(3, 2)) * 3, "labels": rng.integers(0, 2, 3), "attention_mask": mask,
         "teacher_logits": rng.normal(size=(3, 2)), "hidden": rng.normal(size=(3, 5, 4)),
         "teacher_hidden": rng.normal(size=(3, 4))}
    expected = ref.reference_loss(spec, v, v)
    want = ref.w2s_grads(spec, v["logits"], v["labels"], v["teacher_logits"], v["hidden"], v["teacher_hidden"], mask)
    f32 = {k: x.astype(np.float32) if x.dtype.kind == "f" else x for k, x in v.items()}
    t = to_tensors(f32, TORCH_DEVICE)
    logits, hidden = t["logits"].requires_grad_(True), t["hidden"].requires_grad_(True)
    torch_value = torch_losses.batch_objective(spec, None, logits, hidden, t)
    torch_value.backward()
    batch = jax_train.device_batch({**f32, "weight": np.ones(3, np.float32),
                                    "position_weight": np.ones((3, 5), np.float32)})
    jax_value, jax_grads = jax.value_and_grad(
        lambda z, h: jax_losses.batch_objective(spec, None, z, h, batch), argnums=(0, 1))(batch["logits"], batch["hidden"])
    assert float(jax_value) == pytest.approx(expected, rel=1e-5)
    assert float(torch_value.detach()) == pytest.approx(expected, rel=1e-5)
    assert_tree_close({"jax d_logits": jax_grads[0], "jax d_states": jax_grads[1],
                       "torch d_logits": logits.grad.cpu().numpy(), "torch d_states": hidden.grad.cpu().numpy()},
                      {"jax d_logits": want[0], "jax d_states": want[1], "torch d_logits": want[0],
                       "torch d_states": want[1]}, atol=1e-6)
    filled = jax_train.fill_batch({**f32, "input_ids": np.ones((3, 5), np.int64), "index": np.arange(3)}, 4, 32,
                                  pad_id=0)  # 4 rows, 5 -> 32 columns
    filled["hidden"] = np.pad(f32["hidden"][np.array([0, 1, 2, 0])], ((0, 0), (0, 32 - 5), (0, 0)), constant_values=9.0)
    filled = jax_train.device_batch(filled)
    wide = jax_losses.batch_objective(spec, None, filled["logits"], filled["hidden"], filled)
    assert float(wide) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("spec", [AdaptiveGALoss(2.0, 0.0), AdaptiveGALoss(2.0, 0.0, lambda_per_row=True), GALoss(0.5),
                                  NPOLoss(0.3, 1.0)], ids=str)
def test_unlearning_losses_match_numpy_and_torch(spec) -> None:
    """Batch objectives on mixed poisoned/clean rows: value and d/d logits (RGA's lambda held constant)."""
    rng = np.random.default_rng(1)
    v = {"logits": rng.normal(size=(6, 3)) * 3, "labels": rng.integers(0, 3, 6), "ref_logits": rng.normal(size=(6, 3)),
         "is_poisoned": np.array([1.0, 0, 1, 0, 0, 1]), "weight": np.ones(6)}
    f32 = {k: x.astype(np.float32) if x.dtype.kind == "f" else x for k, x in v.items()}
    t = to_tensors(f32, TORCH_DEVICE)
    logits = t["logits"].requires_grad_(True)
    torch_value = torch_losses.batch_objective(spec, None, logits, None, t)
    torch_value.backward()
    batch = jax_train.device_batch(f32)
    jax_value, jax_grad = jax.value_and_grad(lambda z: jax_losses.batch_objective(spec, None, z, z, batch))(
        batch["logits"])
    assert float(jax_value) == pytest.approx(ref.reference_loss(spec, v, v), rel=1e-5)
    assert float(torch_value.detach()) == pytest.approx(ref.reference_loss(spec, v, v), rel=1e-5)
    want = ref.unlearning_grads(spec, v["logits"], v["labels"], v["is_poisoned"], v["ref_logits"])
    assert_tree_close({"jax": jax_grad, "torch": logits.grad.cpu().numpy()}, {"jax": want, "torch": want}, atol=1e-6)


# ---------------------------------------------------------------- gradients and optimiser steps
def _first_batch(model, rows, aux, max_length: int = MAX_LENGTH) -> dict[str, np.ndarray]:
    ids = model.encoder.encode(rows.texts, max_length)
    return next(iter_batches(ids, model.encoder.pad_id, len(ids), arrays={"labels": rows.labels, **aux}))


def _jax_grads(model, batch, spec=W2S, full: bool = False, max_length: int = MAX_LENGTH,
               ) -> tuple[float, dict[str, np.ndarray]]:
    """The loss and the adapter's (``full``: every backbone parameter's) and head's gradients, HF/peft-named.

    The batch is widened as training would with ``max_length`` (jax's length ladder).
    """
    module = model.module
    graphdef, trainable, frozen = nnx.split(module, jax_train.trainable_filter(module), ...)
    arrays = jax_train.device_batch(jax_train.fill_batch(batch, len(batch["index"]), max_length, 0))
    value, grads = jax.value_and_grad(jax_train.batch_loss, argnums=3)(graphdef, spec, jnp.float32, trainable, frozen,
                                                                       arrays, None)
    as_model = nnx.merge(graphdef, grads, frozen)  # the gradients laid out like the model, to name them like peft
    named = backbone_tensors if full else export_adapter
    return float(value), {**named(as_model.backbone, model.stacked), **head_tensors(as_model)}


def _torch_grads(model, batch, spec=W2S, full: bool = False) -> tuple[float, dict[str, np.ndarray]]:
    t = to_tensors({k: v for k, v in batch.items() if k != "index"}, TORCH_DEVICE)
    model.module.zero_grad()
    logits, hidden = model.module(t["input_ids"], t["attention_mask"], tokens=reads_token_states(spec))
    value = torch_losses.batch_objective(spec, model.module, logits, hidden, t)
    value.backward()
    if full:
        return float(value.detach()), {n.removeprefix("backbone."): p.grad.cpu().numpy().copy()
                                       for n, p in model.module.named_parameters()}
    head = {n: p.grad.cpu().numpy().copy() for n, p in model.module.named_parameters() if n.startswith("classifier.")}
    return float(value.detach()), {**torch_adapter(model, grads=True), **head}


@pytest.mark.parametrize("spec", [W2S, RELEASED, TOKENS], ids=["pooled", "released", "tokens"])
def test_lora_and_head_gradients_match_torch(backends, tiny_dirs, rows, spec) -> None:
    """W2S through the model; jax widens the batch to its length ladder, which the alignments must not count."""
    jm, tm = twin_models(backends, tiny_dirs["llama"], lora=True, seed=3)
    batch = _first_batch(jm, rows, _aux(len(rows), 32), max_length=20)
    assert batch["input_ids"].shape[1] < jax_train.padded_width(batch["input_ids"].shape[1], 64)
    jax_value, jax_grads = _jax_grads(jm, batch, spec, max_length=64)
    torch_value, torch_grads = _torch_grads(tm, batch, spec)
    assert jax_value == pytest.approx(torch_value, rel=1e-5)
    assert max(np.abs(g).max() for g in torch_grads.values()) > 1e-3  # the comparison is not vacuous
    assert_tree_close(jax_grads, torch_grads, atol=1e-4)


def test_rga_lora_and_head_gradients_match_torch(backends, tiny_dirs, rows) -> None:
    """RGA through the model: adaptive ascent on poisoned rows, CE on clean rows, the LoRA distance (beta > 0)."""
    jb = backends[0]
    jm, tm = twin_models(backends, tiny_dirs["llama"], lora=True, seed=6)
    ref_logits = jb.predict(jb.load_classifier(tiny_dirs["llama"], 2, seed=6), rows, max_length=MAX_LENGTH).logits
    aux = {"is_poisoned": (np.arange(len(rows)) % 4 == 0).astype(np.float32), "ref_logits": ref_logits}
    spec = AdaptiveGALoss(alpha=2.0, beta=0.5)
    batch = _first_batch(jm, rows, aux)
    (jax_value, jax_grads), (torch_value, torch_grads) = _jax_grads(jm, batch, spec), _torch_grads(tm, batch, spec)
    assert jax_value == pytest.approx(torch_value, rel=1e-5)
    assert max(np.abs(g).max() for g in torch_grads.values()) > 1e-3
    assert_tree_close(jax_grads, torch_grads, atol=1e-4)


@pytest.mark.parametrize(("loss", "batch_size"), [(W2S, 4), (RELEASED, 6), (TOKENS, 6)],
                         ids=["pooled", "released", "tokens"])
def test_three_adamw_w2s_steps_match_torch(backends, tiny_dirs, rows, loss, batch_size) -> None:
    """16 rows in batches of 6: the third holds 4, which jax fills with weight-0 rows (the released alignment
    then takes the last REAL row's teacher state, as torch does)."""
    jm, tm = twin_models(backends, tiny_dirs["llama"], lora=True, seed=4)
    spec = TrainSpec(epochs=1, lr=1e-3, batch_size=batch_size, max_length=MAX_LENGTH, weight_decay=0.01,
                     warmup_ratio=0.5, max_steps=3, seed=4)
    aux = _aux(len(rows), 32, seed=4)
    stats = [b.train(m, rows, loss, spec, aux) for b, m in zip(backends, (jm, tm), strict=True)]
    assert stats[0].steps == stats[1].steps == 3
    np.testing.assert_allclose(stats[0].losses, stats[1].losses, rtol=1e-5)
    jax_head = head_tensors(jm.module)
    torch_head = {n: p.detach().cpu().numpy() for n, p in tm.module.named_parameters() if n.startswith("classifier.")}
    assert_tree_close({**backends[0].export_adapter(jm), **jax_head}, {**torch_adapter(tm), **torch_head}, atol=1e-4)


# ---------------------------------------------------------------- real models (nox -s bench / -m slow)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "minilm-l6"])
def test_real_model_logits_match_torch(backends, sst2, name) -> None:
    from unbackdoor.models import resolve_model

    try:
        path = resolve_model(name)
    except Exception as exc:  # the model packages are optional
        pytest.skip(f"{name} unavailable: {exc}")
    jm, tm = twin_models(backends, path, seed=0)
    data = sst2.test.head(16)
    outs = [b.predict(m, data, batch_size=16, max_length=64) for b, m in zip(backends, (jm, tm), strict=True)]
    assert_tree_close({name: outs[0].logits}, {name: outs[1].logits}, atol=1e-3)


# ---------------------------------------------------------------- full-parameter unlearning (adapter=full)
def test_full_parameter_rga_distance_and_gradients_match_torch(backends, tiny_dirs, rows, tmp_path) -> None:
    """RGA training every parameter: its distance is from the base weights a backend's ``anchor`` recorded,
    over every backbone parameter; value (vs NumPy's distance) and every backbone and head gradient agree."""
    base = tmp_path / "base"
    added = moved_copy(tiny_dirs["llama"], base, seed=7)
    distance = ref.anchored_distance(*(load_file(str(d / "model.safetensors")) for d in (base, tiny_dirs["llama"])))
    assert distance == pytest.approx(added, rel=1e-4) and distance > 0.1
    jm, tm = twin_models(backends, tiny_dirs["llama"], seed=7)
    for backend, model in zip(backends, (jm, tm), strict=True):
        backend.anchor(model, base)
    aux = {"is_poisoned": (np.arange(len(rows)) % 4 == 0).astype(np.float32),
           "ref_logits": backends[0].predict(jm, rows, max_length=MAX_LENGTH).logits}
    batch = _first_batch(jm, rows, aux)
    spec, without = AdaptiveGALoss(alpha=2.0, beta=0.5), AdaptiveGALoss(alpha=2.0, beta=0.0)
    (jax_value, jax_grads), (torch_value, torch_grads) = (_jax_grads(jm, batch, spec, full=True),
                                                          _torch_grads(tm, batch, spec, full=True))
    # the anchored distance, as NumPy's
    assert jax_value - _jax_grads(jm, batch, without, full=True)[0] == pytest.approx(0.5 * distance, rel=1e-4)
    assert jax_value == pytest.approx(torch_value, rel=1e-5)
    assert_tree_close(jax_grads, torch_grads, atol=1e-4)


def test_anchor_refuses_other_weights_and_a_lora_model(backends, tiny_dirs) -> None:
    for backend in backends:
        model = backend.load_classifier(tiny_dirs["llama"], 2)
        with pytest.raises(ConfigError, match="does not have the model's parameters and shapes"):
            backend.anchor(model, tiny_dirs["bert"])
        backend.add_lora(model, LORA)
        with pytest.raises(ConfigError, match="anchor it before adding LoRA"):
            backend.anchor(model, tiny_dirs["llama"])


# ---------------------------------------------------------------- soft triggers (trigger-search)
#: the trigger's vocabulary: fewer ids than the tiny models' 512, so ``E[:V]`` is a slice
TRIGGER_VOCAB = 400


def _trigger_rows(model, rows, slots: int) -> dict[str, np.ndarray]:
    """``rows`` with ``slots`` trigger slots mid-row (the positions after them move, the slots are not last)."""
    ids = model.encoder.encode(rows.texts, MAX_LENGTH - slots)
    return trigger_batch(ids, [len(x) // 2 for x in ids], slots, model.encoder.pad_id)


def _plain_logits(models, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each backend's ordinary forward over the batch's ids, no trigger path (evaluation mode)."""
    jm, tm = models
    ids, mask = batch["input_ids"], batch["attention_mask"]
    jax_logits = jax_train.forward(*nnx.split(jm.module), jnp.asarray(ids), jnp.asarray(mask), jnp.float32)[0]
    t = to_tensors({"input_ids": ids, "attention_mask": mask}, TORCH_DEVICE)
    tm.module.eval()
    with torch.no_grad():
        torch_logits = tm.module(t["input_ids"], t["attention_mask"])[0]
    return {"jax": np.asarray(jax_logits), "torch": torch_logits.cpu().numpy()}


def _trigger_logits(backends, models, batch, weights, target=None) -> dict[str, tuple]:
    return {b.name: b.trigger_logits(m, batch, weights, target) for b, m in zip(backends, models, strict=True)}


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_a_one_hot_trigger_is_the_tokens_themselves(backends, tiny_dirs, rows, arch) -> None:
    """One-hot weights embed exactly the tokens: logits equal the plain forward of the ids with the tokens in
    the slots, in both backends; no slots (k = 0) is the plain forward of the rows."""
    models = twin_models(backends, tiny_dirs[arch], seed=4)
    batch = _trigger_rows(models[0], rows, 2)
    tokens = [models[0].encoder.tokenizer.token_to_id(w) for w in ("cf", "mn")]
    one_hot = np.zeros((2, TRIGGER_VOCAB), np.float32)
    one_hot[[0, 1], tokens] = 1.0
    filled = dict(batch, input_ids=batch["input_ids"].copy())
    filled["input_ids"][np.arange(len(rows))[:, None], batch["trigger_at"]] = tokens
    got = {name: out[0] for name, out in _trigger_logits(backends, models, batch, one_hot).items()}
    want = _plain_logits(models, filled)
    # the tokens' own effect (pad ids in the slots instead) sets the scale: a random BERT barely moves (3e-5)
    effect = np.abs(_plain_logits(models, batch)["torch"] - want["torch"]).max()
    assert effect > 1e-5
    assert_tree_close(got, want, atol=1e-3 * effect)
    assert_tree_close({"torch": got["jax"]}, {"torch": got["torch"]}, atol=1e-4)
    bare = _trigger_rows(models[0], rows, 0)
    none = {name: out[0] for name, out in
            _trigger_logits(backends, models, bare, np.zeros((0, TRIGGER_VOCAB), np.float32)).items()}
    assert_tree_close(none, _plain_logits(models, bare), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_soft_trigger_logits_loss_and_gradient_match_torch(backends, tiny_dirs, rows, arch) -> None:
    """Soft weights (a Dirichlet draw per slot) on a LoRA model: logits, mean cross-entropy and its gradient
    w.r.t. the weights agree; the model's own parameters get no gradient."""
    models = twin_models(backends, tiny_dirs[arch], lora=True, seed=6)
    batch = _trigger_rows(models[0], rows, 3)
    weights = np.random.default_rng(6).dirichlet(np.full(TRIGGER_VOCAB, 0.3), size=3).astype(np.float32)
    outs = _trigger_logits(backends, models, batch, weights, rows.labels)
    (jax_logits, jax_loss, jax_grad), (torch_logits, torch_loss, torch_grad) = outs["jax"], outs["torch"]
    assert jax_grad.shape == torch_grad.shape == (3, TRIGGER_VOCAB) and jax_grad.dtype == np.float32
    scale = np.abs(torch_grad).max()
    assert scale > 0 and np.isfinite(jax_loss)
    assert_tree_close({"logits": jax_logits, "grad / max|grad|": jax_grad / scale},
                      {"logits": torch_logits, "grad / max|grad|": torch_grad / scale}, atol=1e-4)
    assert jax_loss == pytest.approx(torch_loss, rel=1e-5)
    assert all(p.grad is None for p in models[1].module.parameters())


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_a_cached_prefix_gives_the_uncached_logits_loss_and_gradient(backends, tiny_dirs, rows, arch) -> None:
    """A decoder's cached keys and values of the tokens before a mid-row trigger, read back by
    ``trigger_logits`` with only the trigger and the rest of the row run: the same logits, loss and gradient as
    the whole row, in both backends, and the backends agree on the cached states; an encoder caches nothing."""
    models = twin_models(backends, tiny_dirs[arch], lora=True, seed=8)
    pad = models[0].encoder.pad_id
    ids = models[0].encoder.encode(rows.texts, MAX_LENGTH - 2)
    at = [len(x) // 2 for x in ids]
    ids[3] = ids[3][:0]  # a row with no token before its trigger (an empty text)
    at[3] = 0
    whole = trigger_batch(ids, at, 2, pad)
    prefixes = [x[:i] for x, i in zip(ids, at, strict=True)]
    before = dict(zip(("input_ids", "attention_mask"), pad_batch(prefixes, pad), strict=True))
    weights = np.random.default_rng(8).dirichlet(np.full(TRIGGER_VOCAB, 0.3), size=2).astype(np.float32)
    got, states = {}, {}
    for backend, model in zip(backends, models, strict=True):
        prefix = backend.trigger_prefix(model, before)
        if arch == "bert":
            assert prefix is None
            continue
        layers = int(json.loads((tiny_dirs[arch] / "config.json").read_text())["num_hidden_layers"])
        assert prefix["key"].shape[:3] == (layers, len(ids), before["input_ids"].shape[1])
        states[backend.name] = {k: np.concatenate([v[:, r, :i] for r, i in enumerate(at)], 1) for k, v in prefix.items()}
        cached = cached_trigger_batch([{k: v[:, r, :i] for k, v in prefix.items()} for r, i in enumerate(at)],
                                      [x[i:] for x, i in zip(ids, at, strict=True)], 2, pad)
        assert cached["input_ids"].shape[1] < whole["input_ids"].shape[1]
        want, out = (backend.trigger_logits(model, b, weights, rows.labels) for b in (whole, cached))
        scale = np.abs(want[2]).max()
        assert scale > 0
        assert_tree_close({"logits": out[0], "grad / max|grad|": out[2] / scale},
                          {"logits": want[0], "grad / max|grad|": want[2] / scale}, atol=1e-5)
        assert out[1] == pytest.approx(want[1], rel=1e-5)
        got[backend.name] = out
    if arch == "llama":
        assert_tree_close({"torch": states["jax"]}, {"torch": states["torch"]}, atol=1e-4)
        assert_tree_close({"torch": got["jax"][0]}, {"torch": got["torch"][0]}, atol=1e-4)
