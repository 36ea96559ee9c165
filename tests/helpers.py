"""Tolerances and input builders shared by the op tests."""

from __future__ import annotations

import torch

# The device the fused kernels run on in this session: the GPU, or the CPU under the interpreter.
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Tolerances for a tensor *stored* in this dtype, compared with a float64 reference computed from
# the same (already rounded) inputs: the kernels compute in fp32, so the error is fp32 arithmetic
# plus one rounding of the output. fp32 outputs (KL, log p) use the float32 row whatever the inputs.
TOLERANCES = {
    torch.float32: {"rtol": 2e-5, "atol": 2e-5},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Compare in float64; `scale` widens atol for sums over many terms (e.g. sqrt(D))."""
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=tol["rtol"], atol=tol["atol"] * scale, equal_nan=True
    )

