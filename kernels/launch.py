"""Launch helpers shared by the kernels: interpreter detection, block-size heuristics, and `CachedKernel`,
which launches a compiled kernel without Triton's per-launch dispatch, and `empty_contiguous` for outputs."""

from __future__ import annotations

import inspect
import os
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


def _value_class(value: Any) -> Any:
    """What Triton specialises a scalar on, for a value that is not part of the key: an int's width and
    signedness, whether it is 1 and whether it is a multiple of 16; another value's type."""
    if type(value) is not int:
        return type(value)
    return -(2**31) <= value < 2**31, value >> 63, value == 1, value & 15 == 0


class CachedKernel:
    """A `@triton.jit` kernel launched with Triton's dispatch done once per compiled variant.

    `fn[grid](*args, **constexprs)` binds the arguments, specialises them and looks the variant up by a string
    key at every launch: about 10 us of Python, several times a small kernel's run time. `launch` finds the
    variant in its own cache and calls its compiled launcher directly; the first launch of a variant goes
    through Triton, which compiles it. Under TRITON_INTERPRET=1 every launch goes through the interpreter.

    The kernel's parameters come in this order: the pointers (named `*_ptr`; a tensor or None), the ints
    whose exact values key the cache (sizes and strides), the scalars named in `values` (floats, or ints
    such as a seed that change at every launch: keyed by what Triton specialises them on), then the
    `tl.constexpr`s. The key is what determines Triton's own specialisation: per pointer its dtype and
    whether its address is 16-byte aligned, the ints' values, the values' classes, the constexprs and
    num_warps, and the device.
    """

    def __init__(self, fn: Any, values: tuple[str, ...] = ()) -> None:
        self.fn = fn
        params = inspect.signature(fn.fn).parameters  # `fn` may be a JITFunction or an interpreted one
        names = list(params)
        constexprs = [name for name, p in params.items() if "constexpr" in str(p.annotation)]
        self.n_ptr = sum(name.endswith("_ptr") for name in names)
        self.n_exact = len(names) - len(constexprs) - len(values)
        expected = (
            [n for n in names if n.endswith("_ptr")]
            + [n for n in names[self.n_ptr : self.n_exact] if not n.endswith("_ptr")]
            + list(values)
            + constexprs
        )
        if names != expected:
            raise TypeError(f"{fn.__name__}: parameters must be the pointers, the ints, {values}, the constexprs")
        self.constexpr_names = tuple(constexprs)
        self.variants: dict[tuple, Any] = {}

    def launch(self, grid: tuple[int, ...], args: tuple, constexprs: tuple, num_warps: int) -> None:
        """`fn[grid](*args, **dict(zip(constexpr names, constexprs)), num_warps=num_warps)`."""
        if INTERPRET:
            self._through_triton(grid, args, constexprs, num_warps)
            return
        active = driver.active
        device = active.get_current_device()
        n_ptr, n_exact = self.n_ptr, self.n_exact
        key = [device, constexprs, num_warps]  # flat: building nested tuples costs more than the lookup
        for t in args[:n_ptr]:
            if t is None:
                key.append(None)
            else:
                key.append(t.dtype)
                key.append(t.data_ptr() & 15 == 0)
        key += args[n_ptr:n_exact]
        for v in args[n_exact:]:
            key.append(_value_class(v))
        key = tuple(key)
        kernel = self.variants.get(key)
        if kernel is None:
            self.variants[key] = self._through_triton(grid, args, constexprs, num_warps)
            return
        stream = active.get_current_stream(device)
        runtime = knobs.runtime
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
        if _hooked(enter) or _hooked(leave):  # a profiler's hooks: they are given the launch's metadata
            metadata = kernel.launch_metadata(grid, stream, *args, *constexprs)
        else:
            enter = leave = metadata = None
        kernel.run(
            grid[0], grid[1] if len(grid) > 1 else 1, 1, stream, kernel.function, kernel.packed_metadata, metadata,
            enter, leave, *args, *constexprs,
        )  # fmt: skip

    def _through_triton(self, grid: tuple[int, ...], args: tuple, constexprs: tuple, num_warps: int) -> Any:
        """Triton's own launch (compiling the variant if needed); returns the compiled kernel."""
        named = dict(zip(self.constexpr_names, constexprs, strict=True))
        return self.fn[grid](*args, **named, num_warps=num_warps)


def _hooked(hook: Any) -> bool:
    """Whether Triton's launch hook `hook` (a chain of hooks, or None) has anything to call."""
    return hook is not None and bool(getattr(hook, "calls", True))
