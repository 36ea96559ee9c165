"""Run by `test_capture_checks.py` without TRITON_INTERPRET: the fused ops under the compile-only driver's
models of what CUDA refuses or routes (kernels compiled for sm_90a, launches recorded, nothing run).

Prints one JSON line with three reports:
- "recipe": a user's CUDA-graph recipe (eager warm-up steps of the fused sampler and loss, then the same step
  captured): what was compiled or loaded during the capture (an error there), and the launches it recorded;
- "unwarmed": a step of new shapes captured without a warm-up: the error it raises;
- "devices": the ops on tensors of emulated device 1 while device 0 is current: the devices and streams of
  their launches, the current device afterwards, and a capture of the step there (after one eager step on
  device 1, its variants for the capture must be loaded on device 1 too).
"""

from __future__ import annotations

import json

import torch
from fastvae.kernels import launch
from fastvae.kernels.compile_only import compile_only
from helpers import raised

import fastvae


def _step(B: int, K: int, D: int) -> None:
    """One fused step's device work: sample, decode (a matmul), the loss, its backward."""
    g = torch.Generator().manual_seed(B)
    mu, logvar = (torch.randn(B, K, generator=g).requires_grad_() for _ in range(2))
    w = torch.randn(K, D, generator=g).requires_grad_()
    x = torch.rand(B, D, generator=g).round()
    z, kl = fastvae.sample_latent(mu, logvar, impl="triton")
    fastvae.elbo_loss(x, z @ w, kl, dist="bernoulli", impl="triton").backward()


def main() -> None:
    report = {}
    with compile_only() as driver:
        for _ in range(3):  # the warm-up torch.cuda.graphs asks for
            _step(6, 5, 24)
        loaded, launches = len(driver.loaded), len(driver.launches)
        with driver.capture():
            error = raised(lambda: _step(6, 5, 24))
        report["recipe"] = {
            "error": error,
            "loaded_in_capture": [name for name, _ in driver.loaded[loaded:]],
            "captured_launches": [launch.name for launch in driver.launches[launches:]],
        }
        with driver.capture():
            report["unwarmed"] = {"error": raised(lambda: _step(7, 3, 9)), "loaded": driver.loaded[loaded:]}
        other = driver.device_id(1)
        real_device_of = launch.device_of
        launch.device_of = lambda t, current: other  # every tensor on emulated device 1
        try:
            before = len(driver.launches)
            _step(6, 5, 24)  # warmed up on device 0 only: device 1 loads its own variants
            ran = driver.launches[before:]
            with driver.capture():
                capture_error = raised(lambda: _step(6, 5, 24))
        finally:
            launch.device_of = real_device_of
        report["devices"] = {
            "launch_devices": sorted({run.device for run in ran}),
            "launch_streams": sorted({run.stream for run in ran}),
            "device_1_stream": driver.stream_of(1),
            "current_after": driver.current,
            "launches": len(ran),
            "capture_error": capture_error,
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
