"""A CPU stand-in for `torch.cuda.CUDAGraph` with the semantics the engine depends on.

A CUDA graph capture runs the body's Python once and records the device work it enqueues; a replay runs that
recorded work again, on the same memory, and none of the Python. `StandInGraph` does the same on the CPU:

- capture (`torch.cuda.graph(g)` with `g` a StandInGraph) runs the body once under a `TorchDispatchMode` that
  records every aten op with the tensors it reads and writes, and records each Triton launch at
  `CachedKernel.launch` (the interpreter's own tensor traffic inside a launch is not recorded); the work runs
  so that the Python gets tensors, and the memory that existed before the capture is then put back, since a
  capture runs none of its work (Adam's moments, the parameters and the seed counter are as they were);
- replay re-executes only that work, in order, on the same tensors: an op that allocated its output at
  capture writes the replay's result into that same tensor (a graph's outputs keep their addresses);
  in-place ops mutate their tensors again; allocations are not repeated;
- what CUDA refuses inside a capture raises CaptureError: a host synchronisation (`.item()`, `bool(t)`,
  `.tolist()`: aten's `_local_scalar_dense`), and a launch of a kernel variant not launched (or prepared)
  before the capture began (its module would be loaded inside the capture).

Not modelled: memory pools (the captured tensors are ordinary ones, kept alive by the graph), devices, streams
and their ordering (`side_stream` runs on the one CPU stream), host tensors as opposed to device ones (every
tensor here is a CPU one, so host-side ops that a real graph would not record are replayed, and a
device-to-host copy, which a real capture refuses, is not caught; `.item()` and the like are), the graph's
own RNG offsets (a random op replayed draws from the CPU generator anew, as a replay draws new values), and
timing. Installed by `install`, which
also makes the engine's capturable Adam accept CPU tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from fastvae.kernels.launch import CachedKernel, CaptureError, LaunchPlan
from torch.optim import adam
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
# Allocations: no device work, nothing to replay (their tensors are kept by the ops that write them).
_ALLOCATIONS = {
    aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default, aten.new_empty.default,
    aten.new_empty_strided.default,
}  # fmt: skip


@dataclass
class _AtenOp:
    """A recorded aten op: `func(*args, **kwargs)` returned `out` at capture."""

    func: Any
    args: tuple
    kwargs: dict
    out: Any

    def replay(self) -> None:
        result = self.func(*self.args, **self.kwargs)
        for captured, new in zip(tree_flatten(self.out)[0], tree_flatten(result)[0], strict=True):
            # An output allocated at capture gets the replay's value; a view or an in-place op's output is
            # already its input's memory.
            if isinstance(captured, torch.Tensor) and captured.untyped_storage().data_ptr() != (
                new.untyped_storage().data_ptr()
            ):
                captured.copy_(new)


@dataclass
class _Launch:
    """A recorded Triton launch of `kernel` with `plan` on these tensors and values."""

    kernel: CachedKernel
    plan: LaunchPlan
    pointers: tuple
    values: tuple

    def replay(self) -> None:
        _REAL_LAUNCH(self.kernel, self.plan, self.pointers, self.values)


class _Recorder(TorchDispatchMode):
    """Records the aten ops run under it into `work`, except while `paused` (inside a recorded launch).

    The ops run, so that the body's Python gets tensors to go on with, but a capture must leave memory as it
    found it (CUDA records the work and runs none of it): the first time an op or a launch writes a storage
    that existed before the capture, its bytes are saved, and `undo` puts them back when the capture ends;
    the storages allocated inside the capture are then filled with 0xFF bytes (NaN, or -1), as a real
    capture leaves its outputs unwritten until the first replay."""

    def __init__(self, work: list) -> None:
        super().__init__()
        self.work = work
        self.paused = False
        self.fresh: dict[int, torch.UntypedStorage] = {}  # storages allocated inside the capture, by address
        self.saved: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}

    def save(self, tensors: Any) -> None:
        """Keep the bytes of the pre-capture storages among `tensors` (any nesting) before they are written."""
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.fresh and key not in self.saved:
                    self.saved[key] = (storage, storage.clone())

    def undo(self) -> None:
        for storage, saved in self.saved.values():
            storage.copy_(saved)
        for storage in self.fresh.values():
            storage.fill_(0xFF)
        self.saved.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        if func is aten._local_scalar_dense.default:
            raise CaptureError("a host synchronisation (.item(), bool(t), .tolist()) inside a CUDA graph capture")
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                self.save(kwargs[arg.name] if arg.name in kwargs else args[i] if i < len(args) else None)
        out = func(*args, **kwargs)
        if func in _ALLOCATIONS:
            self.fresh[_storage(out)] = out.untyped_storage()
        else:
            self.work.append(_AtenOp(func, args, kwargs, out))
            inputs = {_storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:  # a view's or an in-place op's output is its input's memory
                if isinstance(t, torch.Tensor) and _storage(t) not in inputs:
                    self.fresh[_storage(t)] = t.untyped_storage()
        return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class StandInGraph:
    """`torch.cuda.CUDAGraph` on the CPU: see the module docstring. `replays` counts the replays."""

    def __init__(self) -> None:
        self.work: list[_AtenOp | _Launch] = []
        self.replays = 0
        self.captured = False
        self.recorder: _Recorder | None = None

    def replay(self) -> None:
        if not self.captured:
            raise RuntimeError("replay of a graph that was not captured")
        self.replays += 1
        with torch._C._AutoDispatchBelowADInplaceOrView():  # the recorded kernels themselves: no autograd
            for item in self.work:
                item.replay()

    def launches(self) -> list[str]:
        """The recorded launches' kernel names, in order."""
        return [item.kernel.fn.__name__ for item in self.work if isinstance(item, _Launch)]


class StandIn:
    """The installed stand-in's state: every graph made, the one capturing now, and the launch plans that
    ran (or were prepared) outside a capture, hence whose variants a real device would have loaded."""

    def __init__(self) -> None:
        self.graphs: list[StandInGraph] = []
        self.capturing: StandInGraph | None = None
        self.loaded: dict[int, LaunchPlan] = {}  # by id; holding the plans keeps their ids unique
        self.synchronized_in_capture = 0

    def new_graph(self) -> StandInGraph:
        self.graphs.append(StandInGraph())
        return self.graphs[-1]

    @contextlib.contextmanager
    def graph(self, g: StandInGraph, *args: Any, **kwargs: Any) -> Iterator[None]:
        """`torch.cuda.graph(g)`: the block is captured into `g`."""
        if self.capturing is not None:
            raise RuntimeError("a capture is already in progress")
        g.work.clear()
        g.recorder = _Recorder(g.work)
        self.capturing = g
        try:
            with g.recorder:
                yield
        finally:
            g.recorder.undo()  # the memory the capture found: none of its work has run
            self.capturing = None
            g.recorder = None
        g.captured = True

    def launch(self, kernel: CachedKernel, plan: LaunchPlan, pointers: tuple, values: tuple = ()) -> bool:
        """`CachedKernel.launch`: returns whether this launch loaded the plan's variant (its first)."""
        g = self.capturing
        if g is None:
            first = id(plan) not in self.loaded
            self.loaded[id(plan)] = plan
            _REAL_LAUNCH(kernel, plan, pointers, values)
            return first
        if id(plan) not in self.loaded:
            raise CaptureError(f"{kernel.fn.__name__}: a variant first launched inside a CUDA graph capture")
        g.work.append(_Launch(kernel, plan, pointers, values))
        g.recorder.paused = True  # the interpreter's copies (and the saving) are not device work
        try:
            g.recorder.save(pointers)  # a kernel may write any of its tensors
            _REAL_LAUNCH(kernel, plan, pointers, values)
        finally:
            g.recorder.paused = False
        return False

    def prepare(self, kernel: CachedKernel, plan: LaunchPlan, pointers: tuple, values: tuple = ()) -> None:
        if self.capturing is not None:
            raise CaptureError(f"{kernel.fn.__name__}: prepared inside a CUDA graph capture")
        self.loaded[id(plan)] = plan

    def synchronize(self, device: Any = None) -> None:
        if self.capturing is not None:
            raise CaptureError("torch.cuda.synchronize inside a CUDA graph capture")


_REAL_LAUNCH = CachedKernel.launch


def install(monkeypatch: Any) -> StandIn:
    """Replace torch.cuda's graphs (CUDAGraph, graph, synchronize, is_current_stream_capturing), the engine's
    side stream, and `CachedKernel.launch` / `prepare` with the stand-in, for a test's duration; capturable
    Adam accepts CPU tensors. Returns the stand-in's state."""
    from fastvae import graphs

    standin = StandIn()
    monkeypatch.setattr(torch.cuda, "CUDAGraph", standin.new_graph)
    monkeypatch.setattr(torch.cuda, "graph", standin.graph)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *args, **kwargs: None)  # one CPU stream
    monkeypatch.setattr(torch.cuda, "synchronize", standin.synchronize)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: standin.capturing is not None)
    monkeypatch.setattr(graphs, "side_stream", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(CachedKernel, "launch", lambda kernel, *args: standin.launch(kernel, *args))
    monkeypatch.setattr(CachedKernel, "prepare", lambda kernel, *args: standin.prepare(kernel, *args))
    supported = adam._get_capturable_supported_devices
    monkeypatch.setattr(adam, "_get_capturable_supported_devices", lambda *a: [*supported(*a), "cpu"])
    return standin
