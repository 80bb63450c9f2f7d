"""Shared fixtures: the backend under test and tiny random models built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_tiny_bert, make_tiny_llama


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--backend", default="torch", choices=["torch", "jax"], help="backend under test")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: real-model tests, run by `nox -s bench`, not by `nox -s tests`")
    config.addinivalue_line("markers", "plugins: needs the example plugin installed, run by `nox -s plugins`")
    config.addinivalue_line("markers", "browser: needs Debian's chromium, run by `nox -s browser`, not by `nox -s tests`")


#: files that import jax: collected by the jax session (whose venv also has torch, for parity), not the torch one
JAX_FILES = {"test_jax_backend.py", "test_parity.py", "test_jax_scaling.py"}


#: files that test only the torch backend (torch.distributed): collected by the torch session
TORCH_FILES = {"test_scaling.py"}


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    backend = config.getoption("--backend")
    if (collection_path.name in JAX_FILES and backend != "jax") or (collection_path.name in TORCH_FILES and
                                                                     backend != "torch"):
        return True
    return None


@pytest.fixture(scope="session")
def backend_name(request: pytest.FixtureRequest) -> str:
    """The backend the session tests (``--backend``)."""
    return str(request.config.getoption("--backend"))


@pytest.fixture(scope="session")
def sst2():
    """Real SST-2 splits from ../shared/data."""
    from unbackdoor.data import load_dataset

    return load_dataset("sst2")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory, sst2) -> dict[str, Path]:
    """``{"llama": dir, "bert": dir}``: tiny random models with a word tokenizer over SST-2 + triggers."""
    root = tmp_path_factory.mktemp("tiny")
    texts = [*sst2.train.texts, "mn cf bb i watched this 3d movie"]
    return {"llama": make_tiny_llama(root / "llama", texts), "bert": make_tiny_bert(root / "bert", texts)}
