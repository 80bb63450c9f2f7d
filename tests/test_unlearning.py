"""Unlearning (RGA, GA, NPO, ReTrain, psim+rga): specs, each loss's one definition (``terms``, in NumPy
float64 and on the backend under test, ``--backend``) vs its closed form, the fused step, the defenses end to
end, and the trigger-shifting metrics.

Tolerances (fp32 backends vs float64 NumPy): loss values 1e-5 relative, gradients w.r.t. logits
1e-6 absolute, LoRA-distance gradients 1e-5 absolute, first fused-step losses 1e-5 relative.
Torch-vs-jax parity of the same losses lives in test_parity.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file
from tiny_models import moved_copy

from unbackdoor import ExperimentConfig, run_experiment
from unbackdoor import losses as ref
from unbackdoor.arrays import stop_gradient
from unbackdoor.errors import ConfigError, UnknownNameError
from unbackdoor.lossdef import PARAMETER_DISTANCE, model_inputs
from unbackdoor.metrics import (
    attack_success_rate,
    delta_pacc,
    label_flip_rate,
    poisoned_accuracy,
    triggered_confusion,
)
from unbackdoor.plots import report_plots
from unbackdoor.plugins import get_plugin_manager
from unbackdoor.report import (
    comparison_report,
    detection_seeds_table,
    markdown_table,
    unlearning_seeds_table,
    unlearning_table,
)
from unbackdoor.runner import plan
from unbackdoor.specs import AdaptiveGALoss, GALoss, LoRASpec, NPOLoss, TrainSpec

LORA = LoRASpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj"))
SPECS = [AdaptiveGALoss(2.0, 0.0), AdaptiveGALoss(0.5, 0.0), AdaptiveGALoss(2.0, 0.0, lambda_per_row=True),
         GALoss(0.0), GALoss(0.7), NPOLoss(0.1, 1.0), NPOLoss(2.0, 0.0)]
MASKS = {"mixed": [1, 0, 1, 1, 0, 0], "all-poisoned": [1] * 6, "all-clean": [0] * 6}


def _vectors(seed: int, mask: list[int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"logits": rng.normal(size=(6, 3)) * 2, "labels": rng.integers(0, 3, 6),
            "ref_logits": rng.normal(size=(6, 3)) * 2, "is_poisoned": np.asarray(mask, np.float64)}


# ------------------------------------------------------------------------------------------ the backend's losses
def backend_loss(backend_name: str, spec: Any, v: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
    """The backend's batch objective (the spec's one definition) on given logits: value and d/d logits (the model
    is not read: beta = 0)."""
    f32 = {k: x.astype(np.float32) if x.dtype.kind == "f" else x for k, x in v.items()}
    if backend_name == "torch":
        import torch

        from unbackdoor_torch.losses import batch_objective
        from unbackdoor_torch.train import to_tensors

        # A weight-0 filler row (far-off logits, flagged poisoned) must count in neither group here too.
        n = len(f32["labels"])
        filled = {k: np.concatenate([x, x[:1] + 7 if x.dtype.kind == "f" else x[:1]]) for k, x in f32.items()}
        filled |= {"is_poisoned": np.append(f32["is_poisoned"], 1), "weight": (np.arange(n + 1) < n).astype(np.float32)}
        t = to_tensors(filled, torch.device("cpu"))
        logits = t["logits"].requires_grad_(True)
        value = batch_objective(spec, None, logits, None, t)
        value.backward()
        assert not logits.grad[n:].any()
        return float(value.detach()), logits.grad.numpy()[:n]
    import jax

    from unbackdoor_jax.losses import batch_objective
    from unbackdoor_jax.train import device_batch, fill_batch

    # A weight-0 filler row (as the jax loop pads a short batch) must count in neither group.
    n = len(f32["labels"])
    padded = fill_batch({**f32, "input_ids": np.zeros((n, 8), np.int32), "attention_mask": np.ones((n, 8), np.int32)},
                        n + 1, 8, 0)
    batch = device_batch(padded)
    value, grad = jax.value_and_grad(lambda z: batch_objective(spec, None, z, z, batch))(batch["logits"])
    assert np.all(np.asarray(grad)[n:] == 0)
    return float(value), np.asarray(grad)[:n]


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_loss_value_and_gradient_match_numpy(backend_name, spec, mask) -> None:
    v = _vectors(1, MASKS[mask])
    value, grad = backend_loss(backend_name, spec, v)
    assert value == pytest.approx(ref.reference_loss(spec, v, v), rel=1e-5, abs=1e-7)
    want = ref.unlearning_grads(spec, v["logits"], v["labels"], v["is_poisoned"], v["ref_logits"])
    np.testing.assert_allclose(grad, want, atol=1e-6)


@pytest.mark.parametrize("per_row", [False, True])
def test_lambda_carries_no_gradient(backend_name, per_row) -> None:
    """The gradient equals the closed form with lambda a constant, and differs from differentiating lambda too."""
    spec, v = AdaptiveGALoss(alpha=3.0, beta=0.0, lambda_per_row=per_row), _vectors(2, MASKS["mixed"])
    _, grad = backend_loss(backend_name, spec, v)
    constant = ref.unlearning_grads(spec, v["logits"], v["labels"], v["is_poisoned"], v["ref_logits"])
    np.testing.assert_allclose(grad, constant, atol=1e-6)
    full = _finite_difference(lambda z: ref.unlearning_loss(spec, z, v["labels"], v["is_poisoned"], v["ref_logits"]),
                              v["logits"])
    assert np.abs(full - constant).max() > 1e-2  # so the comparison above can tell the two apart


def _finite_difference(f: Any, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    out = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        bumped = x.copy()
        bumped[idx] += eps
        out[idx] = (f(bumped) - f(x)) / eps
    return out


# ------------------------------------------------------------------------------------------ NumPy references
@pytest.mark.parametrize("spec", [AdaptiveGALoss(0.0, 0.0), AdaptiveGALoss(0.0, 0.0, lambda_per_row=True), GALoss(0.3),
                                  NPOLoss(0.5, 0.2)], ids=str)
def test_reference_gradients_match_finite_differences(spec) -> None:
    """The closed-form gradients = finite differences of the closed form AND of the spec's definition (alpha 0:
    lambda is 1, so differentiating it or not agrees)."""
    v = _vectors(3, MASKS["mixed"])
    f = lambda z: ref.unlearning_loss(spec, z, v["labels"], v["is_poisoned"], v["ref_logits"])  # noqa: E731
    want = ref.unlearning_grads(spec, v["logits"], v["labels"], v["is_poisoned"], v["ref_logits"])
    np.testing.assert_allclose(_finite_difference(f, v["logits"]), want, atol=1e-5)
    defined = _finite_difference(lambda z: ref.reference_loss(spec, {"logits": z}, v), v["logits"])
    np.testing.assert_allclose(defined, want, atol=1e-5)
    assert np.abs(want).max() > 1e-2


@pytest.mark.parametrize("weight", [None, [1, 1, 1, 0, 1, 1]], ids=["all-rows", "filler"])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("spec", [*SPECS, AdaptiveGALoss(2.0, 0.5), AdaptiveGALoss(0.5, 1.0, lambda_per_row=True)],
                         ids=str)
def test_definition_matches_the_closed_form(spec, mask, weight) -> None:
    """The spec's one definition (``terms`` in NumPy float64) = the closed form written apart from it, with
    filler rows (weight 0) and the parameter distance."""
    v = _vectors(6, MASKS[mask])
    w = None if weight is None else np.asarray(weight, np.float64)
    got = ref.reference_loss(spec, {"logits": v["logits"], "delta_norm": 2.5}, v if w is None else {**v, "weight": w})
    want = ref.unlearning_loss(spec, v["logits"], v["labels"], v["is_poisoned"], v["ref_logits"], 2.5, w)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_definitions_name_their_batch_terms_and_read_the_distance_only_with_beta() -> None:
    v = _vectors(7, MASKS["mixed"])
    rga = ref.reference_terms(AdaptiveGALoss(2.0, 0.5), v, {**v, PARAMETER_DISTANCE: np.float64(2.0)})
    assert list(rga) == ["-lambda*cross_entropy[poisoned]", "cross_entropy[clean]", "parameter_distance"]
    assert all(t.value.ndim == 0 for t in rga.values()) and rga["parameter_distance"].weight == 0.5
    assert float(rga["-lambda*cross_entropy[poisoned]"].value) < 0  # the ascent term, sign in its name
    assert list(ref.reference_terms(GALoss(0.0), v, v)) == ["-cross_entropy[poisoned]"]
    assert list(ref.reference_terms(NPOLoss(0.1, 1.0), v, v)) == ["npo[poisoned]", "cross_entropy[clean]"]
    with pytest.raises(ConfigError, match="the batch has no 'parameter_distance'"):
        ref.reference_terms(AdaptiveGALoss(2.0, 0.5), v, v)
    read: list[int] = []
    for spec in (AdaptiveGALoss(2.0, 0.0), GALoss(1.0), NPOLoss()):
        assert model_inputs(spec, lambda: read.append(1)) == {}
    assert not read  # the model is not touched by a loss that does not read it
    assert model_inputs(AdaptiveGALoss(2.0, 0.5), lambda: 3.0) == {PARAMETER_DISTANCE: 3.0}
    given = {PARAMETER_DISTANCE: 1.0}  # outputs given with their distance (check_loss): the model is not read
    assert model_inputs(AdaptiveGALoss(2.0, 0.5), lambda: read.append(1), given) == {} and not read


def test_stop_gradient_on_numpy_and_the_backends_arrays(backend_name) -> None:
    """``stop_gradient`` of ``x`` in ``sum(stop_gradient(x) * x)``: the gradient is ``x`` (not ``2x``)."""
    x = np.arange(3.0)
    assert stop_gradient(x) is x
    if backend_name == "torch":
        import torch

        t = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
        (stop_gradient(t) * t).sum().backward()
        assert t.grad.tolist() == [1.0, 2.0, 3.0] and not stop_gradient(t).requires_grad
        return
    import jax
    import jax.numpy as jnp

    grad = jax.jit(jax.grad(lambda z: (stop_gradient(z) * z).sum()))(jnp.array([1.0, 2.0, 3.0]))
    assert grad.tolist() == [1.0, 2.0, 3.0]


def test_the_core_evaluates_unlearning_losses_without_a_framework() -> None:
    code = ("import sys, numpy as np; from unbackdoor import losses; from unbackdoor.arrays import stop_gradient; "
            "from unbackdoor.specs import AdaptiveGALoss; v = {'logits': np.eye(3), 'labels': np.arange(3), "
            "'ref_logits': np.zeros((3, 3)), 'is_poisoned': np.array([1.0, 0, 1])}; "
            "losses.reference_loss(AdaptiveGALoss(1.0, 0.5), {**v, 'delta_norm': 1.0}, v); stop_gradient(np.ones(2)); "
            "print(sorted(m for m in ('torch', 'jax', 'flax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_reference_terms_are_group_means() -> None:
    v = _vectors(4, MASKS["mixed"])
    ce = ref.cross_entropy(v["logits"], v["labels"])
    p = v["is_poisoned"].astype(bool)
    lam = np.exp(-2.0 * ref.kl_divergence(v["ref_logits"][p], v["logits"][p]).mean())
    got = ref.unlearning_loss(AdaptiveGALoss(2.0, 0.5), v["logits"], v["labels"], v["is_poisoned"], v["ref_logits"],
                              delta_norm=3.0)
    assert got == pytest.approx(-lam * ce[p].mean() + ce[~p].mean() + 0.5 * 3.0)
    # lambda is 1 while the model still equals the poisoned model; a filler row (weight 0) counts nowhere.
    same = ref.unlearning_loss(AdaptiveGALoss(2.0, 0.0), v["logits"], v["labels"], v["is_poisoned"], v["logits"])
    assert same == pytest.approx(-ce[p].mean() + ce[~p].mean())
    # per row: each poisoned row weighs its own exp(-alpha KL_i); the two differ once the KLs differ
    kl = ref.kl_divergence(v["ref_logits"][p], v["logits"][p])
    assert np.ptp(kl) > 0.1
    per_row = ref.unlearning_loss(AdaptiveGALoss(2.0, 0.0, lambda_per_row=True), v["logits"], v["labels"],
                                  v["is_poisoned"], v["ref_logits"])
    assert per_row == pytest.approx(-(np.exp(-2.0 * kl) * ce[p]).mean() + ce[~p].mean())
    assert per_row != pytest.approx(-lam * ce[p].mean() + ce[~p].mean())
    weight = np.array([1, 1, 1, 0, 1, 1.0])
    kept = np.flatnonzero(weight)
    assert ref.unlearning_loss(GALoss(1.0), v["logits"], v["labels"], v["is_poisoned"], weight=weight) == \
        pytest.approx(ref.unlearning_loss(GALoss(1.0), v["logits"][kept], v["labels"][kept], v["is_poisoned"][kept]))
    # NPO at the reference: -(2/beta) log(1/2) per poisoned row.
    npo = ref.unlearning_loss(NPOLoss(0.5, 0.0), v["logits"], v["labels"], v["is_poisoned"], v["logits"])
    assert npo == pytest.approx(4 * np.log(2))


def test_reference_lora_distance_and_its_gradient() -> None:
    rng = np.random.default_rng(5)
    factors = [(rng.normal(size=(2, 5)), rng.normal(size=(4, 2)), 2.0), (rng.normal(size=(2, 3)),
                                                                           rng.normal(size=(3, 2)), 2.0)]
    deltas = np.concatenate([(s * b @ a).ravel() for a, b, s in factors])
    assert ref.lora_delta_norm(factors) == pytest.approx(np.linalg.norm(deltas))
    grads = ref.lora_delta_norm_grads(factors)
    for layer in range(2):
        for which in range(2):
            def f(x, layer=layer, which=which):
                bumped = [list(t) for t in factors]
                bumped[layer][which] = x
                return ref.lora_delta_norm([tuple(t) for t in bumped])
            np.testing.assert_allclose(_finite_difference(f, factors[layer][which]), grads[layer][which], atol=1e-5)
    zero = [(a, np.zeros_like(b), s) for a, b, s in factors]
    assert ref.lora_delta_norm(zero) == 0 and all(not g.any() for pair in ref.lora_delta_norm_grads(zero) for g in pair)


# ------------------------------------------------------------------------------------------ specs and options
def test_bad_weights_are_clear_errors() -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="RGA alpha must be a finite number >= 0"):
            AdaptiveGALoss(alpha=bad)
        with pytest.raises(ConfigError, match="RGA beta"):
            AdaptiveGALoss(beta=bad)
        with pytest.raises(ConfigError, match="NPO beta must be a finite number > 0"):
            NPOLoss(beta=bad)
        with pytest.raises(ConfigError, match="GA clean_weight"):
            GALoss(clean_weight=bad)
    with pytest.raises(ConfigError, match="NPO beta"):
        NPOLoss(beta=0.0)
    pm = get_plugin_manager()
    with pytest.raises(ConfigError, match="RGA alpha"):
        pm.defense("rga").configure(alpha="-2")
    with pytest.raises(ConfigError, match="RGA beta"):
        pm.defense("psim+rga").configure(beta="nan")
    with pytest.raises(ConfigError, match="'beta' expects a number or 'auto', got 'big'"):
        pm.defense("rga").configure(beta="big")
    with pytest.raises(ConfigError, match="epochs must be > 0"):
        pm.defense("npo").configure(epochs=0)
    with pytest.raises(ConfigError, match="psim threshold"):
        pm.defense("psim+rga").configure(psim_threshold=1.5)
    assert pm.defense("rga").configure(beta="1e-2").loss(encoder=False).beta == 1e-2
    assert pm.defense("rga").loss(encoder=True).beta == 1e-2 and pm.defense("rga").loss(encoder=False).beta == 1e-4
    assert pm.defense("psim+rga").configure(lambda_per_row="true").loss(encoder=False).lambda_per_row is True
    assert pm.defense("rga").loss(encoder=False).lambda_per_row is False  # the paper's one lambda per batch
    with pytest.raises(ConfigError, match="lambda_per_row"):
        pm.defense("rga").configure(lambda_per_row="sometimes")
    with pytest.raises(UnknownNameError, match=r"defense 'npo' option adapter 'qlora'; choose one of: full, lora"):
        pm.defense("npo").configure(adapter="qlora")


def test_unset_beta_follows_the_architecture(tiny_dirs, tmp_path) -> None:
    """The paper's defaults: beta 1e-2 for encoders (BERT family), 1e-4 for decoders (LLMs)."""
    from unbackdoor_defenses.unlearn import is_encoder

    ctx = _context(tmp_path, None)
    assert is_encoder(replace(ctx, victim_path=tiny_dirs["bert"]))
    assert not is_encoder(replace(ctx, victim_path=tiny_dirs["llama"]))


def _context(tmp_path: Path, data: Any, backend: Any = None) -> Any:
    from unbackdoor.cache import StageCache
    from unbackdoor.defense import DefenseContext

    return DefenseContext(backend, tmp_path, None, data, None, 2, LORA, TrainSpec(), StageCache(tmp_path / "c"),
                          victim_train=data)


@pytest.mark.parametrize("name", ["rga", "ga", "npo", "retrain", "psim+rga"])
def test_an_empty_poisoned_set_is_a_clear_error(name, sst2, tmp_path) -> None:
    defense = get_plugin_manager().defense(name)
    clean = sst2.train.head(8)
    with pytest.raises(ConfigError, match=re.escape(f"defense '{name}' has nothing to unlearn: none of the 8 rows")):
        defense.apply(_context(tmp_path, clean))
    with pytest.raises(ConfigError, match="needs the victim's training set"):
        defense.apply(replace(_context(tmp_path, clean), victim_train=None))


def test_psim_rga_flagging_nothing_is_a_clear_error(sst2, tmp_path, monkeypatch) -> None:
    from unbackdoor_defenses import unlearn

    class Quiet:
        threshold = 0.7

        def score(self, data):
            return np.full(len(data), 0.6)

    monkeypatch.setattr(unlearn.PSIM, "detector", lambda self, ctx: (Quiet(), {}))
    data = replace(sst2.train.head(8), poisoned=np.arange(8) < 2)
    with pytest.raises(ConfigError, match=r"PSIM flagged none of the 8 training rows at threshold 0\.7"):
        get_plugin_manager().defense("psim+rga").apply(_context(tmp_path, data))


# ------------------------------------------------------------------------------------------ LoRA distance and fused step
@pytest.fixture(scope="module")
def backend(backend_name) -> Any:
    return get_plugin_manager().backend(backend_name).create()


def _lora_model(backend, backend_name, path, seed: int = 0):
    """A tiny classifier with LoRA whose B matrices are random (non-zero), and its ``(A, B, scaling)`` factors."""
    model = backend.add_lora(backend.load_classifier(path, 2, seed=seed), LORA, seed=seed)
    rng = np.random.default_rng(seed)
    if backend_name == "jax":
        arrays = {k: (v if ".lora_A." in k else rng.normal(0, 0.05, v.shape)).astype(np.float32)
                  for k, v in backend.export_adapter(model).items()}
        backend.import_adapter(model, arrays)
    else:
        import torch

        arrays = {}
        with torch.no_grad():
            for name, param in model.module.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.from_numpy(rng.normal(0, 0.05, tuple(param.shape)).astype(np.float32)))
                if "lora_" in name:
                    arrays[name.replace(".default", "")] = param.detach().numpy().copy()
    return model, ref.named_lora_factors(arrays, LORA.alpha / LORA.rank), arrays


def _backend_distance(backend_name, model) -> tuple[float, dict[str, np.ndarray]]:
    """The backend's LoRA distance and its gradient per adapter matrix (peft-style names)."""
    if backend_name == "torch":
        from unbackdoor_torch.losses import lora_delta_norm

        model.module.zero_grad()
        value = lora_delta_norm(model.module)
        value.backward()
        return float(value.detach()), {n.replace(".default", ""): p.grad.numpy().copy()
                                       for n, p in model.module.named_parameters() if "lora_" in n}
    import jax
    from flax import nnx

    from unbackdoor_jax.layers import LoRAParam
    from unbackdoor_jax.lora import delta_norm, export_adapter

    graphdef, lora, rest = nnx.split(model.module, LoRAParam, ...)
    value, grads = jax.value_and_grad(lambda s: delta_norm(nnx.merge(graphdef, s, rest).backbone))(lora)
    return float(value), export_adapter(nnx.merge(graphdef, grads, rest).backbone, model.stacked)


def test_lora_distance_and_gradient_match_numpy(backend, backend_name, tiny_dirs) -> None:
    model, factors, arrays = _lora_model(backend, backend_name, tiny_dirs["llama"], seed=1)
    value, grads = _backend_distance(backend_name, model)
    assert value == pytest.approx(ref.lora_delta_norm(factors), rel=1e-5) and value > 0.01
    prefixes = sorted(k.removesuffix(".lora_A.weight") for k in arrays if k.endswith(".lora_A.weight"))
    for prefix, (d_a, d_b) in zip(prefixes, ref.lora_delta_norm_grads(factors), strict=True):
        np.testing.assert_allclose(grads[f"{prefix}.lora_A.weight"], d_a, atol=1e-5, err_msg=prefix)
        np.testing.assert_allclose(grads[f"{prefix}.lora_B.weight"], d_b, atol=1e-5, err_msg=prefix)
    fresh = backend.add_lora(backend.load_classifier(tiny_dirs["llama"], 2), LORA)  # B = 0: norm 0, gradient 0
    value, grads = _backend_distance(backend_name, fresh)
    assert value == 0 and all(np.isfinite(g).all() and not g.any() for g in grads.values())


# The specs (and LoRA) of the end-to-end run below, so the jax backend compiles each step once for both tests.
@pytest.mark.parametrize("spec", [AdaptiveGALoss(2.0, 0.5), GALoss(0.0), NPOLoss(0.1, 1.0)], ids=str)
def test_fused_step_matches_numpy(spec, backend, backend_name, tiny_dirs, sst2) -> None:
    """The first training step's loss (one batch of mixed rows, LoRA distance included) equals the reference."""
    rows = sst2.train.head(16)
    flags = (np.arange(16) % 3 == 0).astype(np.float32)
    poisoned = backend.load_classifier(tiny_dirs["llama"], 2, seed=1)
    ref_logits = backend.predict(poisoned, rows, max_length=32).logits
    model, factors, _ = _lora_model(backend, backend_name, tiny_dirs["llama"], seed=1)
    logits = backend.predict(model, rows, max_length=32).logits
    assert np.abs(logits - ref_logits).max() > 1e-3  # the adapter moved the model, so lambda < 1
    aux = {"is_poisoned": flags, "ref_logits": ref_logits}
    stats = backend.train(model, rows, spec, TrainSpec(epochs=1, lr=1e-3, batch_size=16, max_length=32),
                          {k: aux[k] for k in spec.aux_keys})
    expected = ref.reference_loss(spec, {"logits": logits, "delta_norm": ref.lora_delta_norm(factors)},
                                  {"labels": rows.labels, **aux})
    assert stats.losses[0] == pytest.approx(expected, rel=1e-5)


def test_full_parameter_fused_step_matches_numpy(backend, tiny_dirs, sst2, tmp_path) -> None:
    """adapter=full: no LoRA, the backbone anchored to base weights; the first step's loss carries the distance
    from them (NumPy's over the checkpoints) and the step moves backbone weights."""
    rows, base = sst2.train.head(16), tmp_path / "base"
    moved_copy(tiny_dirs["llama"], base, seed=2)
    distance = ref.anchored_distance(*(load_file(str(d / "model.safetensors")) for d in (tiny_dirs["llama"], base)))
    model = backend.anchor(backend.load_classifier(tiny_dirs["llama"], 2, seed=1), base)
    logits = backend.predict(model, rows, max_length=32).logits
    shifted = logits + np.random.default_rng(0).normal(0, 0.5, logits.shape).astype(np.float32)  # lambda < 1
    aux = {"is_poisoned": (np.arange(16) % 3 == 0).astype(np.float32), "ref_logits": shifted}
    spec = AdaptiveGALoss(2.0, 0.5)
    stats = backend.train(model, rows, spec, TrainSpec(epochs=1, lr=1e-3, batch_size=16, max_length=32), aux)
    expected = ref.reference_loss(spec, {"logits": logits, "delta_norm": distance}, {"labels": rows.labels, **aux})
    assert stats.losses[0] == pytest.approx(expected, rel=1e-5)
    saved = tmp_path / "after"
    backend.save(model, saved)
    after = load_file(str(saved / "model.safetensors"))
    assert ref.anchored_distance(after, load_file(str(tiny_dirs["llama"] / "model.safetensors"))) > 1e-3


# ------------------------------------------------------------------------------------------ defenses end to end
UNLEARNING = ("retrain", "ga", "npo", "rga", "psim+rga")


@pytest.fixture(scope="module")
def unlearning_run(tiny_dirs, backend_name, tmp_path_factory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("unlearn")
    fast = {"epochs": "1"}
    cfg = ExperimentConfig(backend=backend_name, model=str(tiny_dirs["llama"]), teacher=None, attacker_rows=160,
                           attacker_epochs=2.0, attacker_lr=3e-3, user_rows=32, test_rows=40, max_length=32,
                           lora_rank=LORA.rank, lora_alpha=LORA.alpha, defenses=UNLEARNING,
                           defense_options={"ga": {"epochs": "2", "lr": "5e-3"}, "npo": fast,
                                            "rga": {**fast, "beta": "0.5"},
                                            "psim+rga": {**fast, "beta": "0.5", "psim_threshold": "0.5",
                                                         "psim_epochs": "1"}},
                           cache_dir=str(out / "cache"), out=str(out / "o"))
    return run_experiment(cfg, log=lambda _: None), out / "o"


def test_unlearning_defenses_end_to_end(unlearning_run) -> None:
    results, _ = unlearning_run
    rows = {r["defense"]: r for r in results["rows"]}
    assert set(UNLEARNING) <= set(rows)
    target = results["poison"]["target"]
    for row in results["rows"]:
        conf = np.asarray(row["triggered_confusion"]["badnet"])
        assert conf.shape == (2, 2) and conf.sum() == 40  # every test row, triggered, of BOTH classes
        assert row["PACC"] == pytest.approx(round(100 * np.trace(conf) / conf.sum(), 2))
        other = 1 - target
        assert row["ASR"] == pytest.approx(round(100 * conf[other, target] / conf[other].sum(), 2))
    assert rows["retrain"]["stats"]["rows"] == 128 and rows["retrain"]["stats"]["removed_rows"] == 32
    assert rows["retrain"]["stats"]["train"]["steps"] == 16  # 128 rows, batch 16, the attacker's 2 epochs
    assert rows["rga"]["stats"]["forget_rows"] == 32 and rows["rga"]["stats"]["clean_rows"] == 32
    assert rows["rga"]["stats"]["loss"] == rows["psim+rga"]["stats"]["loss"] == {"alpha": 2.0, "beta": 0.5,
                                                                                "lambda_per_row": False}
    assert rows["rga"]["stats"]["train"]["steps"] == 4  # 64 rows, 1 epoch
    assert rows["ga"]["stats"]["clean_rows"] == 0 and rows["npo"]["stats"]["clean_rows"] == 32
    ga = rows["ga"]["stats"]["train"]
    assert ga["steps"] == 4 and ga["final_loss"] < ga["first_loss"] < 0  # ascent: -CE of the poisoned rows falls
    pipeline = rows["psim+rga"]["stats"]
    assert set(pipeline["detection"]) == {"precision", "recall", "f1", "auroc"} and pipeline["poisoned_rows"] == 32
    assert pipeline["forget_rows"] == pipeline["flagged_rows"] > 0
    assert pipeline["detection"]["recall"] * 32 <= pipeline["flagged_rows"] + 1e-9
    by_label = pipeline["flagged_by_label"]
    assert set(by_label) <= {"0", "1"} and sum(c["flagged"] for c in by_label.values()) == pipeline["flagged_rows"]
    poisoned_flags = sum(c["poisoned"] for c in by_label.values())
    assert poisoned_flags == round(pipeline["detection"]["recall"] * 32)
    assert by_label.get(str(1 - target), {"poisoned": 0})["poisoned"] == 0  # poisoned rows carry the target label


def test_an_encoder_suspect_model_is_unlearned_with_its_own_lora_targets(tiny_dirs, backend_name, tmp_path) -> None:
    """A BERT victim (the RGA paper's setting): the default --lora-targets auto becomes query,value, which
    reaches the user's LoRA and PSIM's label-reset LoRA (whose targets follow the user's unless set), and
    RGA's unset beta is the encoder's. No chosen defense distils, so the (missing) teacher is never checked."""
    one = {"epochs": "1"}
    cfg = ExperimentConfig(backend=backend_name, model=str(tiny_dirs["bert"]), teacher=str(tmp_path / "no-teacher"),
                           attacker_rows=48,
                           attacker_epochs=1.0, user_rows=16, test_rows=16, max_length=32, lora_rank=2,
                           defenses=("rga", "psim+rga"),
                           defense_options={"rga": one, "psim+rga": {**one, "psim_epochs": "1", "psim_threshold": "0.5"}},
                           cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "o"))
    results = run_experiment(cfg, log=lambda _: None)
    assert list(results["config"]["lora_targets"]) == ["query", "value"]
    assert json.loads((tmp_path / "o" / "run.json").read_text())["config"]["lora_targets"] == ["query", "value"]
    rows = {r["defense"]: r for r in results["rows"]}
    for name in ("rga", "psim+rga"):
        assert rows[name]["stats"]["loss"]["beta"] == 1e-2 and rows[name]["PACC"] is not None
    assert rows["psim+rga"]["stats"]["flagged_rows"] > 0


def test_full_parameter_unlearning_end_to_end(tiny_dirs, backend_name, tmp_path) -> None:
    """adapter=full from the runner: every parameter trains, at the victim's own rate (--attacker-lr) unless set;
    RGA's distance is from the clean base model (--model), GA needs none."""
    full = {"adapter": "full", "epochs": "1"}
    cfg = ExperimentConfig(backend=backend_name, model=str(tiny_dirs["llama"]), teacher=None, attacker_rows=48,
                           attacker_epochs=1.0, attacker_lr=2e-3, user_rows=16, test_rows=16, max_length=32,
                           lora_rank=2, defenses=("ga", "rga"),
                           defense_options={"ga": {**full, "lr": "1e-4"}, "rga": {**full, "beta": "0.5"}},
                           cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "o"))
    rows = {r["defense"]: r for r in run_experiment(cfg, log=lambda _: None)["rows"]}
    assert rows["rga"]["stats"]["adapter"] == rows["rga"]["options"]["adapter"] == "full"
    assert rows["rga"]["stats"]["lr"] == 2e-3 and rows["ga"]["stats"]["lr"] == 1e-4
    assert rows["rga"]["stats"]["train"]["steps"] > 0 and rows["rga"]["PACC"] is not None


def test_unlearning_report_and_plot(unlearning_run) -> None:
    _, out = unlearning_run
    text = (out / "results.md").read_text()
    assert "#### Unlearning (%; delta-PACC against retrain)" in text
    section = text.split("#### Unlearning", 1)[1].splitlines()
    retrain = next(line for line in section if line.startswith("| poisoned + defense | retrain |"))
    assert retrain.endswith(" | 0.00 |") and len(retrain.split("|")) == 8
    assert len(list((out / "plots").glob("*-badnet-confusion.png"))) == 1


# ------------------------------------------------------------------------------------------ metrics on a hand-made table
def test_trigger_shifting_metrics_on_a_hand_made_table() -> None:
    """Three classes, target 1; triggered copies of ten rows of ALL classes with their true labels."""
    true = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    backdoored = np.ones(10, int)               # the trigger forces the target everywhere
    shifted = np.full(10, 2)                    # GA-style: the trigger's effect moved to class 2
    repaired = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])  # one error left
    assert label_flip_rate(backdoored, true, 1) == 100.0 == attack_success_rate(backdoored, true, 1)
    assert poisoned_accuracy(backdoored, true) == 20.0
    assert label_flip_rate(shifted, true, 1) == 0.0 and poisoned_accuracy(shifted, true) == 40.0
    assert label_flip_rate(repaired, true, 1) == 12.5 and poisoned_accuracy(repaired, true) == 90.0
    assert delta_pacc(poisoned_accuracy(shifted, true), 90.0) == 50.0  # LFR 0, yet far from retraining
    assert delta_pacc(88.5, 90.0) == delta_pacc(91.5, 90.0) == 1.5
    assert triggered_confusion(shifted, true, 3).tolist() == [[0, 0, 4], [0, 0, 2], [0, 0, 4]]
    assert triggered_confusion(repaired, true, 3).tolist() == [[3, 1, 0], [0, 2, 0], [0, 0, 4]]
    with_rejections = np.where(np.arange(10) < 2, -1, repaired)  # a detector's -1 is counted nowhere
    assert triggered_confusion(with_rejections, true, 3).sum() == 8


def _results(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"config": {"attack": "badnet", "dataset": "sst2", "model": "tiny"}, "backend": "torch",
            "poison": {"target": 1}, "rows": rows}


def _row(defense: str, ca: float, asr: float, pacc: float, conf: list[list[int]]) -> dict[str, Any]:
    return {"stage": "poisoned + defense", "defense": defense, "CA": ca, "ASR": asr, "PACC": pacc,
            "triggered_confusion": {"badnet": conf}}


def test_unlearning_table_and_confusion_plot_from_results(tmp_path) -> None:
    rows = [_row("retrain", 90.0, 5.0, 91.0, [[19, 1], [1, 19]]), _row("ga", 88.0, 2.0, 50.5, [[10, 10], [19, 1]]),
            _row("rga", 89.5, 4.0, 90.25, [[19, 1], [2, 18]])]
    table = unlearning_table(_results(rows)).splitlines()
    assert table[2] == "| stage | defense | CACC | LFR | PACC | delta-PACC |"
    assert table[4:7] == ["| poisoned + defense | retrain | 90.00 | 5.00 | 91.00 | 0.00 |",
                          "| poisoned + defense | ga | 88.00 | 2.00 | 50.50 | 40.50 |",
                          "| poisoned + defense | rga | 89.50 | 4.00 | 90.25 | 0.75 |"]
    # the trigger-shifting table: shares of each true class's triggered rows predicted as 0 / 1 (GA: class 1 -> 0)
    assert table[8:] == ["#### Triggered inputs by true class (% predicted as class 0 / 1; target 1)", "",
                         "| stage | defense | trigger | true 0 | true 1 |", "|---|---|---|---:|---:|",
                         "| poisoned + defense | retrain | badnet | 95.0 / 5.0 | 5.0 / 95.0 |",
                         "| poisoned + defense | ga | badnet | 50.0 / 50.0 | 95.0 / 5.0 |",
                         "| poisoned + defense | rga | badnet | 95.0 / 5.0 | 10.0 / 90.0 |"]
    assert unlearning_table(_results(rows[1:])) == "" and "Unlearning" not in markdown_table(_results(rows[1:]))
    assert "| poisoned + defense | ga | 88.00 | 2.00 | 50.50 | 40.50 |" in markdown_table(_results(rows))
    written = report_plots([_results(rows), _results(rows[1:])], tmp_path)
    confusion = [p for p in written if p.name.endswith("-confusion.png")]
    assert [p.name for p in confusion] == ["00-badnet-sst2-tiny-badnet-confusion.png"]
    assert confusion[0].read_bytes()[:4] == b"\x89PNG" and confusion[0].stat().st_size > 1000
    json.dumps(rows)  # what the runner stores is plain JSON


def test_a_true_class_without_triggered_inputs_reads_as_a_dash(tmp_path) -> None:
    """The aligned syntactic test sets paraphrase non-target rows only: no true-1 row, so no share to show."""
    rows = [_row("retrain", 87.0, 24.5, 75.5, [[151, 49], [0, 0]]), _row("ga", 53.0, 0.0, 100.0, [[200, 0], [0, 0]])]
    assert unlearning_table(_results(rows)).splitlines()[-2:] == [
        "| poisoned + defense | retrain | badnet | 75.5 / 24.5 | - |",
        "| poisoned + defense | ga | badnet | 100.0 / 0.0 | - |"]
    assert report_plots([_results(rows)], tmp_path)  # the heatmap draws the empty row blank


def test_docs_describe_every_unlearning_defense_and_option() -> None:
    from unbackdoor.attack import fields_of

    text = (Path(__file__).resolve().parents[1] / "docs" / "defenses.md").read_text(encoding="utf-8")
    section = text.split("## Unlearning: rga, ga, npo, retrain and psim+rga\n", 1)[1].split("\n## ", 1)[0]
    for name in UNLEARNING:
        assert f"| `{name}` |" in text, f"docs/defenses.md: {name} missing from the overview table"
        for option in fields_of(get_plugin_manager().defense(name)):
            assert f"`{option}`" in section, f"docs/defenses.md: option {name}.{option} is not documented"


@pytest.mark.parametrize("name", ["rga", "psim+rga", "finetune", "prune", "quantize", "merge", "psim"])
def test_released_model_defenses_in_the_data_setting_are_a_clear_error(tiny_dirs, tmp_path, backend_name,
                                                                       name) -> None:
    """--setting data trains the base student on the poisoned rows inside each defense: there is no released
    model to unlearn from, prune, quantize, merge or label-reset; the plan refuses before any training."""
    cfg = ExperimentConfig(backend=backend_name, model=str(tiny_dirs["llama"]), teacher=None, setting="data",
                           user_rows=32, teacher_rows=8, test_rows=8, max_length=32, defenses=("none", name),
                           cache_dir=str(tmp_path / "c"), out=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match=rf"defense '{re.escape(name)}' applies with --setting weight, not data "
                                          r"\(it acts on a poisoned released model.*the defenses for --setting data: "
                                          r"(?!.*\bfinetune\b).*\bnone\b.*\bw2s\b"):
        run_experiment(cfg, log=lambda _: None)
    assert not (tmp_path / "c").exists()  # nothing trained, nothing cached
    assert plan(replace(cfg, setting="weight")).defenses[1].name == name


def test_unlearning_over_seeds_gives_mean_and_sample_std() -> None:
    def seeded(seed: int, ga_pacc: float, **config: Any) -> dict[str, Any]:
        results = _results([_row("retrain", 90.0, 5.0, 90.0, [[1]]), _row("ga", 80.0 + seed, 2.0, ga_pacc, [[1]])])
        results["config"] |= {"seed": seed, **config}
        return results

    runs = [seeded(0, 50.0), seeded(1, 60.0), seeded(2, 70.0)]
    table = unlearning_seeds_table(runs).splitlines()
    assert table[2] == "| dataset | attack | defense | seeds | CACC | LFR | PACC | delta-PACC |"
    assert "| sst2 | badnet | ga | 3 | 81.00 +- 1.00 | 2.00 +- 0.00 | 60.00 +- 10.00 | 30.00 +- 10.00 |" in table
    assert "| sst2 | badnet | retrain | 3 | 90.00 +- 0.00 | 5.00 +- 0.00 | 90.00 +- 0.00 | 0.00 +- 0.00 |" in table
    assert unlearning_seeds_table(runs[:1]) == ""  # one run per group: nothing to aggregate
    # a run that differs by more than its seed (here the poison rate) is its own group, named by what differs
    assert unlearning_seeds_table([runs[0], seeded(1, 60.0, poison_rate=0.1)]) == ""
    table = unlearning_seeds_table([*runs, seeded(1, 60.0, poison_rate=0.1)]).splitlines()
    assert ("| sst2 | badnet | ga (poison_rate=-) | 3 | 81.00 +- 1.00 | 2.00 +- 0.00 | 60.00 +- 10.00 | 30.00 +- 10.00 |"
            in table)
    assert "| sst2 | badnet | ga (poison_rate=0.1) | 1 | 81.00 | 2.00 | 60.00 | 30.00 |" in table
    assert "Unlearning over seeds" in comparison_report(runs)
    # runs that also ran other defenses still group; a second run of a seed counts once; a row's own
    # defense options split it from the same defense with other options
    other = seeded(0, 50.0, defenses=["retrain", "ga", "rga"])
    tuned = seeded(1, 99.0, defense_options={"ga": {"epochs": 10.0}})
    table = unlearning_seeds_table([runs[0], other, runs[1], tuned, runs[2]]).splitlines()
    assert "| sst2 | badnet | ga | 3 | 81.00 +- 1.00 | 2.00 +- 0.00 | 60.00 +- 10.00 | 30.00 +- 10.00 |" in table
    assert "| sst2 | badnet | ga (epochs=10.0) | 1 | 81.00 | 2.00 | 99.00 | 9.00 |" in table  # the 10-epoch GA, alone
    assert "| sst2 | badnet | retrain | 3 | 90.00 +- 0.00 | 5.00 +- 0.00 | 90.00 +- 0.00 | 0.00 +- 0.00 |" in table


def test_a_pipelines_detection_over_seeds_gives_mean_and_sample_std() -> None:
    """psim+rga / cube+rga flag training rows (``stats.detection``): their precision, recall, F1 and AUROC are
    aggregated over seeds per detector; a run without such a row takes no part, one seed alone gives no table."""
    def seeded(seed: int, auroc: float) -> dict[str, Any]:
        det = {"precision": 0.5, "recall": 0.25 * (seed + 1), "f1": 0.4, "auroc": auroc}
        results = _results([_row("retrain", 90.0, 5.0, 90.0, [[1]]),
                            {**_row("cube+rga", 88.0, 9.0, 85.0, [[1]]), "stats": {"detection": det}},
                            {**_row("psim+rga", 70.0, 90.0, 40.0, [[1]]), "stats": {"detection": {**det, "auroc": 0.3}}}])
        results["config"] |= {"seed": seed}
        return results

    runs = [seeded(0, 0.9), seeded(1, 0.7)]
    table = detection_seeds_table(runs).splitlines()
    assert table[2] == "| dataset | attack | defense | seeds | precision | recall | F1 | AUROC |"
    assert "| sst2 | badnet | cube+rga | 2 | 0.50 +- 0.00 | 0.38 +- 0.18 | 0.40 +- 0.00 | 0.80 +- 0.14 |" in table
    assert "| sst2 | badnet | psim+rga | 2 | 0.50 +- 0.00 | 0.38 +- 0.18 | 0.40 +- 0.00 | 0.30 +- 0.00 |" in table
    assert not any("retrain" in line for line in table)  # no flags of its own
    undetected = _results([_row("retrain", 90.0, 5.0, 90.0, [[1]])])
    undetected["config"] |= {"seed": 2, "lr": 1.0}
    assert detection_seeds_table([*runs, undetected]) == detection_seeds_table(runs)  # lr varies only there
    assert detection_seeds_table(runs[:1]) == ""
    assert "Detection of the poisoned training rows over seeds" in comparison_report(runs)
