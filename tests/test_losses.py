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


# ---------------------------------------------------------------- W2S alignments over token states
TOKEN_SPECS = [W2SLoss(1.0, 0.5, 0.7, 2.0, "tokens"), W2SLoss(1.0, 0.5, 0.7, 2.0, "tokens", "sum"),
               W2SLoss(5.0, 0.001, 0.01, 2.0, "released", "sum"), W2SLoss(1.0, 0.2, 0.3, 2.0, "released")]


def _token_vectors(seed: int = 5, b: int = 4, length: int = 7, d: int = 6) -> dict[str, np.ndarray]:
    v = _vectors(seed, b=b, d=d)
    rng = np.random.default_rng(seed)
    lengths = np.array([length, 3, 5, 1])[:b]  # right padding, one row of a single token
    v["hidden"] = rng.normal(size=(b, length, d))
    v["attention_mask"] = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
    return v


@pytest.mark.parametrize("spec", TOKEN_SPECS, ids=lambda s: f"{s.alignment}-{s.reduce}")
def test_token_alignments_match_reference_and_closed_form(spec: W2SLoss) -> None:
    """Torch's batch objective = the NumPy reference = its closed-form gradients (d/d every token state)."""
    from unbackdoor_torch.losses import batch_objective

    v = _token_vectors()
    logits = torch.tensor(v["logits"], dtype=torch.float32, requires_grad=True)
    hidden = torch.tensor(v["hidden"], dtype=torch.float32, requires_grad=True)
    batch = {"labels": torch.tensor(v["labels"]), "attention_mask": torch.tensor(v["attention_mask"]),
             **{k: torch.tensor(v[k], dtype=torch.float32) for k in ("teacher_logits", "teacher_hidden")}}
    value = batch_objective(spec, None, logits, hidden, batch)
    value.backward()
    expected = ref.reference_loss(spec, {"logits": v["logits"], "hidden": v["hidden"]}, v)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)
    g_logits, g_hidden = ref.w2s_grads(spec, v["logits"], v["labels"], v["teacher_logits"], v["hidden"],
                                       v["teacher_hidden"], v["attention_mask"])
    np.testing.assert_allclose(logits.grad.numpy(), g_logits, atol=1e-6)
    np.testing.assert_allclose(hidden.grad.numpy(), g_hidden, atol=1e-6)
    pad = v["attention_mask"] == 0
    # tokens: padding takes no gradient; released: padding positions are pulled like every other position
    assert (np.abs(g_hidden[pad]).max() == 0) == (spec.alignment == "tokens")
    # the closed form agrees with a finite difference of the reference (a real token and, released, a pad)
    eps = 1e-6
    for index in ((1, 0, 2), (1, 5, 3)):
        bumped = v["hidden"].copy()
        bumped[index] += eps
        numeric = (ref.reference_loss(spec, {"logits": v["logits"], "hidden": bumped}, v) - expected) / eps
        assert numeric == pytest.approx(g_hidden[index], rel=1e-3, abs=1e-9)


def test_released_alignment_pulls_every_position_to_the_last_rows_teacher_state() -> None:
    """One vector per batch: the LAST real row's teacher state, squared L2 summed over D, mean over B x L."""
    states = np.zeros((3, 4, 2))
    teacher = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    assert ref.released_alignment(states, teacher) == pytest.approx(25.0)  # ||(3, 4)||^2 at every position
    assert ref.released_alignment(states, teacher, "mean") == pytest.approx(12.5)
    # a filler row after the real ones (weight 0) neither counts nor supplies the vector
    assert ref.released_alignment(states, teacher, weight=np.array([1.0, 1.0, 0.0])) == pytest.approx(4.0)
    # positions a backend added (position_weight 0) do not count
    states[:, 3] = 100.0
    widened = np.ones((3, 4))
    widened[:, 3] = 0
    assert ref.released_alignment(states, teacher, position_weight=widened) == pytest.approx(25.0)
    # tokens: each row toward its OWN teacher state, over its real tokens only
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    np.testing.assert_allclose(ref.token_alignment(np.zeros((3, 4, 2)), mask, teacher, "sum"), [1.0, 4.0, 25.0])


def test_bad_alignment_and_reduction_name_the_choices() -> None:
    from unbackdoor.errors import ConfigError

    with pytest.raises(ConfigError, match=r"W2S alignment 'cls'; choose one of: pooled, released, tokens"):
        W2SLoss(alignment="cls")
    with pytest.raises(ConfigError, match=r"W2S reduce 'max'; choose one of: auto, mean, sum"):
        W2SLoss(reduce="max")
