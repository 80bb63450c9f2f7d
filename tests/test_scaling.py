"""Data-parallel training on CPU: torch DDP (torchrun, gloo, 2 processes) equals one process on the same
global batch, within fp32 tolerance (only the order of the gradient sums differs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from ddp_train import train

HERE = Path(__file__).parent


def test_torch_ddp_two_processes_match_one(tiny_dirs, tmp_path) -> None:
    out = tmp_path / "ddp.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNBACKDOOR_QUIET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "ddp_train.py"), str(tiny_dirs["llama"]), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, start_new_session=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ddp = dict(np.load(out))
    assert bool(ddp.pop("ddp")), "the ranks did not train through unbackdoor_torch.distributed"
    losses, weights = train(str(tiny_dirs["llama"]))
    assert len(losses) == 4
    np.testing.assert_allclose(ddp.pop("losses"), losses, rtol=1e-5, atol=1e-6)
    assert set(ddp) == set(weights)
    for name, value in weights.items():
        np.testing.assert_allclose(ddp[name], value, rtol=1e-4, atol=2e-6, err_msg=name)
