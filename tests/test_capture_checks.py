"""What CUDA refuses or routes, modelled by the compile-only driver (`fastvae.kernels.compile_only`) and
checked without a GPU by `capture_probe.py` (run without TRITON_INTERPRET: the kernels compiled for sm_90a):

- a user's documented CUDA-graph recipe, eager warm-up then capture, compiles and loads nothing inside the
  capture (CUDA refuses cuModuleLoadData there), although the capture's sampler reads its seed from memory;
- a capture that reaches a variant never launched fails with one clear error before any CUDA call;
- the launches go to the tensors' device and its current stream, not the current device's.
"""

from __future__ import annotations

import pytest
from helpers import ROOT, compiled_report


@pytest.fixture(scope="module")
def report() -> dict:
    return compiled_report(ROOT / "tests" / "capture_probe.py")


def test_a_warmed_up_capture_compiles_and_loads_nothing(report):
    recipe = report["recipe"]
    assert recipe["error"] is None
    assert recipe["loaded_in_capture"] == []
    # The whole fused step was captured: sampler, loss (two launches), its backward, the sampler's backward.
    assert recipe["captured_launches"] == [
        "_latent_fwd_kernel", "_loglik_kernel", "_elbo_finish_kernel", "_rescale_kernel", "_latent_bwd_kernel",
    ]  # fmt: skip


def test_a_capture_without_warm_up_is_one_clear_error(report):
    error = report["unwarmed"]["error"]
    assert error.startswith("CaptureError: _latent_fwd_kernel: ")
    assert "Run the captured code once eagerly" in error
    assert report["unwarmed"]["loaded"] == []  # refused before Triton loaded anything


def test_launches_go_to_the_tensors_device_and_its_stream(report):
    devices = report["devices"]
    assert devices["launches"] == 5
    assert devices["launch_devices"] == [1] and devices["launch_streams"] == [devices["device_1_stream"]]
    assert devices["current_after"] == 0  # the current device is put back
    assert devices["capture_error"] is None  # the capture's variants were loaded on device 1 as well
