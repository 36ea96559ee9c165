"""Launch helpers shared by the kernels: interpreter detection, block-size heuristics, and `CachedKernel`,
which launches a compiled kernel without Triton's per-launch dispatch, and `empty_contiguous` for outputs."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from triton import knobs
from triton.runtime import driver

# Under TRITON_INTERPRET=1 each program costs ~10 ms whatever its size, so tiles are made larger
# (fewer programs); on a GPU they are sized for occupancy.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints (triton.cdiv costs a microsecond of constexpr wrapping per call)."""
    return -(-a // b)


def empty_contiguous(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised contiguous tensor of t's shape, device and `dtype` (default t's). `torch.empty_like`
    where it gives that layout (its Python call is about half the host time of `torch.empty`'s)."""
    if (dtype is None or dtype == t.dtype) and t.is_contiguous():
        return torch.empty_like(t)
    return torch.empty(*t.shape, dtype=t.dtype if dtype is None else dtype, device=t.device)


def gpu_tile(rows: int, cols: int, itemsize: int, max_block_cols: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, num_warps) for a kernel over a (rows, cols) array of `itemsize`-byte values,
    compiled for a GPU: up to 8 warps, each thread holding 16 bytes of a row (one 128-bit access: 4 fp32 or
    8 bf16/fp16) when `cols` is a multiple of 16, else 4 values. BLOCK_COLS = min(next_power_of_2(cols),
    max_block_cols); BLOCK_ROWS fills the tile.

    A multiple of 16 is what lets Triton (which specialises an int on divisibility by 16) prove rows 16-byte
    aligned; its layout then gives each thread contiguous values of one row. Otherwise a thread's values lie
    in different rows or need an address each, and 8 or 16 of them took up to 255 registers per thread, with
    spills (docs/design.md, "Compiled resources").
    """
    block_cols = min(next_power_of_2(cols), max_block_cols)
    per_thread = 16 // itemsize if cols % 16 == 0 else 4
    block_rows = max(1, min(next_power_of_2(rows), per_thread * 32 * 8 // block_cols))
    return block_rows, block_cols, max(1, min(8, block_rows * block_cols // (32 * per_thread)))


@dataclass(slots=True)
class LaunchPlan:
    """How one kind of call launches a kernel: the grid, the int arguments whose values Triton specialises
    on (sizes, strides, flags), the constexprs and num_warps, and per device the compiled variant (set by the
    first launch there, which goes through Triton)."""

    grid: tuple[int, int, int]
    ints: tuple[int, ...]
    constexprs: tuple
    num_warps: int
    compiled: dict[Any, Any] = field(default_factory=dict)


class CachedKernel:
    """A `@triton.jit` kernel launched by plans, with Triton's dispatch done once per plan and device.

    `fn[grid](*args, **constexprs)` binds the arguments, specialises them and looks the variant up by a string
    key at every launch: about 10 us of Python, several times a small kernel's run time. A launcher instead
    looks a `LaunchPlan` up in `plans` by a key of its inputs' layouts (shapes, strides, dtypes, 16-byte
    alignment, flags), builds it on a miss with `plan`, and calls `launch(plan, pointers, values)`: the
    first launch of a plan on a device goes through Triton (which compiles the variant if needed), the later
    ones call the variant's compiled launcher directly. Under TRITON_INTERPRET=1 every launch goes through the
    interpreter.

    The key must determine everything Triton specialises on: per pointer its dtype and whether its address
    is 16-byte aligned (fresh allocations are), the ints' values, the `values`' types, and the plan's
    constexprs and num_warps. `tests/test_cached_kernel.py` checks that every public op's plans reach the
    variant Triton's own dispatch would. The kernel's parameters come in this order: the pointers (named
    `*_ptr`; a tensor or None), the plan's ints, the scalars named in `values` (floats, or ints such as a
    seed marked `do_not_specialize`), then the `tl.constexpr`s.
    """

    def __init__(self, fn: Any, values: tuple[str, ...] = ()) -> None:
        self.fn = fn
        params = inspect.signature(fn.fn).parameters  # `fn` may be a JITFunction or an interpreted one
        names = list(params)
        constexprs = [name for name, p in params.items() if "constexpr" in str(p.annotation)]
        n_ptr = sum(name.endswith("_ptr") for name in names)
        n_ints = len(names) - len(constexprs) - len(values)
        expected = (
            [n for n in names if n.endswith("_ptr")]
            + [n for n in names[n_ptr:n_ints] if not n.endswith("_ptr")]
            + list(values)
            + constexprs
        )
        if names != expected:
            raise TypeError(f"{fn.__name__}: parameters must be the pointers, the ints, {values}, the constexprs")
        self.constexpr_names = tuple(constexprs)
        self.plans: dict[tuple, LaunchPlan] = {}

    def plan(self, key: tuple, grid: tuple[int, ...], ints: tuple, constexprs: tuple, num_warps: int) -> LaunchPlan:
        """Record and return the plan of the calls whose inputs have the layouts `key`.

        Raises ValueError for a grid that a CUDA launch refuses: x must be in [1, 2^31 - 1], y and z in
        [1, 65535], and x*y*z below 2^31 (Triton's launcher multiplies them in a C int)."""
        grid = (*grid, 1, 1)[:3]
        for axis, n, limit in zip("xyz", grid, (2**31 - 1, 65535, 65535), strict=True):
            if not 1 <= n <= limit:
                raise ValueError(
                    f"{self.fn.__name__}: grid {axis} = {n} is outside CUDA's limits for grid {axis}, [1, {limit}] "
                    f"(grid {grid}): these inputs are too large, or empty, for one launch of this kernel"
                )
        if grid[0] * grid[1] * grid[2] >= 2**31:
            raise ValueError(
                f"{self.fn.__name__}: grid {grid} has 2^31 or more programs, which overflows the C int that "
                "Triton's launcher counts them in"
            )
        if len(self.plans) >= _MAX_PLANS:  # a run that keeps changing shapes: start over rather than grow
            self.plans.clear()
        plan = self.plans[key] = LaunchPlan(grid, ints, constexprs, num_warps)
        return plan

    def launch(self, plan: LaunchPlan, pointers: tuple, values: tuple = ()) -> bool:
        """`fn[plan.grid](*pointers, *plan.ints, *values, **constexprs, num_warps=plan.num_warps)` on the device
        of the first pointer (a tensor) and that device's current stream, whatever the current device is.
        Returns whether this launch loaded the plan's variant on that device (its first there, through Triton;
        never under TRITON_INTERPRET=1, where nothing is loaded).

        Raises CaptureError, before any CUDA call, when the plan's variant is not yet loaded on that device
        and a CUDA graph is being captured there: compiling and loading a module inside a capture is refused
        by CUDA (see `prepare`)."""
        if INTERPRET:
            self._through_triton(plan, pointers, values)
            return False
        active = driver.active
        current = active.get_current_device()
        device = device_of(pointers[0], current)
        if device == current:
            return self._launch(active, device, plan, pointers, values)
        active.set_current_device(device)  # Triton's launcher uses the current device's context
        try:
            return self._launch(active, device, plan, pointers, values)
        finally:
            active.set_current_device(current)

    def prepare(self, plan: LaunchPlan, pointers: tuple, values: tuple = ()) -> None:
        """Compile and load the plan's variant on the first pointer's device without launching it, so that a
        later launch inside a CUDA graph capture finds it loaded. A no-op under TRITON_INTERPRET=1."""
        if INTERPRET:
            return
        active = driver.active
        current = active.get_current_device()
        device = device_of(pointers[0], current)
        if device in plan.compiled:
            return
        active.set_current_device(device)
        try:
            if capturing(active):
                raise CaptureError(f"{self.fn.__name__}: a variant cannot be loaded during a CUDA graph capture")
            named = dict(zip(self.constexpr_names, plan.constexprs, strict=True))
            kernel = self.fn.warmup(*pointers, *plan.ints, *values, grid=plan.grid, **named, num_warps=plan.num_warps)
            kernel.run  # noqa: B018 -- the property loads the module on the current device (`_init_handles`)
            plan.compiled[device] = kernel
        finally:
            active.set_current_device(current)

    def _launch(self, active: Any, device: int, plan: LaunchPlan, pointers: tuple, values: tuple) -> bool:
        """The launch on `device`, which is the current device; whether it loaded the variant there."""
        kernel = plan.compiled.get(device)
        if kernel is None:
            if capturing(active):
                raise CaptureError(
                    f"{self.fn.__name__}: this kernel variant (grid {plan.grid}, constexprs {plan.constexprs}) was "
                    "not loaded before the CUDA graph capture began, and CUDA refuses to load a module inside a "
                    "capture. Run the captured code once eagerly, with the same shapes, dtypes and device, before "
                    "capturing it."
                )
            plan.compiled[device] = self._through_triton(plan, pointers, values)
            return True
        stream = active.get_current_stream(device)
        runtime = knobs.runtime
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
        if _hooked(enter) or _hooked(leave):  # a profiler's hooks: they are given the launch's metadata
            metadata = kernel.launch_metadata(plan.grid, stream, *pointers, *plan.ints, *values, *plan.constexprs)
        else:
            enter = leave = metadata = None
        grid = plan.grid
        kernel.run(
            grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, metadata, enter, leave,
            *pointers, *plan.ints, *values, *plan.constexprs,
        )  # fmt: skip
        return False

    def _through_triton(self, plan: LaunchPlan, pointers: tuple, values: tuple) -> Any:
        """Triton's own launch on the current device (compiling the variant if needed); returns the compiled
        kernel."""
        named = dict(zip(self.constexpr_names, plan.constexprs, strict=True))
        return self.fn[plan.grid](*pointers, *plan.ints, *values, **named, num_warps=plan.num_warps)


class CaptureError(RuntimeError):
    """A kernel variant would be compiled or loaded while a CUDA graph is being captured."""


def device_of(t: torch.Tensor, current: int) -> int:
    """The Triton device a launch on tensor `t` goes to: its CUDA device's index; `current` (the current
    device) for a CPU tensor, as under the compile-only driver."""
    index = t.get_device()
    return current if index < 0 else index


def capturing(active: Any) -> bool:
    """Whether a CUDA graph is being captured on the current stream: a driver's own `capturing` flag (the
    compile-only driver's), else torch's."""
    flag = getattr(active, "capturing", None)
    return torch.cuda.is_current_stream_capturing() if flag is None else flag


_MAX_PLANS = 1024


def layout(t: torch.Tensor | None) -> tuple | None:
    """A launch plan's key for an optional tensor argument: None, or its shape, strides, dtype and whether
    its address is 16-byte aligned."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() & 15 == 0)


def _hooked(hook: Any) -> bool:
    """Whether Triton's launch hook `hook` (a chain of hooks, or None) has anything to call."""
    return hook is not None and bool(getattr(hook, "calls", True))
