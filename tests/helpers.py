"""Tolerances and input builders shared by the op tests, and the runner of the compile-only probes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

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



def compiled_report(script: Path) -> dict:
    """Run `script` (a probe under the compile-only driver) with the kernels compiled, i.e. without
    TRITON_INTERPRET, and return the JSON object on the last line it prints."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def raised(run: Callable[[], object]) -> str | None:
    """What `run()` raised, as "Type: message", or None: a probe's report names whatever was raised."""
    try:
        run()
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    return None
