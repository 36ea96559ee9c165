"""The ELBO head (sample_latent + elbo_loss, forward+backward) through pytest-benchmark.

    pytest bench/ --benchmark-only

One small case on the CPU; on a GPU the issue's headline case (B=4096, D=784, K=32, fp32) and the latent-diffusion
head (B=8, latents 4x64x64, images 3x512x512, a per-channel log-scale) in fp32 and bf16.
"""

from __future__ import annotations

import pytest
import torch

from bench.elbo_head import Case, backward, head, ldm_cases, make_inputs

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
CASES = [Case(4096, 784, 32, "fp32", "bernoulli"), *ldm_cases(["fp32", "bf16"])] if CUDA else [
    Case(256, 784, 32, "fp32", "bernoulli")
]
IMPLS = ["eager", "compile", "fused"] if CUDA else ["eager", "compile"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.head}-{c.dtype}")
@pytest.mark.parametrize("impl", IMPLS)
def test_elbo_head_forward_backward(benchmark, impl, case):
    fn = head("triton" if impl == "fused" else "torch", case.dist)
    if impl == "compile":
        torch._dynamo.reset()
        fn = torch.compile(fn)
    t = make_inputs(case, DEVICE)

    def step():
        z, loss = fn(t)
        grads = backward(t, z, loss)
        if CUDA:
            torch.cuda.synchronize()
        return grads

    step()  # compile / warm up outside the timing
    grads = benchmark(step)
    assert all(torch.isfinite(g).all() for g in grads)
