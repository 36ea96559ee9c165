"""pytest-benchmark harness (`pytest bench/ --benchmark-only`). Without CUDA the fused ops run under the
interpreter (set before triton loads); their CPU timings measure the interpreter, not the kernels."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
