"""Launch helpers shared by the kernels: interpreter detection, block-size heuristics, and `CachedKernel`,
which launches a compiled kernel without Triton's per-launch dispatch."""

from __future__ import annotations

import os
from collections.abc import Sequence
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


def _specialization(args: Sequence[Any]) -> tuple:
    """What Triton specialises a compiled variant on, per runtime argument: a tensor's dtype and whether its
    address is 16-byte aligned; an int's width (32, 64 bits or unsigned 64) and whether it is 1 or a
    multiple of 16; a float's or a bool's type. Equal tuples select the same compiled variant."""
    key = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            key.append((arg.dtype, arg.data_ptr() & 15 == 0))
        elif type(arg) is int:
            width = 32 if -(2**31) <= arg < 2**31 else 64 if -(2**63) <= arg < 2**63 else 128
            key.append(1 if arg == 1 else width + (arg & 15 == 0))
        else:
            key.append(type(arg))
    return tuple(key)


class CachedKernel:
    """A `@triton.jit` kernel launched with Triton's dispatch done once per compiled variant.

    `fn[grid](*args, **constexprs)` binds the arguments, specialises them and looks the variant up by a string
    key at every launch: about 10 us of Python, several times a small kernel's run time. `launch` finds the
    variant by a tuple of the same specialisation (`_specialization`) and calls its compiled launcher
    directly; the first launch of a variant goes through Triton, which compiles it. Under TRITON_INTERPRET=1
    every launch goes through the interpreter.

    The runtime arguments are passed positionally in the kernel's order; the constexprs, which follow them
    in the kernel's signature, by value in their order.
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        names = list(fn.arg_names)
        constexprs = [names[i] for i in sorted(fn.constexprs)]
        if names[len(names) - len(constexprs) :] != constexprs:
            raise TypeError(f"{fn.__name__}: the tl.constexpr parameters must come last")
        self.constexpr_names = tuple(constexprs)
        self.variants: dict[tuple, Any] = {}

    def launch(self, grid: tuple[int, ...], args: tuple, constexprs: tuple, num_warps: int) -> None:
        """`fn[grid](*args, **dict(zip(constexpr names, constexprs)), num_warps=num_warps)`."""
        if INTERPRET:
            self._through_triton(grid, args, constexprs, num_warps)
            return
        device = driver.active.get_current_device()
        key = (device, constexprs, num_warps, _specialization(args))
        kernel = self.variants.get(key)
        if kernel is None:
            self.variants[key] = self._through_triton(grid, args, constexprs, num_warps)
            return
        stream = driver.active.get_current_stream(device)
        grid = (*grid, 1, 1)
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        if _hooked(enter) or _hooked(leave):  # a profiler's hooks: they are given the launch's metadata
            metadata = kernel.launch_metadata(grid, stream, *args, *constexprs)
        else:
            enter = leave = metadata = None
        kernel.run(
            grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, metadata, enter, leave,
            *args, *constexprs,
        )  # fmt: skip


    def _through_triton(self, grid: tuple[int, ...], args: tuple, constexprs: tuple, num_warps: int) -> Any:
        """Triton's own launch (compiling the variant if needed); returns the compiled kernel."""
        named = dict(zip(self.constexpr_names, constexprs, strict=True))
        return self.fn[grid](*args, **named, num_warps=num_warps)


def _hooked(hook: Any) -> bool:
    """Whether Triton's launch hook `hook` (a chain of hooks, or None) has anything to call."""
    return hook is not None and bool(getattr(hook, "calls", True))
