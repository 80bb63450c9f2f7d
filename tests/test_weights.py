"""Weight surgery in NumPy (:mod:`unbackdoor.surgery`): quantization, merging, pruning; no framework needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from unbackdoor import initial
from unbackdoor.errors import ConfigError
from unbackdoor.surgery import (
    ClassifierWeights,
    dormant_neurons,
    ffn_layers,
    group_scales,
    linear_layers,
    merge_weights,
    prune_neurons,
    quantize_dequantize,
    quantize_weights,
    read_classifier,
    write_classifier,
)

HIDDEN, INTER, LAYERS = 12, 20, 3


def llama_tensors(seed: int, prefix: str = "") -> dict[str, np.ndarray]:
    """Llama-named random tensors (two layers' worth of every kind, float32)."""
    rng = np.random.default_rng(seed)
    out = {f"{prefix}embed_tokens.weight": rng.normal(size=(30, HIDDEN)), f"{prefix}norm.weight": rng.normal(size=HIDDEN)}
    for i in range(LAYERS):
        p = f"{prefix}layers.{i}."
        out |= {p + "mlp.gate_proj.weight": rng.normal(size=(INTER, HIDDEN)),
                p + "mlp.up_proj.weight": rng.normal(size=(INTER, HIDDEN)),
                p + "mlp.down_proj.weight": rng.normal(size=(HIDDEN, INTER)),
                p + "self_attn.q_proj.weight": rng.normal(size=(HIDDEN, HIDDEN)),
                p + "input_layernorm.weight": rng.normal(size=HIDDEN)}
    return {k: v.astype(np.float32) for k, v in out.items()}


def make_classifier(path: Path, seed: int, head: bool = True, prefix: str = "") -> Path:
    """A classifier directory in the core's layout, with fake config and tokenizer files."""
    path.mkdir(parents=True)
    save_file(llama_tensors(seed, prefix), str(path / "model.safetensors"), metadata={"format": "pt"})
    if head:
        rng = np.random.default_rng(seed + 100)
        save_file({"classifier.weight": rng.normal(size=(2, HIDDEN)).astype(np.float32)}, str(path / "head.safetensors"))
        (path / "unbackdoor.json").write_text(json.dumps({"num_labels": 2, "projection_dim": None, "decoder": True}))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "seed": seed}))
    (path / "tokenizer.json").write_text("{}")
    return path


# ------------------------------------------------------------------------------------------ quantization


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("group_size", [4, 7, 128])
def test_round_trip_error_is_bounded_by_half_the_group_step(symmetric: bool, group_size: int) -> None:
    w = np.random.default_rng(0).normal(size=(9, 30)).astype(np.float32) * 3
    deq = quantize_dequantize(w, bits=4, group_size=group_size, symmetric=symmetric)
    scale = group_scales(w, bits=4, group_size=group_size, symmetric=symmetric)
    per_weight = np.repeat(scale, group_size, axis=1)[:, : w.shape[1]]
    assert deq.shape == w.shape and deq.dtype == w.dtype
    assert np.all(np.abs(deq - w) <= per_weight / 2 + 1e-5)
    assert not np.allclose(deq, w)  # something was rounded
    levels = 15 if symmetric else 16  # symmetric uses -7..7
    for row in range(w.shape[0]):  # at most 2^bits distinct values per group
        assert len(np.unique(deq[row, :group_size])) <= levels


def test_quantization_keeps_constant_and_zero_groups_exact() -> None:
    w = np.zeros((2, 8), np.float32)
    w[1] = 0.3
    for symmetric in (True, False):
        np.testing.assert_array_equal(quantize_dequantize(w, group_size=4, symmetric=symmetric)[0], 0)
    np.testing.assert_allclose(quantize_dequantize(w, group_size=4, symmetric=False)[1], 0.3, rtol=1e-6)
    np.testing.assert_allclose(quantize_dequantize(w, group_size=4, symmetric=True)[1], 0.3, rtol=1e-6)


def test_eight_bits_are_finer_than_four() -> None:
    w = np.random.default_rng(1).normal(size=(4, 64)).astype(np.float32)
    err4 = np.abs(quantize_dequantize(w, bits=4, group_size=16) - w).mean()
    err8 = np.abs(quantize_dequantize(w, bits=8, group_size=16) - w).mean()
    assert err8 < err4 / 8


@pytest.mark.parametrize(("bits", "group_size", "message"), [(4, 0, "group_size must be >= 1"),
                                                             (1, 128, "bits must be in 2..8, got 1"),
                                                             (16, 128, "got 16")])
def test_bad_quantization_options_are_clear(bits: int, group_size: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        quantize_dequantize(np.ones((2, 4), np.float32), bits=bits, group_size=group_size)


def test_quantized_directory_has_the_identical_layout(tmp_path: Path) -> None:
    source = make_classifier(tmp_path / "victim", 0)
    weights, changed = quantize_weights(read_classifier(source), group_size=8)
    target = write_classifier(weights, source, tmp_path / "q")
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in source.iterdir())
    before, after = read_classifier(source), read_classifier(target)
    assert after.metadata == {"format": "pt"}
    assert {k: (v.shape, v.dtype) for k, v in after.backbone.items()} == \
           {k: (v.shape, v.dtype) for k, v in before.backbone.items()}
    assert sorted(changed) == sorted(k for k in before.backbone if "_proj" in k)  # every linear weight, nothing else
    for name, array in before.backbone.items():
        same = np.array_equal(array, after.backbone[name])
        assert same == (name not in changed), name
    np.testing.assert_array_equal(after.head["classifier.weight"], before.head["classifier.weight"])
    assert (target / "config.json").read_text() == (source / "config.json").read_text()


# ------------------------------------------------------------------------------------------ merging


def test_merge_endpoints_are_the_two_models(tmp_path: Path) -> None:
    victim, other = read_classifier(make_classifier(tmp_path / "v", 0)), read_classifier(make_classifier(tmp_path / "o", 1))
    for weight, expected in ((1.0, victim), (0.0, other)):
        merged = merge_weights(victim, other, weight)
        for part in ("backbone", "head"):
            got, want = getattr(merged, part), getattr(expected, part)
            assert got.keys() == want.keys()
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"{part} {name} at weight {weight}")
    half = merge_weights(victim, other, 0.5)
    name = "layers.0.mlp.up_proj.weight"
    np.testing.assert_allclose(half.backbone[name], (victim.backbone[name] + other.backbone[name]) / 2, rtol=1e-6)


def test_merge_matches_names_across_task_prefixes_and_keeps_the_head_of_a_headless_model(tmp_path: Path) -> None:
    victim = read_classifier(make_classifier(tmp_path / "v", 0))
    base = read_classifier(make_classifier(tmp_path / "b", 1, head=False, prefix="model."))
    merged = merge_weights(victim, base, 0.0)
    np.testing.assert_array_equal(merged.backbone["layers.2.mlp.down_proj.weight"],
                                  base.backbone["model.layers.2.mlp.down_proj.weight"])
    np.testing.assert_array_equal(merged.head["classifier.weight"], victim.head["classifier.weight"])


def test_merge_rejects_mismatched_models() -> None:
    a = ClassifierWeights({"x.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ConfigError, match=r"shapes \(2, 2\) and \(3, 2\) differ"):
        merge_weights(a, ClassifierWeights({"x.weight": np.zeros((3, 2), np.float32)}), 0.5)
    with pytest.raises(ConfigError, match=r"has no tensor 'x\.weight'"):
        merge_weights(a, ClassifierWeights({"y.weight": np.zeros((2, 2), np.float32)}), 0.5)
    with pytest.raises(ConfigError, match=r"merge weight must be in \[0.0, 1.0\], got 1.5"):
        merge_weights(a, a, 1.5)


# ------------------------------------------------------------------------------------------ pruning


def test_ffn_layers_recognises_llama_and_bert_names() -> None:
    llama = ffn_layers(llama_tensors(0, "model."))
    assert sorted(llama) == [0, 1, 2]
    assert llama[1].columns == ["model.layers.1.mlp.down_proj.weight"]
    assert sorted(llama[1].rows) == ["model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    bert = ffn_layers(["encoder.layer.0.intermediate.dense.weight", "encoder.layer.0.intermediate.dense.bias",
                       "encoder.layer.0.output.dense.weight", "encoder.layer.0.output.dense.bias",
                       "encoder.layer.0.attention.output.dense.weight"])
    assert bert[0].rows == ["encoder.layer.0.intermediate.dense.weight", "encoder.layer.0.intermediate.dense.bias"]
    assert bert[0].columns == ["encoder.layer.0.output.dense.weight"]


def test_linear_layers_come_from_the_headers_without_embeddings_norms_or_the_head(tmp_path: Path) -> None:
    layers = linear_layers(make_classifier(tmp_path / "m", 0, prefix="model."))
    assert sorted(layers) == sorted(f"model.layers.{i}.{name}" for i in range(LAYERS)
                                    for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj"))


def test_dormant_neurons_picks_the_least_active_of_the_last_layers() -> None:
    acts = [np.arange(10.0)[::-1], np.array([5, 1, 9, 0, 3, 7, 2, 8, 6, 4], float), np.ones(10)]
    chosen = dormant_neurons(acts, 0.3, layers=2)
    assert sorted(chosen) == [1, 2]
    assert chosen[1].tolist() == [1, 3, 6]
    assert chosen[2].tolist() == [0, 1, 2]  # ties: lowest index first
    assert sorted(dormant_neurons(acts, 0.3)) == [0, 1, 2]
    assert dormant_neurons(acts, 0.0)[0].size == 0
    with pytest.raises(ConfigError, match=r"prune_ratio must be in \[0.0, 1.0\], got 1.5"):
        dormant_neurons(acts, 1.5)


def test_prune_zeroes_exactly_the_chosen_neurons() -> None:
    weights = ClassifierWeights(llama_tensors(0), {"classifier.weight": np.ones((2, HIDDEN), np.float32)})
    chosen = {0: np.array([1, 4]), 2: np.array([0, 19])}
    pruned = prune_neurons(weights, chosen)
    for name, before in weights.backbone.items():
        after = pruned.backbone[name]
        expected = before.copy()
        layer = next((i for i in chosen if f"layers.{i}.mlp." in name), None)
        if layer is not None and "down_proj" in name:
            expected[:, chosen[layer]] = 0
        elif layer is not None:
            expected[chosen[layer]] = 0
        np.testing.assert_array_equal(after, expected, err_msg=name)
    assert np.count_nonzero(weights.backbone["layers.0.mlp.up_proj.weight"]) == INTER * HIDDEN  # input untouched
    np.testing.assert_array_equal(pruned.head["classifier.weight"], 1.0)
    with pytest.raises(ConfigError, match="cannot prune layer 7"):
        prune_neurons(weights, {7: np.array([0])})


def test_lora_init_depends_on_seed_and_layer_name() -> None:
    a = initial.lora_a("backbone.layers.0.self_attn.q_proj", 4, 16, seed=0)
    assert a.shape == (4, 16) and np.abs(a).max() <= 0.25
    assert not np.array_equal(a, initial.lora_a("backbone.layers.1.self_attn.q_proj", 4, 16, seed=0))
    assert not np.array_equal(a, initial.lora_a("backbone.layers.0.self_attn.q_proj", 4, 16, seed=1))
    np.testing.assert_array_equal(a, initial.lora_a("backbone.layers.0.self_attn.q_proj", 4, 16, seed=0))
    with pytest.raises(ValueError, match="rank and input size"):
        initial.lora_a("x", 0, 16, seed=0)
