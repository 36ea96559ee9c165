"""Host time of the ELBO head's minimal step through pytest-benchmark (`python -m bench.host_overhead`
measures it properly, with the step without the head subtracted, and counts the launches).

    pytest bench/ --benchmark-only                                                   # on a GPU
    TRITON_INTERPRET=0 pytest bench/test_bench_host_overhead.py --benchmark-only     # on a CPU machine

On a CPU machine the kernels are compiled for sm_90a and each launch is a no-op (the compile-only
driver), which needs TRITON_INTERPRET unset; under the interpreter these are skipped.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from bench.host_overhead import head_steps

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.mark.skipif(
    not CUDA and os.environ.get("TRITON_INTERPRET") == "1",
    reason="without CUDA, needs compiled kernels: run with TRITON_INTERPRET=0",
)
@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_head_step_host_time(benchmark, impl):
    from fastvae.kernels.compile_only import compile_only

    with contextlib.nullcontext() if CUDA else compile_only():
        steps = head_steps(impl, DEVICE)
        steps.step()  # compile and warm up outside the timing
        benchmark(steps.step)
