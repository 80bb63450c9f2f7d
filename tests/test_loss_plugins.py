"""Losses as plugins: the ``unbackdoor_losses`` hook, and a loss written once outside the core that trains on
the session's backend (``--backend torch`` and ``--backend jax`` each collect this file) and matches its NumPy
float64 evaluation at the first step (1e-5 relative, the parity tests' loss tolerance)."""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest

from unbackdoor import cli, specs
from unbackdoor.arrays import cross_entropy, log_softmax
from unbackdoor.errors import PluginError
from unbackdoor.hookspecs import hookimpl
from unbackdoor.lossdef import LossInfo, Term
from unbackdoor.losses import reference_loss
from unbackdoor.plugins import PluginManager, get_plugin_manager
from unbackdoor.specs import TrainSpec


@dataclass(frozen=True)
class ConfidencePenalty:
    """A third party's loss: scaled CE, minus ``weight`` times the prediction's entropy, plus ``hidden_weight``
    times the mean square of the pooled state (``aux_keys``: a per-row ``row_scale``)."""

    weight: float = 0.5
    hidden_weight: float = 0.1
    aux_keys: ClassVar[tuple[str, ...]] = ("row_scale",)

    def terms(self, xp: Any, logits: Any, hidden: Any, batch: Any) -> dict[str, Term]:
        logp = log_softmax(logits)
        return {"cross_entropy": Term(batch["row_scale"] * cross_entropy(logits, batch["labels"])),
                "entropy": Term(-xp.sum(xp.exp(logp) * logp, axis=-1), -self.weight),
                "hidden_square": Term(xp.mean(xp.square(hidden), axis=-1), self.hidden_weight)}


def _plugin(*infos: LossInfo) -> types.SimpleNamespace:
    return types.SimpleNamespace(unbackdoor_losses=hookimpl(lambda: list(infos)))


def test_builtin_losses_register_through_the_hook_from_the_core() -> None:
    found = get_plugin_manager().losses()
    spec_classes = {cls for cls in vars(specs).values() if isinstance(cls, type) and hasattr(cls, "aux_keys")}
    assert {reg.obj.spec for reg in found.values()} >= spec_classes  # every loss spec of the core
    assert {reg.plugin for reg in found.values() if reg.obj.spec in spec_classes} == {"core"}
    assert found["w2s"].package == "unbackdoor"
    assert all(found[name].obj.written_once for name in ("cross-entropy", "label-reset", "w2s", "rga", "ga", "npo"))


def test_list_shows_a_losses_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out.split("losses:\n", 1)[1]
    assert "w2s" in out and "label-reset" in out and "[unbackdoor " in out


def test_a_duplicate_loss_name_names_both_plugins() -> None:
    pm = PluginManager(entry_points=False)
    pm.register(_plugin(LossInfo("w2s", "mine", ConfidencePenalty)), "first")
    pm.register(_plugin(LossInfo("w2s", "theirs", specs.W2SLoss)), "second")
    with pytest.raises(PluginError, match=r"loss 'w2s' is already registered by plugin 'first'"):
        pm.losses()


def test_a_spec_that_is_not_a_frozen_dataclass_is_reported_by_plugin() -> None:
    @dataclass
    class Mutable:
        aux_keys: ClassVar[tuple[str, ...]] = ()

    pm = PluginManager(entry_points=False)
    pm.register(types.SimpleNamespace(unbackdoor_losses=hookimpl(lambda: [LossInfo("bad", "x", Mutable)])), "bad-loss")
    assert pm.losses() == {}
    assert "loss 'bad': spec" in pm.failures["bad-loss"] and "must be a frozen dataclass" in pm.failures["bad-loss"]


def test_a_third_party_loss_trains_and_matches_numpy(backend_name, tiny_dirs, sst2) -> None:
    pm = PluginManager(entry_points=False)
    pm.register(_plugin(LossInfo("confidence", "CE - entropy + |h|^2", ConfidencePenalty)), "third-party")
    spec = pm.loss("confidence").spec()
    backend = get_plugin_manager().backend(backend_name).create()
    model = backend.load_classifier(tiny_dirs["llama"], 2, seed=1)
    data = sst2.train.head(12)
    aux = {"row_scale": np.linspace(0.5, 1.5, len(data)).astype(np.float32)}
    before = backend.predict(model, data, batch_size=12, max_length=32, hidden=True)
    expected = reference_loss(spec, {"logits": before.logits, "hidden": before.hidden},
                              {"labels": data.labels, **aux})
    stats = backend.train(model, data, spec, TrainSpec(epochs=2, batch_size=12, max_length=32, lr=1e-3), aux)
    assert stats.steps == 2 and np.isfinite(stats.losses).all()
    assert stats.losses[0] == pytest.approx(expected, rel=1e-5)
    assert stats.losses[1] != pytest.approx(stats.losses[0], rel=1e-6)  # the step moved the weights
