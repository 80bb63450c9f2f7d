"""Parity as a service: :func:`check_loss` runs a loss on the backends and compares it with its NumPy float64 evaluation.

Three levels, each compared leaf by leaf (:mod:`unbackdoor.parity`); the first failing one raises an
``AssertionError`` naming the backend, the quantity, the max abs diff and the tolerance:

1. on seeded outputs (logits ``[N, C]``; pooled states ``[N, D]``, or every token's ``[N, L, D]`` for a loss
   whose ``token_states`` is true) and the batch of the check's rows: each backend's value of the
   objective its training step minimises (``loss_grads``, :class:`~unbackdoor.backend.LossGradBackend`)
   against :func:`unbackdoor.losses.reference_loss`, and its autodiff gradients w.r.t. the logits and the
   hidden states against central finite differences of that float64 reference (or ``reference_grads``);
2. the first training step: each backend's loss (``Backend.train``) against the NumPy value on the model's
   own outputs (``predict``) for the rows of that step (pooled states only: ``predict`` returns no token
   states, so a token-state loss is compared between backends instead);
3. ``steps`` AdamW steps of a LoRA model: run ``k`` trains ``k`` steps from the same fresh model (its
   schedule decays over ``k`` steps), for ``k = 1..steps``; the saved parameters after each run and the
   per-step losses of the longest run are compared between backends (the first named is the reference).

No framework is imported here: backends come from the plugin registry by name.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from .backend import Backend, LossGradBackend
from .batching import epoch_batches
from .data import TextDataset
from .errors import ConfigError
from .losses import reference_loss
from .parity import leaves, mismatch
from .specs import LoRASpec, TrainSpec, reads_token_states
from .text import TextEncoder
from .tinymodels import tiny_dataset

#: the adapter the steps train: the attention projections of Llama-style and BERT-style models
CHECK_LORA = LoRASpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "query", "value"))


@dataclass(frozen=True)
class Tolerances:
    """What :func:`check_loss` accepts (fp32 backends against float64 NumPy, the parity tests' figures).

    Attributes:
        loss: relative tolerance of loss values (against NumPy, and between backends at each step).
        grad_atol, grad_rtol: gradients w.r.t. logits and hidden states: ``|diff| <= atol + rtol * |NumPy|``.
        params: absolute tolerance of every parameter after each AdamW step, between backends.
    """

    loss: float = 1e-5
    grad_atol: float = 1e-6
    grad_rtol: float = 1e-5
    params: float = 1e-4


@dataclass(frozen=True)
class AuxRequest:
    """What an aux provider is asked for: the loss's per-row arrays (``aux_keys``) for the check's rows.

    Attributes:
        labels: ``[N]`` the rows' labels.
        num_labels: ``C``, the logits' width.
        hidden_size: ``D``, the width of the pooled state (and of every token's state) the loss sees.
        seed: the check's seed (draw random arrays from ``numpy.random.default_rng(seed)``).
    """

    labels: np.ndarray
    num_labels: int
    hidden_size: int
    seed: int

    @property
    def rows(self) -> int:
        """``N``."""
        return len(self.labels)


#: per-row arrays ``[N, ...]``, or a function of the :class:`AuxRequest` returning them
AuxSource = Mapping[str, Any] | Callable[[AuxRequest], Mapping[str, Any]]
#: ``(logits [N, C], hidden, batch) -> (d/d logits, d/d hidden)`` in float64: a closed-form reference gradient
GradFn = Callable[[np.ndarray, np.ndarray | None, Mapping[str, np.ndarray]], tuple[np.ndarray, np.ndarray | None]]


@dataclass(frozen=True)
class Comparison:
    """One quantity that matched: which backend, what, against what, how close."""

    backend: str
    quantity: str
    against: str
    max_diff: float


@dataclass
class LossCheck:
    """What :func:`check_loss` compared (every entry passed) and what it could not compare, and why."""

    spec: object
    comparisons: list[Comparison] = field(default_factory=list)
    not_compared: list[str] = field(default_factory=list)

    def quantities(self, backend: str) -> set[str]:
        """The quantities compared for ``backend`` (``loss``, ``d_logits``, ``parameters after step 2``...)."""
        return {c.quantity for c in self.comparisons if c.backend == backend}

    def expect(self, backend: str, quantity: str, against: str, actual: Any, expected: Any, *, atol: float = 0.0,
               rtol: float = 0.0) -> None:
        """Record a match, or raise the AssertionError that names ``backend``, ``quantity`` and the diff."""
        problem = mismatch(actual, expected, atol=atol, rtol=rtol)
        if problem:
            raise AssertionError(f"check_loss({self.spec!r}): backend {backend!r}, {quantity} against {against}: "
                                 f"{problem}")
        diff = np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))
        self.comparisons.append(Comparison(backend, quantity, against, float(diff.max()) if diff.size else 0.0))


def check_loss(spec: Any, model_dir: str | Path, aux: AuxSource | None = None, *,
               backends: Sequence[str] = ("torch", "jax"), data: TextDataset | None = None, num_labels: int = 2,
               steps: int = 3, batch_size: int = 6, max_length: int = 32, lora: LoRASpec = CHECK_LORA,
               constants: Mapping[str, Any] | None = None, reference_grads: GradFn | None = None,
               tolerances: Tolerances = Tolerances(), seed: int = 0) -> LossCheck:
    """Run the loss ``spec`` on ``backends`` and compare it with its NumPy float64 evaluation (see the module doc).

    Args:
        spec: a loss spec instance (written once with ``terms``, or one a backend implements itself).
        model_dir: a HF-format model directory without dropout (:func:`unbackdoor.tinymodels.tiny_model` builds one).
        aux: the spec's per-row ``aux_keys`` arrays for the check's rows, or a function of an :class:`AuxRequest`
            returning them.
        backends: registered backend names; each must implement ``loss_grads``.
        data: the rows (default :func:`~unbackdoor.tinymodels.tiny_dataset` of 16 rows); ``steps`` batches of
            ``batch_size`` rows train, the last short when ``batch_size`` does not divide the rows.
        num_labels: the classifier's classes.
        steps: the AdamW steps to compare (0: only levels 1 and 2).
        batch_size, max_length: the training steps' batch rows and token cap.
        lora: the adapter the steps train (with the head).
        constants: batch-wide arrays a training step adds to the batch itself (e.g. a parameter distance; give
            its value for a fresh adapter): put in the batch of levels 1 and 2 as given.
        reference_grads: a closed-form float64 gradient to use instead of finite differences (a loss that
            holds part of itself constant, like RGA's lambda, needs one).
        tolerances: see :class:`Tolerances`.
        seed: seeds the outputs of level 1, the default rows, the models' heads and adapters and the steps.

    Returns:
        A :class:`LossCheck` listing every comparison made.

    Raises:
        AssertionError: at the first quantity out of tolerance.
        ConfigError: a missing aux array, a backend without ``loss_grads``, a model with dropout.
    """
    data = data if data is not None else tiny_dataset(16, num_labels, seed)
    found = {name: _backend(name) for name in backends}
    width = _hidden_size(next(iter(found.values())), Path(model_dir), num_labels)
    rows = _aux_rows(spec, aux, AuxRequest(data.labels, num_labels, width, seed))
    consts = {k: np.asarray(v) for k, v in (constants or {}).items()}
    report = LossCheck(spec)
    check_outputs(report, spec, found, _outputs_batch(spec, model_dir, data, rows, consts, num_labels, width, seed),
                  reference_grads, tolerances)
    if steps:
        _check_deterministic(Path(model_dir))
        train = TrainSpec(epochs=float(steps), lr=1e-3, batch_size=batch_size, max_length=max_length,
                          weight_decay=0.01, warmup_ratio=0.0, seed=seed)
        runs = {name: [_run(b, spec, model_dir, data, rows, train, k, num_labels, lora) for k in range(1, steps + 1)]
                for name, b in found.items()}
        _check_first_step(report, spec, found, runs, model_dir, data, rows, consts, train, num_labels, lora, tolerances)
        _check_steps(report, runs, tolerances)
    return report


# --------------------------------------------------------------------------------- set-up


def _backend(name: str) -> Backend:
    from .plugins import get_plugin_manager  # the registry imports every plugin module: only when checking

    backend = get_plugin_manager().backend(name).create()
    if not isinstance(backend, LossGradBackend):
        raise ConfigError(f"backend {name!r} has no loss_grads (unbackdoor.backend.LossGradBackend), which "
                          "check_loss needs to compare a loss's gradients")
    return backend


def _hidden_size(backend: Backend, model_dir: Path, num_labels: int) -> int:
    return backend.hidden_size(backend.load_classifier(model_dir, num_labels))


def _aux_rows(spec: Any, aux: AuxSource | None, request: AuxRequest) -> dict[str, np.ndarray]:
    """The aux arrays, checked: every ``aux_keys`` entry present, one row per row of the check."""
    given = aux(request) if callable(aux) else dict(aux or {})
    rows = {k: np.asarray(v) for k, v in given.items()}
    missing = [k for k in getattr(spec, "aux_keys", ()) if k not in rows]
    if missing:
        raise ConfigError(f"check_loss({spec!r}): aux has no {missing}; the spec's aux_keys are "
                          f"{list(spec.aux_keys)} (pass aux= a mapping or a function of an AuxRequest)")
    short = {k: v.shape for k, v in rows.items() if v.ndim == 0 or len(v) != request.rows}
    if short:
        raise ConfigError(f"check_loss: aux arrays {short} must have one row per row of the data ({request.rows}); "
                          "pass batch-wide values as constants=")
    return rows


def _check_deterministic(model_dir: Path) -> None:
    """Dropout draws differ between backends, so their steps could not be compared."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    on = {k: v for k, v in config.items() if "dropout" in k and isinstance(v, int | float) and v > 0}
    if on:
        raise ConfigError(f"check_loss trains on {str(model_dir)!r}, whose config sets dropout {on}; the backends draw "
                          "different dropout masks, so use a model without dropout (unbackdoor.testing.tiny_model)")


# --------------------------------------------------------------------------------- level 1: given outputs


@dataclass(frozen=True)
class _Outputs:
    """Seeded model outputs (float32) and the batch of the check's rows."""

    logits: np.ndarray
    hidden: np.ndarray
    batch: dict[str, np.ndarray]


def _outputs_batch(spec: Any, model_dir: str | Path, data: TextDataset, rows: Mapping[str, np.ndarray],
                   consts: Mapping[str, np.ndarray], num_labels: int, width: int, seed: int) -> _Outputs:
    """Logits ``N(0, 9)``, hidden states ``N(0, 1)`` (every token's when the loss reads them) and the padded batch."""
    encoder = TextEncoder.from_dir(model_dir)
    ids = encoder.encode(data.texts, 64)
    length = max(len(i) for i in ids)
    mask = np.array([[1] * len(i) + [0] * (length - len(i)) for i in ids], np.int64)
    input_ids = np.where(mask > 0, np.array([np.pad(i, (0, length - len(i))) for i in ids]), encoder.pad_id)
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((len(data), num_labels)) * 3).astype(np.float32)
    shape = (len(data), length, width) if reads_token_states(spec) else (len(data), width)
    batch = {"labels": data.labels, "input_ids": input_ids, "attention_mask": mask, **rows,
             "weight": np.ones(len(data), np.float32), **consts}
    return _Outputs(logits, rng.standard_normal(shape).astype(np.float32), batch)


def numeric_grads(f: Callable[[np.ndarray], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of the scalar ``f`` at ``x`` in float64, one coordinate at a time."""
    x = np.array(x, np.float64)
    grads = np.empty_like(x)
    flat, out = x.reshape(-1), grads.reshape(-1)  # views: moving flat[i] moves x
    for i in range(flat.size):
        keep = flat[i]
        step = eps * max(1.0, abs(keep))
        flat[i] = keep + step
        up = f(x)
        flat[i] = keep - step
        out[i] = (up - f(x)) / (2 * step)
        flat[i] = keep
    return grads


def _reference(spec: Any, out: _Outputs, reference_grads: GradFn | None) -> tuple[float, np.ndarray, np.ndarray]:
    """The float64 value and gradients: ``reference_grads``, else finite differences of :func:`reference_loss`."""
    z, h = out.logits.astype(np.float64), out.hidden.astype(np.float64)
    value = reference_loss(spec, {"logits": z, "hidden": h}, out.batch)
    if reference_grads is not None:
        dz, dh = reference_grads(z, h, out.batch)
        return value, np.asarray(dz), np.zeros_like(h) if dh is None else np.asarray(dh)
    dz = numeric_grads(lambda x: reference_loss(spec, {"logits": x, "hidden": h}, out.batch), z)
    dh = numeric_grads(lambda x: reference_loss(spec, {"logits": z, "hidden": x}, out.batch), h)
    return value, dz, dh


def check_outputs(report: LossCheck, spec: Any, backends: Mapping[str, Backend], out: _Outputs,
                  reference_grads: GradFn | None, tol: Tolerances) -> None:
    """Level 1: each backend's value and gradients on the same outputs against the float64 reference."""
    value, dz, dh = _reference(spec, out, reference_grads)
    if not (np.any(dz) or np.any(dh)):
        raise AssertionError(f"check_loss({spec!r}): the loss's gradient is zero everywhere on the check's outputs, "
                             "so nothing would be compared; give aux arrays that make it move")
    against = "NumPy float64" + (" (reference_grads)" if reference_grads else " (finite differences)")
    for name, backend in backends.items():
        got, got_dz, got_dh = backend.loss_grads(spec, out.logits, out.hidden, out.batch)  # type: ignore[attr-defined]
        report.expect(name, "loss", "NumPy float64", got, value, rtol=tol.loss)
        report.expect(name, "d_logits", against, got_dz, dz, atol=tol.grad_atol, rtol=tol.grad_rtol)
        report.expect(name, "d_hidden", against, got_dh, dh, atol=tol.grad_atol, rtol=tol.grad_rtol)


# --------------------------------------------------------------------------------- levels 2 and 3: training


@dataclass(frozen=True)
class _Run:
    """One training run of ``steps`` steps: its per-step losses and the saved parameters after it."""

    steps: int
    losses: tuple[float, ...]
    params: dict[str, np.ndarray]


def _fresh(backend: Backend, model_dir: str | Path, num_labels: int, lora: LoRASpec, seed: int) -> Any:
    model = backend.load_classifier(model_dir, num_labels, seed=seed)
    return backend.add_lora(model, lora, seed=seed)


def _run(backend: Backend, spec: Any, model_dir: str | Path, data: TextDataset, rows: Mapping[str, np.ndarray],
         train: TrainSpec, steps: int, num_labels: int, lora: LoRASpec) -> _Run:
    """Train a fresh model ``steps`` steps, save it (LoRA merged) and read every saved tensor back."""
    model = _fresh(backend, model_dir, num_labels, lora, train.seed)
    stats = backend.train(model, data, spec, TrainSpec(**{**vars(train), "max_steps": steps}), dict(rows),
                          desc=f"check_loss: {steps} steps")
    with tempfile.TemporaryDirectory(prefix="unbackdoor-check-") as tmp:
        backend.save(model, tmp)
        params = {k: v for file in sorted(Path(tmp).glob("*.safetensors")) for k, v in load_file(str(file)).items()}
    return _Run(stats.steps, stats.losses, params)


def _first_batch(model_dir: str | Path, data: TextDataset, rows: Mapping[str, np.ndarray],
                 train: TrainSpec) -> Mapping[str, np.ndarray]:
    """The rows (``index``) and arrays of the first training batch, from the core's batching as backends use it."""
    encoder = TextEncoder.from_dir(model_dir)
    ids = encoder.encode(data.texts, train.max_length)
    return next(iter(epoch_batches(ids, encoder.pad_id, {"labels": data.labels, **rows}, train)))


def _check_first_step(report: LossCheck, spec: Any, backends: Mapping[str, Backend], runs: Mapping[str, list[_Run]],
                      model_dir: str | Path, data: TextDataset, rows: Mapping[str, np.ndarray],
                      consts: Mapping[str, np.ndarray], train: TrainSpec, num_labels: int, lora: LoRASpec,
                      tol: Tolerances) -> None:
    """Level 2: the first step's loss against NumPy on the fresh model's own pooled outputs for that step's rows."""
    if reads_token_states(spec):
        report.not_compared.append("step 1 loss against NumPy: the loss reads token states, which predict does not "
                                   "return (the step losses are compared between backends)")
        return
    batch = _first_batch(model_dir, data, rows, train)
    index = batch["index"]
    arrays = {**{k: v for k, v in batch.items() if k != "index"}, **consts}
    for name, backend in backends.items():
        pred = backend.predict(_fresh(backend, model_dir, num_labels, lora, train.seed), data,
                               batch_size=len(data), max_length=train.max_length, hidden=True)
        value = reference_loss(spec, {"logits": pred.logits[index], "hidden": pred.hidden[index]}, arrays)
        report.expect(name, "step 1 loss", "NumPy float64 on its own outputs", runs[name][0].losses[0], value,
                      rtol=tol.loss)


def _check_steps(report: LossCheck, runs: Mapping[str, list[_Run]], tol: Tolerances) -> None:
    """Level 3: step losses and the parameters after each step, every backend against the first."""
    (first, want), *others = runs.items()
    if not others:
        report.not_compared.append(f"parameters after each step: one backend ({first}), nothing to compare with")
    for name, got in others:
        for k, (run, ref) in enumerate(zip(got, want, strict=True), start=1):
            report.expect(name, f"steps of run {k}", first, run.steps, ref.steps)
            report.expect(name, f"step losses of run {k}", first, np.asarray(run.losses), np.asarray(ref.losses),
                          rtol=tol.loss)
            _expect_params(report, name, first, k, run.params, ref.params, tol.params)


def _expect_params(report: LossCheck, name: str, first: str, step: int, got: Mapping[str, np.ndarray],
                   want: Mapping[str, np.ndarray], atol: float) -> None:
    """Every saved tensor, the first that differs named; both backends must save the same tensors."""
    if got.keys() != want.keys():
        raise AssertionError(f"check_loss({report.spec!r}): backend {name!r} saved other tensors than {first!r} "
                             f"after step {step}: only {name} {sorted(got.keys() - want.keys())[:5]}, "
                             f"only {first} {sorted(want.keys() - got.keys())[:5]}")
    for path, value in leaves(dict(want)):
        report.expect(name, f"parameters after step {step}: {path}", first, got[path], value, atol=atol)
