"""Data-parallel training on CPU: the jax step sharded over a 2-device mesh (``--xla_force_host_platform_device_count=2``)
equals one device on the same global batch, within fp32 tolerance (only the order of the sums differs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from jax_dp_train import CONFIGS, initial, train

from unbackdoor.errors import UnknownNameError
from unbackdoor_jax import parallel

HERE = Path(__file__).parent
RTOL = ATOL = 1e-5


@pytest.fixture(scope="module")
def sharded(tiny_dirs, tmp_path_factory) -> dict[str, np.ndarray]:
    """What tests/jax_dp_train.py saved after training every config on a mesh of 2 CPU devices."""
    out = tmp_path_factory.mktemp("jax_dp") / "dp.npz"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "UNBACKDOOR_QUIET": "1"}
    cmd = [sys.executable, str(HERE / "jax_dp_train.py"), str(tiny_dirs["llama"]), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return dict(np.load(out))


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b))) if a.size else 0.0


@pytest.mark.parametrize("config", list(CONFIGS))
def test_two_device_mesh_matches_one_device(sharded, tiny_dirs, config) -> None:
    rows = parallel.padded_rows(CONFIGS[config][3], SimpleNamespace(size=2))
    assert int(sharded["devices"]) == 2
    # The batch arrived split by rows over both devices, the logits inside the step stayed split
    # (each device ran its own rows), and parameters and optimiser state came back replicated.
    assert {tuple(b) for b in sharded[f"{config}|batch"]} == {(2, rows // 2, rows // 2)}
    assert {tuple(b) for b in sharded[f"{config}|logits"]} == {(2, rows // 2, rows)}
    assert sharded[f"{config}|replicated"].all()
    losses, weights = train(str(tiny_dirs["llama"]), config, "off")
    dp = {k.split("|", 2)[2]: v for k, v in sharded.items() if k.startswith(f"{config}|w|")}
    assert set(dp) == set(weights)
    diffs = {name: _max_diff(dp[name], value) for name, value in weights.items()}
    print(f"{config}: max |loss diff| {_max_diff(sharded[f'{config}|losses'], losses):.2e}, "
          f"max |weight diff| {max(diffs.values()):.2e} ({max(diffs, key=diffs.get)})")
    np.testing.assert_allclose(sharded[f"{config}|losses"], losses, rtol=RTOL, atol=ATOL)
    for name, value in weights.items():
        np.testing.assert_allclose(dp[name], value, rtol=RTOL, atol=ATOL, err_msg=name)
    moved = {n for n, v in initial(str(tiny_dirs["llama"]), config).items() if _max_diff(v, weights[n]) > 1e-3}
    assert moved, "training moved no weight: the comparison would be vacuous"


def test_data_mesh_modes() -> None:
    assert parallel.data_mesh("off") is None
    mesh = parallel.data_mesh("on")  # a mesh even of one device
    assert mesh is not None and mesh.axis_names == ("data",)
    if mesh.size == 1:
        assert parallel.data_mesh("auto") is None
    assert [parallel.padded_rows(n, SimpleNamespace(size=2)) for n in (1, 5, 8)] == [2, 6, 8]
    with pytest.raises(UnknownNameError, match="data-parallel"):
        parallel.data_mesh("sometimes")
