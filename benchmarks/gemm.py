"""fp32 GEMM rate of XLA (jax) vs torch on SmolLM2-135M's linear-layer shapes, 768 tokens (16 x 48).

Explains the fused-step ratio in ``jax.md``: run ``python benchmarks/gemm.py`` on an idle machine.
Each product is ``x [768, in] @ W[out, in]^T`` (HF's weight layout, as both backends store it),
jitted alone for jax, ``F.linear`` for torch; the median of ``REPS`` calls after a warm-up.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

TOKENS, REPS = 768, 30
SHAPES = ((576, 1536), (1536, 576), (576, 576), (576, 192))  # (in, out): gate/up, down, q/o, k/v


def _median_s(call, reps: int = REPS) -> float:
    call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    print(f"torch threads {torch.get_num_threads()}, jax devices {jax.devices()}")
    print("| in -> out | jax GFLOP/s | torch GFLOP/s | torch / jax |\n|---|---:|---:|---:|")
    matmul = jax.jit(lambda x, w: jnp.einsum("ti,oi->to", x, w))
    for d_in, d_out in SHAPES:
        x, w = rng.random((TOKENS, d_in), np.float32), rng.random((d_out, d_in), np.float32)
        jx, jw = jnp.asarray(x), jnp.asarray(w)
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        flop = 2 * TOKENS * d_in * d_out / 1e9
        rate_jax = flop / _median_s(lambda jx=jx, jw=jw: matmul(jx, jw).block_until_ready())
        rate_torch = flop / _median_s(lambda tx=tx, tw=tw: torch.nn.functional.linear(tx, tw))
        print(f"| {d_in} -> {d_out} | {rate_jax:.0f} | {rate_torch:.0f} | {rate_torch / rate_jax:.2f} |")


if __name__ == "__main__":
    main()
