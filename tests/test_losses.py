"""NumPy reference losses vs the torch backend: values and gradients.

Tolerances (fp32 torch vs float64 NumPy): losses 1e-5 relative, gradients 1e-6 absolute.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unbackdoor import losses as ref
from unbackdoor.specs import CrossEntropy, W2SLoss
from unbackdoor_torch.losses import per_example_loss


def _vectors(seed: int = 0, b: int = 6, c: int = 3, d: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"logits": rng.normal(size=(b, c)) * 3, "labels": rng.integers(0, c, b),
            "teacher_logits": rng.normal(size=(b, c)) * 2, "hidden": rng.normal(size=(b, d)),
            "teacher_hidden": rng.normal(size=(b, d))}


def _torch_loss(spec, v):
    logits = torch.tensor(v["logits"], dtype=torch.float32, requires_grad=True)
    hidden = torch.tensor(v["hidden"], dtype=torch.float32, requires_grad=True)
    batch = {"labels": torch.tensor(v["labels"]),
             "teacher_logits": torch.tensor(v["teacher_logits"], dtype=torch.float32),
             "teacher_hidden": torch.tensor(v["teacher_hidden"], dtype=torch.float32)}
    loss = per_example_loss(spec, logits, hidden, batch).mean()
    loss.backward()
    return float(loss.detach()), logits.grad.numpy(), None if hidden.grad is None else hidden.grad.numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_entropy_matches_reference(seed: int) -> None:
    v = _vectors(seed)
    value, d_logits, _ = _torch_loss(CrossEntropy(), v)
    expected = ref.reference_loss(CrossEntropy(), {"logits": v["logits"]}, v)
    assert value == pytest.approx(expected, rel=1e-5)
    onehot = np.eye(v["logits"].shape[1])[v["labels"]]
    np.testing.assert_allclose(d_logits, (ref.softmax(v["logits"]) - onehot) / len(v["labels"]), atol=1e-6)


@pytest.mark.parametrize("spec", [W2SLoss(), W2SLoss(1.0, 0.5, 1.0, 4.0), W2SLoss(0.0, 1.0, 0.0, 1.0)])
def test_w2s_loss_and_grads_match_reference(spec: W2SLoss) -> None:
    v = _vectors(3)
    value, d_logits, d_hidden = _torch_loss(spec, v)
    expected = ref.reference_loss(spec, {"logits": v["logits"], "hidden": v["hidden"]}, v)
    assert value == pytest.approx(expected, rel=1e-5)
    g_logits, g_hidden = ref.w2s_grads(spec, v["logits"], v["labels"], v["teacher_logits"], v["hidden"],
                                       v["teacher_hidden"])
    np.testing.assert_allclose(d_logits, g_logits, atol=1e-6)
    if spec.gamma:
        np.testing.assert_allclose(d_hidden, g_hidden, atol=1e-6)


def test_reference_terms_are_what_the_formula_says() -> None:
    v = _vectors(4)
    # KD is zero when the student copies the teacher; alignment is zero for equal states.
    assert np.allclose(ref.distillation(v["teacher_logits"], v["teacher_logits"], 2.0), 0.0)
    assert np.allclose(ref.feature_alignment(v["hidden"], v["hidden"]), 0.0)
    # Alignment is the per-element MEAN, not the sum over the hidden dimension.
    ones = np.ones((1, 8))
    assert ref.feature_alignment(ones * 3, ones)[0] == pytest.approx(4.0)
    # Reference gradients agree with finite differences of the reference loss.
    spec, eps = W2SLoss(1.0, 0.3, 0.7, 2.0), 1e-6
    args = [v["logits"], v["labels"], v["teacher_logits"], v["hidden"], v["teacher_hidden"]]
    g_logits, _ = ref.w2s_grads(spec, *args)
    bumped = v["logits"].copy()
    bumped[0, 1] += eps
    numeric = (ref.w2s_loss(spec, bumped, *args[1:]).mean() - ref.w2s_loss(spec, *args).mean()) / eps
    assert numeric == pytest.approx(g_logits[0, 1], rel=1e-4)


def test_bad_loss_weights_are_rejected() -> None:
    from unbackdoor.errors import ConfigError

    with pytest.raises(ConfigError, match="beta"):
        W2SLoss(beta=-1.0)
    with pytest.raises(ConfigError, match="temperature"):
        W2SLoss(temperature=0.0)
    with pytest.raises(ConfigError, match="gamma"):
        W2SLoss(gamma=float("nan"))
