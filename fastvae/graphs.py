"""Whole-step CUDA graphs for the training engine (`python -m fastvae.train --cuda-graphs`).

A VAE's step is small: its GPU work takes tens of microseconds, the Python and dispatch around it hundreds.
`GraphedSteps` captures one training step (the batch gathered from the device-resident data into a static
buffer, forward, backward, a capturable Adam step, the device-side statistics) as one CUDA graph and then
runs every step as one copy of the batch's sample indices plus one replay. Before a capture it runs a few
eager warm-up steps on a side stream (allocator, cuBLAS and Triton caches) and then puts the run back in
the state it had before them, so every step of a run is a replay: a resumed run (which captures again)
computes what the uninterrupted one did. What a replay must see anew it reads from device memory:

- the noise: the fused sampler draws its Philox seeds from `functional.DeviceSeeds`, counted on the device:
  seed base + n at step n (the diagnosis of a non-finite step, eager, draws the same);
- the KL weight: a device tensor, refilled (without a host sync) while --kl-warmup changes it;
- the batch: the sample indices, copied into the static index buffer before each replay.

A restored state (a resume, a diagnosis) invalidates the graph; the next step captures it again.
docs/training.md describes the flag, its limits and what has been verified.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from fastvae import functional
from fastvae.distributed import rank_seed

if TYPE_CHECKING:
    from fastvae.engine import Trainer

WARMUP_STEPS = 3  # eager steps before a capture (allocator, cuBLAS and Triton caches), then undone


def noise_base(seed: int, rank: int) -> int:
    """The first Philox seed of a graphed run with --seed `seed`, on rank `rank`: in [2^31, 2^61)."""
    return 2**31 + rank_seed(seed, rank) % (2**61 - 2**31)


class DeviceBeta:
    """The KL weight as a 0-dim float32 tensor on `device`, which the loss reads from device memory: what a
    captured step (--cuda-graphs) and a compiled one (--compile) are given, so that a weight that changes every
    step (--kl-warmup) needs neither a new capture nor a new graph (a float would be a constant of both)."""

    def __init__(self, device: torch.device, value: float) -> None:
        self.value = value
        self.tensor = torch.full((), value, dtype=torch.float32, device=device)

    def set(self, value: float) -> torch.Tensor:
        """The tensor, refilled with `value` if that differs from its value (a fill on the device: no host
        synchronisation)."""
        if value != self.value:
            self.tensor.fill_(value)
            self.value = value
        return self.tensor


class GraphedSteps:
    """The steps of `trainer` as replays of one captured CUDA graph (see the module docstring)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        device = trainer.device
        self.seeds = functional.DeviceSeeds(device, noise_base(trainer.config["seed"], trainer.ctx.rank))
        self.indices = torch.zeros(trainer.train.batch_size, dtype=torch.int64, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def invalidate(self) -> None:
        """The state the graph was captured on has been replaced: the next step captures it again."""
        self.graph = None

    def noise(self, step: int) -> functional.device_seeds:
        """The fused sampler's seeds for an eager run of step `step` (a context manager)."""
        self.seeds.reset(step)
        return functional.device_seeds(self.seeds)

    def step(self, indices: torch.Tensor) -> None:
        """One training step on the samples `indices` (int64, the batch size, on the device)."""
        trainer = self.trainer
        trainer.beta_arg()  # refilled during --kl-warmup: a fill on the device, no host sync
        with current_device(trainer.device):  # a graph captures and replays on the current device's stream
            if self.graph is None:
                self._warm_up(indices)
                self._capture()
            self.indices.copy_(indices)
            self.graph.replay()
        trainer.after_step(len(indices))

    def _warm_up(self, indices: torch.Tensor) -> None:
        """WARMUP_STEPS eager steps on a side stream, as torch.cuda.graphs asks before a capture; then the
        run's state is put back (they do not count). Adam's state is made first, so that what is put back
        holds it: a capture must find it (its lazy initialisation, captured, would zero it on every replay)."""
        trainer = self.trainer
        init_adam_state(trainer.optimizer)
        before = trainer.capture(trainer.train.current_epoch, trainer.train.position)
        with side_stream(trainer.device), self.noise(trainer.step), warnings.catch_warnings():
            # Capturable Adam warns, once, that it steps outside a capture: these steps are meant to.
            warnings.filterwarnings("ignore", message=".*capturable=True.*", category=UserWarning)
            for _ in range(WARMUP_STEPS):
                trainer.step_body(trainer.train.gather(indices), trainer.device_beta.tensor)
        trainer.restore(before)

    def _capture(self) -> None:
        """Capture one step; its replays draw seed base + step, base + step + 1, ... (counted in the graph)."""
        self.seeds.reset(self.trainer.step)  # before the capture: a replay must not reset it
        self.graph = capture(self._body, self.trainer.device)

    def _body(self) -> None:
        """What a replay runs: the step on the samples in the index buffer, drawing from the device seeds."""
        with functional.device_seeds(self.seeds):
            self.trainer.step_body(self.trainer.train.gather(self.indices), self.trainer.device_beta.tensor)


def init_adam_state(optimizer: torch.optim.Adam) -> None:
    """Give every parameter of `optimizer` without state the state Adam's first step would make lazily: step
    0 (a float32 tensor (), float64 for a float64 default dtype unless fused, on the parameter's device when
    capturable or fused, else on the CPU) and zero moments shaped like the parameter, so that a step captured
    in a CUDA graph finds its state rather than creating it."""
    for group in optimizer.param_groups:
        on_device = group["capturable"] or group["fused"]
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            wide = torch.get_default_dtype() == torch.float64 and not group["fused"]  # torch's _get_scalar_dtype
            dtype, device = torch.float64 if wide else torch.float32, p.device if on_device else "cpu"
            state["step"] = torch.zeros((), dtype=dtype, device=device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


@contextlib.contextmanager
def side_stream(device: torch.device) -> Iterator[None]:
    """Run the block on a new stream of `device`, ordered after the current stream's work and before its
    next work."""
    current, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


def capture(body: Callable[[], None], device: torch.device) -> torch.cuda.CUDAGraph:
    """`body`'s device work captured as a CUDA graph (nothing runs) on a new stream of `device`, which must be
    the current device; `replay()` runs it. (torch.cuda.graph's default capture stream is made once per
    process, on whichever device was current then.)"""
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=torch.cuda.Stream(device)):
        body()
    return graph


def current_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Within the block `device` is the current CUDA device (torch.cuda.device); a no-op for another kind."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
