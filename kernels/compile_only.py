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
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from .launch import CaptureError

# Targets by name: A100 (sm_80) and H100 (sm_90, compiled as sm_90a).
TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90a": GPUTarget("cuda", 90, 32)}
DEVICES = 4  # emulated devices per target


@dataclass(slots=True)
class Launch:
    """One recorded launch: the kernel's name, the compiled variant's metadata (hash, num_warps, shared,
    target) and the grid."""

    name: str
    metadata: Any
    grid: tuple[int, int, int]
    device: int = 0  # the emulated device's index
    stream: int = 0  # the stream it was launched on (see `CompileOnlyDriver.stream_of`)


class _Utils:
    """The device utilities Triton asks the driver for when it loads a compiled kernel."""

    def __init__(self, target: GPUTarget, owner: CompileOnlyDriver) -> None:
        self.owner = owner
        # H100 and A100 limits: what Triton checks a compiled kernel against before a launch.
        self.properties = {
            "max_shared_mem": 232448 if target.arch >= 90 else 166912,
            "multiprocessor_count": 132 if target.arch >= 90 else 108,
            "max_num_regs": 65536,
            "warpSize": target.warp_size,
        }

    def load_binary(self, name: str, kernel: bytes, shared: int, device: int) -> tuple:
        if self.owner.capturing:  # cuModuleLoadData: "operation not permitted when stream is capturing"
            raise CaptureError(f"{name} was loaded while a CUDA graph was being captured")
        self.owner.loaded.append((name, device))
        # module, function (a handle of its device's context), registers, spills, max threads per block
        return None, (name, device), 0, 0, 1024

    def unload_module(self, module: Any) -> None:
        return None

    def get_device_properties(self, device: int) -> dict[str, int]:
        return self.properties


@dataclass
class CompileOnlyDriver:
    """A Triton driver for `target` that compiles every variant and records every launch in `launches`.

    It models what the CUDA driver refuses or routes, so that tests see it without a GPU:
    - devices: `DEVICES` emulated devices of the target, each with its own current stream; `set_current_device`
      switches as `torch.cuda.set_device` does, and each launch records the device and stream it went to;
    - CUDA graph captures (`capture()`): while one is in progress a module load (`load_binary`) or a compile
      raises CaptureError, as cuModuleLoadData inside a capture fails;
    - `loaded`: every (kernel name, device) loaded.
    """

    target: GPUTarget
    launches: list[Launch] = field(default_factory=list)
    loaded: list[tuple[str, int]] = field(default_factory=list)
    capturing: bool = False  # read by `fastvae.kernels.launch.capturing`
    current: int = 0  # the current device's index

    def __post_init__(self) -> None:
        self.utils = _Utils(self.target, self)

    def device_id(self, index: int) -> int:
        """Triton's id of emulated device `index`: distinct per target, since Triton keeps its compiled
        variants per device id."""
        return -(self.target.arch * DEVICES + index)

    def index_of(self, device: int) -> int:
        return -device - self.target.arch * DEVICES

    def get_current_device(self) -> int:
        return self.device_id(self.current)

    def set_current_device(self, device: int) -> None:
        index = self.index_of(device)
        if not 0 <= index < DEVICES:
            raise ValueError(f"no emulated device {device}")
        self.current = index

    def stream_of(self, index: int) -> int:
        """The current stream's handle on emulated device `index` (distinct per device)."""
        return 0x1000 + index

    def get_current_stream(self, device: int | None = None) -> int:
        return self.stream_of(self.current if device is None else self.index_of(device))

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Within the block a CUDA graph capture is in progress: a kernel compiled or loaded raises
        CaptureError (Triton's compile hook, and `load_binary`); `fastvae.functional` draws device seeds."""
        def refuse(*, key: Any, repr: str, **kwargs: Any) -> None:
            raise CaptureError(f"{repr.partition('[')[0]} was compiled while a CUDA graph was being captured")

        previous, knobs.runtime.jit_cache_hook = knobs.runtime.jit_cache_hook, refuse
        self.capturing = True
        try:
            yield
        finally:
            self.capturing = False
            knobs.runtime.jit_cache_hook = previous

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def launcher_cls(self, src: Any, metadata: Any):
        name = metadata.name

        def launch(grid_x: int, grid_y: int, grid_z: int, *args: Any) -> None:
            # A grid that CUDA refuses (x up to 2^31 - 1, y and z up to 65535: CUDA_ERROR_INVALID_VALUE) raises,
            # as Triton's launcher does there; so does one that its launcher skips or mishandles: a dimension of
            # 0 (it launches nothing) or 2^31 programs or more (it multiplies the dimensions in a C int).
            if not (
                0 < grid_x < 2**31 and 0 < grid_y <= 65535 and 0 < grid_z <= 65535 and grid_x * grid_y * grid_z < 2**31
            ):
                raise RuntimeError(
                    f"Triton Error [CUDA]: invalid argument: {name} launched with grid {(grid_x, grid_y, grid_z)}, "
                    "outside CUDA's limits (x in [1, 2^31 - 1], y and z in [1, 65535], under 2^31 programs)"
                )
            # Recorded by the driver active at the launch, which may not be the one that loaded the kernel: a
            # variant compiled for another target, launched under this one, is recorded with its own target.
            active = driver._active
            recorder = active if isinstance(active, CompileOnlyDriver) else self
            loaded_on = args[1][1]  # the function handle `load_binary` made: (name, device)
            if recorder is self and loaded_on != self.get_current_device():
                raise RuntimeError(
                    f"Triton Error [CUDA]: invalid resource handle: {name}, loaded on device "
                    f"{self.index_of(loaded_on)}, launched on device {self.current}"
                )
            recorder.launches.append(Launch(name, metadata, (grid_x, grid_y, grid_z), recorder.current, args[0]))

        return launch


def active() -> bool:
    """Whether a `CompileOnlyDriver` is Triton's active driver."""
    return isinstance(driver._active, CompileOnlyDriver)


def capturing() -> bool:
    """Whether the active driver is a `CompileOnlyDriver` within `capture()`."""
    return active() and driver._active.capturing


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
