"""Compile the kernels for a CUDA GPU on a machine without one, and launch nothing.

`compile_only(target)` makes a stub the active Triton driver. A launch then goes through Triton exactly as
on that GPU (argument binding, specialisation, compilation with the bundled ptxas, the cache of compiled
variants, `CachedKernel`'s direct path), and reaches a launcher that records it and returns. Uses:

- host-time measurements (`bench/host_overhead.py`): what a step costs on the host around its kernels;
- resource checks: the compiled variants' PTX and cubin for the GPU target (registers, spills, vector widths).

The kernels must be compiled ones: not under TRITON_INTERPRET=1, which makes `@triton.jit` functions
interpreted when they are defined. Pointers are the CPU tensors' addresses: nothing may dereference them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

# Targets by name: A100 (sm_80) and H100 (sm_90, compiled as sm_90a).
TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90a": GPUTarget("cuda", 90, 32)}


@dataclass(slots=True)
class Launch:
    """One recorded launch: the kernel's name, the compiled variant's metadata (hash, num_warps, shared,
    target) and the grid."""

    name: str
    metadata: Any
    grid: tuple[int, int, int]


class _Utils:
    """The device utilities Triton asks the driver for when it loads a compiled kernel."""

    def __init__(self, target: GPUTarget) -> None:
        # H100 and A100 limits: what Triton checks a compiled kernel against before a launch.
        self.properties = {
            "max_shared_mem": 232448 if target.arch >= 90 else 166912,
            "multiprocessor_count": 132 if target.arch >= 90 else 108,
            "max_num_regs": 65536,
            "warpSize": target.warp_size,
        }

    def load_binary(self, name: str, kernel: bytes, shared: int, device: int) -> tuple:
        return None, None, 0, 0, 1024  # module, function, registers, spills, max threads per block

    def unload_module(self, module: Any) -> None:
        return None

    def get_device_properties(self, device: int) -> dict[str, int]:
        return self.properties


@dataclass
class CompileOnlyDriver:
    """A Triton driver for `target` that compiles every variant and records every launch in `launches`."""

    target: GPUTarget
    launches: list[Launch] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.utils = _Utils(self.target)

    def get_current_device(self) -> int:
        return -self.target.arch  # one device per target: Triton keeps its compiled variants per device

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def launcher_cls(self, src: Any, metadata: Any):
        name = metadata.name

        def launch(grid_x: int, grid_y: int, grid_z: int, *args: Any) -> None:
            # Recorded by the driver active at the launch, which may not be the one that loaded the kernel: a
            # variant compiled for another target, launched under this one, is recorded with its own target.
            active = driver._active
            recorder = active if isinstance(active, CompileOnlyDriver) else self
            recorder.launches.append(Launch(name, metadata, (grid_x, grid_y, grid_z)))

        return launch


def active() -> bool:
    """Whether a `CompileOnlyDriver` is Triton's active driver."""
    return isinstance(driver._active, CompileOnlyDriver)


@contextlib.contextmanager
def compile_only(target: GPUTarget = TARGETS["sm_90a"]) -> Iterator[CompileOnlyDriver]:
    """Make a `CompileOnlyDriver` for `target` Triton's active driver for the duration; yields it."""
    stub = CompileOnlyDriver(target)
    previous = driver._active
    driver.set_active(stub)
    try:
        yield stub
    finally:
        driver._active = previous
