"""Parity as a service: :func:`unbackdoor.testing.check_loss` on every built-in loss, and what it catches.

The torch session checks each loss on torch alone (values and gradients on given outputs against NumPy
float64, and the first training step against NumPy on the model's own outputs); the jax session runs
the whole check on both backends (the same, plus 3 AdamW steps of a LoRA model compared between them).
Tolerances are :class:`unbackdoor.testing.Tolerances`' defaults (the parity tests' figures).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest

from unbackdoor import losses as ref
from unbackdoor.arrays import cross_entropy
from unbackdoor.errors import ConfigError, UnknownNameError
from unbackdoor.lossdef import Term
from unbackdoor.specs import AdaptiveGALoss, CrossEntropy, GALoss, LabelResetLoss, NPOLoss, W2SLoss
from unbackdoor.testing import AuxRequest, check_loss, tiny_model

RELEASED = W2SLoss(5.0, 0.001, 0.001, alignment="released", reduce="sum")


def unlearning_aux(request: AuxRequest) -> dict[str, np.ndarray]:
    """Every other row poisoned; reference logits drawn around zero."""
    rng = np.random.default_rng(request.seed + 1)
    return {"is_poisoned": (np.arange(request.rows) % 2 == 0).astype(np.float32),
            "ref_logits": rng.normal(0, 2, (request.rows, request.num_labels)).astype(np.float32)}


def w2s_aux(request: AuxRequest) -> dict[str, np.ndarray]:
    """A teacher's logits and projected states, one per row."""
    rng = np.random.default_rng(request.seed + 2)
    return {"teacher_logits": rng.normal(0, 3, (request.rows, request.num_labels)).astype(np.float32),
            "teacher_hidden": rng.normal(0, 1, (request.rows, request.hidden_size)).astype(np.float32)}


def reset_aux(request: AuxRequest) -> dict[str, np.ndarray]:
    return {"reset_labels": np.random.default_rng(request.seed + 3).integers(0, request.num_labels, request.rows)}


def rga_grads(spec: AdaptiveGALoss):
    """RGA's closed-form gradient (lambda a constant of the step), which finite differences cannot give."""
    def grads(logits, hidden, batch):
        return ref.unlearning_grads(spec, logits, batch["labels"], batch["is_poisoned"], batch["ref_logits"],
                                    batch["weight"]), None
    return grads


#: (id, spec, aux, extra keyword arguments of check_loss)
CASES = [
    ("cross-entropy", CrossEntropy(), None, {}),
    ("label-reset", LabelResetLoss(), reset_aux, {}),
    ("w2s-pooled", W2SLoss(), w2s_aux, {}),
    ("w2s-tokens", W2SLoss(alignment="tokens", reduce="sum"), w2s_aux, {}),
    ("w2s-released", RELEASED, w2s_aux, {}),
    ("rga", AdaptiveGALoss(2.0, 0.0), unlearning_aux, {"reference_grads": rga_grads(AdaptiveGALoss(2.0, 0.0))}),
    # beta > 0: the step reads the backend's own parameter distance, 0 for a fresh adapter
    ("rga-distance", AdaptiveGALoss(1.0, 0.5), unlearning_aux,
     {"reference_grads": rga_grads(AdaptiveGALoss(1.0, 0.5)), "constants": {"parameter_distance": 0.0}}),
    ("ga", GALoss(0.5), unlearning_aux, {}),
    ("npo", NPOLoss(0.5, 1.0), unlearning_aux, {}),
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):
    return tiny_model(tmp_path_factory.mktemp("check-loss") / "llama", "llama")


def session_backends(backend_name: str) -> dict[str, Any]:
    """torch: torch alone, one step; jax: both backends (torch the reference of the steps), 3 steps."""
    return {"backends": ("torch", "jax"), "steps": 3} if backend_name == "jax" else {"backends": ("torch",), "steps": 1}


@pytest.mark.parametrize(("spec", "aux", "extra"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_builtin_loss_passes(backend_name, llama, spec, aux, extra) -> None:
    run = session_backends(backend_name)
    report = check_loss(spec, llama, aux, **run, **extra)
    for backend in run["backends"]:
        quantities = report.quantities(backend)
        assert {"loss", "d_logits", "d_hidden"} <= quantities
        token_states = getattr(spec, "token_states", False)
        assert ("step 1 loss" in quantities) != token_states  # predict returns no token states to compare with
    if run["steps"] == 3:
        jax_steps = report.quantities("jax")
        assert {"step losses of run 3", "steps of run 3"} <= jax_steps
        assert sum(q.startswith("parameters after step 3: ") for q in jax_steps) >= 4  # LoRA A/B of q, v and more
    assert all(c.max_diff < 1e-3 for c in report.comparisons)


@dataclass(frozen=True)
class OffOnTheBackends:
    """Cross-entropy plus ``shift`` on every array library but NumPy: the float64 reference sees 0."""

    shift: float = 1e-3
    aux_keys: ClassVar[tuple[str, ...]] = ()

    def terms(self, xp: Any, logits: Any, hidden: Any, batch: Any) -> dict[str, Term]:
        off = 0.0 if xp.__name__.endswith("numpy") else self.shift
        return {"cross_entropy": Term(cross_entropy(logits, batch["labels"]) + off)}


def test_a_backend_that_computes_another_value_is_named(backend_name, llama) -> None:
    with pytest.raises(AssertionError, match=r"backend 'torch', loss against NumPy float64: max \|diff\| 0\.001"):
        check_loss(OffOnTheBackends(), llama, backends=("torch",), steps=0)


def test_a_closed_form_that_disagrees_with_the_backend_is_caught(llama) -> None:
    def half(logits, hidden, batch):  # half of cross-entropy's true gradient
        return 0.5 * (ref.softmax(logits) - np.eye(logits.shape[1])[batch["labels"]]) / len(logits), None

    with pytest.raises(AssertionError, match=r"backend 'torch', d_logits against NumPy float64 \(reference_grads\)"):
        check_loss(CrossEntropy(), llama, backends=("torch",), steps=0, reference_grads=half)


def test_bad_inputs_are_clear_errors(llama, tiny_dirs) -> None:
    with pytest.raises(ConfigError, match=r"aux has no \['teacher_logits', 'teacher_hidden'\]; the spec's aux_keys"):
        check_loss(W2SLoss(), llama, backends=("torch",), steps=0)
    with pytest.raises(ConfigError, match=r"aux arrays \{'reset_labels': \(3,\)\} must have one row per row of the "
                                          r"data \(16\)"):
        check_loss(LabelResetLoss(), llama, {"reset_labels": np.zeros(3, np.int64)}, backends=("torch",), steps=0)
    with pytest.raises(ConfigError, match=r"whose config sets dropout .*hidden_dropout_prob.*use a model without "
                                          r"dropout \(unbackdoor\.testing\.tiny_model\)"):
        check_loss(CrossEntropy(), tiny_dirs["bert"], backends=("torch",), steps=1)
    with pytest.raises(UnknownNameError, match=r"backend 'mlx'.*torch"):
        check_loss(CrossEntropy(), llama, backends=("mlx",), steps=0)


def test_tiny_model_builds_both_archs_without_a_framework(tmp_path) -> None:
    import subprocess
    import sys

    code = ("import sys; from unbackdoor.testing import tiny_model, tiny_dataset; "
            f"tiny_model({str(tmp_path / 'l')!r}, 'llama'); tiny_model({str(tmp_path / 'b')!r}, 'bert'); "
            "print(len(tiny_dataset(8)), sorted(m for m in ('torch', 'jax', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "8 []"
    assert {p.name for p in (tmp_path / "l").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    with pytest.raises(UnknownNameError, match=r"unknown tiny model arch 'gpt2'; choose one of: bert, llama"):
        tiny_model(tmp_path / "x", "gpt2")
