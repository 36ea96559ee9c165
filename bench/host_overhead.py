"""Host time and launches of the ELBO head and of one training step: the Python, dispatch and launch work
around the kernels, which is what a launch-bound step costs on a GPU.

Measured in one run, on one thread, at tiny shapes (the compute is about zero), as the CPU time of the
thread that runs the step. The steps compared are timed in --rounds interleaved rounds (each round times
every one of them for --reps / --rounds steps, in turn), so that a slow spell of a shared machine weighs on
all of them alike; a figure is the median over the rounds of each round's median:

  head     sample_latent + elbo_loss, forward and backward, for
             fused    impl="triton". Without CUDA the kernels are compiled for an H100 (sm_90a) by the
                      compile-only driver (fastvae/kernels/compile_only.py) and each launch is a no-op, so
                      what is timed is all the host work up to the driver's launch call; on CUDA, real launches
             eager    impl="torch", the PyTorch reference
             compile  torch.compile of the reference head
             shaped   impl="triton" on a feature-map latent (B, 1, 2, 2) and images (B, 1, 4, 4) (the same K
                      and D): the fused figure plus the cost of the ops' handling of such shapes (checks,
                      flattened views, z in the latent's shape)
             floor    two bare autograd Functions with the fused path's allocations, and nothing else (no
                      checks, seed or launches): what any design of two Python Functions costs on this host
           and, with --breakdown, where the fused figure goes (each row is fused less one layer):
             functions    the fused autograd Functions called directly with a fixed seed: no public
                          function, checks or seed draw
             no launches  the same with every launch skipped (`CachedKernel.launch` a no-op): what is left
                          is the Functions' and launchers' own work (keys, plans, context, allocations)
           host us: a minimal step (leaves mu, logvar (B, K) and W (K, D): z, kl = head; out = z @ W; loss;
           backward) minus the same step without the head (out = mu @ W; loss = out.sum(); backward).
           launches: the head's forward and backward alone (leaves mu, logvar, out; autograd.grad of loss and z,
           with both upstream gradients given), so that every launch counted is the head's.
  engine   one step of fastvae's training engine (`Trainer.train_step`: the step, the non-finite guard's
           device-side sums, Adam) against a bare eager loop (model.loss, zero_grad, backward, Adam) on a
           tiny MLP VAE with the fused ops.

Launches: on CUDA, the GPU activities (kernels, copies, memsets) the profiler sees. Without CUDA, the Triton
launches the compile-only driver records plus the torch ops that would each launch a kernel (every op the
dispatcher sees but views, detach and allocations); the fused sampler's seed, drawn from the CPU generator,
is host work and is not counted. torch.compile's kernels cannot be counted without CUDA ("-").

Usage:  python -m bench.host_overhead [--reps 2000] [--rounds 5] [--impls fused eager compile floor] [--breakdown]
                                     [--json PATH]
It must run with TRITON_INTERPRET unset: the interpreter would run the kernels instead.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from fastvae.kernels.launch import CachedKernel
from fastvae.kernels.likelihood import DKL, STATE_SIZE
from rich.console import Console
from rich.table import Table

import fastvae
from bench.elbo_head import CountOps, cuda_launches
from bench.environment import environment
from fastvae import functional
from fastvae.data import DataSplits, DeviceBatches
from fastvae.engine import Trainer, synchronize
from fastvae.options import build_model, build_parser, make_config

IMPLS = ("fused", "eager", "compile", "floor", "shaped")
BREAKDOWN = ("functions", "no launches")
B, K, D = 8, 4, 16  # tiny: the compute is about zero
LATENT_MAP, IMAGE = (1, 2, 2), (1, 4, 4)  # the shaped head's latent and sample shapes: K and D values


@dataclass
class Result:
    name: str  # "head" or "engine"
    impl: str  # fused / eager / compile, or engine / bare loop
    host_us: float  # median host time per step (the head: the step minus the step without it)
    step_us: float  # median host time of the whole step
    baseline_us: float | None  # the step without the head (head rows only)
    launches: int | None  # device launches per step (None: not countable here)
    triton_launches: int | None
    rounds_us: list[float] | None = None  # host_us of each round (their median is host_us)


# ------------------------------------------------------------------------------------------- counting


@contextlib.contextmanager
def _seed_draws_uncounted() -> Iterator[None]:
    """The fused sampler's seed comes from the CPU generator: host work even on a GPU, so not a launch."""
    draw = functional._draw_seed

    def uncounted(device: torch.device) -> int | torch.Tensor:
        with torch.utils._python_dispatch._disable_current_modes():
            return draw(device)

    functional._draw_seed = uncounted
    try:
        yield
    finally:
        functional._draw_seed = draw


def count_launches(step: Callable[[], object], device: torch.device, driver) -> tuple[int | None, int | None]:
    """(launches, Triton launches) of one call of `step`: the profiler's on CUDA, counted without it."""
    if device.type == "cuda":
        return cuda_launches(step), None
    recorded = len(driver.launches)
    with _seed_draws_uncounted(), CountOps() as counter:
        step()
    triton_launches = len(driver.launches) - recorded
    return counter.ops + triton_launches, triton_launches


def median_us(step: Callable[[], object], device: torch.device, reps: int, warmup: int = 20) -> float:
    """Median host microseconds of `step`: the CPU time of this thread (so another process on the machine
    does not inflate it), each step started from an idle device (so no launch waits on a full queue)."""
    times = []
    for i in range(warmup + reps):
        synchronize(device)
        start = time.thread_time()
        step()
        if i >= warmup:
            times.append(time.thread_time() - start)
    return statistics.median(times) * 1e6


# ---------------------------------------------------------------------------------------------- head


def _leaves(device: torch.device, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g).to(device).requires_grad_(True) for shape in shapes]


class _BareLatent(torch.autograd.Function):
    """The floor's latent step: the fused one's saved tensors and allocations, no checks, no seed, no launch."""

    @staticmethod
    def forward(ctx, mu, logvar):
        ctx.save_for_backward(mu, logvar)
        ctx.set_materialize_grads(False)
        return torch.empty_like(mu), torch.empty(mu.shape[0], dtype=torch.float32, device=mu.device)

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        mu, logvar = ctx.saved_tensors
        return torch.empty_like(mu), torch.empty_like(logvar)


class _BareLoss(torch.autograd.Function):
    """The floor's loss: the fused one's allocations (state with the rows' log p, the stash, the loss) and its
    gradients (the stash, a broadcast view for the KL), no checks, no launch."""

    @staticmethod
    def forward(ctx, out, kl):
        ctx.set_materialize_grads(False)
        state = torch.empty(STATE_SIZE + out.shape[0], dtype=torch.float32, device=out.device)
        ctx.stash = torch.empty_like(out), state
        ctx.mark_non_differentiable(state)
        return torch.empty((), dtype=torch.float32, device=out.device), state

    @staticmethod
    def backward(ctx, grad, _state):
        dout, state = ctx.stash
        return dout, state.as_strided((state.shape[0] - STATE_SIZE,), (0,), DKL)


_FIXED_SEED = 2**40  # the breakdown's Functions take this seed instead of drawing one


def _launches_skipped(fn: Callable[[], None]) -> Callable[[], None]:
    """`fn` with `CachedKernel.launch` a no-op for the duration of each call (the "no launches" row)."""
    launch = CachedKernel.launch

    def skip(kernel, plan, pointers, values=()) -> None:
        return None

    def skipped() -> None:
        CachedKernel.launch = skip
        try:
            fn()
        finally:
            CachedKernel.launch = launch

    return skipped


def head_fn(impl: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """(mu, logvar, out-from-z, x) -> (z, loss) of the Bernoulli ELBO head; `impl` as in bench.elbo_head, "shaped"
    (the fused ops, given shaped inputs by `head_steps`), or
    "floor": two bare autograd Functions with the fused path's allocations and nothing else (no checks, no
    seed, no launches), the part of the fused host time that no design of two Python Functions avoids."""
    if impl == "floor":

        def bare(mu, logvar, decode, x):
            z, kl = _BareLatent.apply(mu, logvar)
            return z, _BareLoss.apply(decode(z), kl)[0]

        return bare
    if impl in BREAKDOWN:  # "no launches" also needs its launches skipped: see head_steps
        from fastvae.ops import ElboLoss, SampleLatent

        def functions(mu, logvar, decode, x):
            z, kl = SampleLatent.apply(mu, logvar, _FIXED_SEED, 1, False)
            return z, ElboLoss.apply(x, decode(z), kl, None, 0.0, "bernoulli", 1.0, False)[0]

        return functions
    ops_impl = "torch" if impl in ("eager", "compile") else "triton"

    def head(mu, logvar, decode, x):
        z, kl = fastvae.sample_latent(mu, logvar, impl=ops_impl)
        return z, fastvae.elbo_loss(x, decode(z), kl, dist="bernoulli", impl=ops_impl)

    if impl == "compile":
        torch._dynamo.reset()
        return torch.compile(head)
    return head


@dataclass
class HeadSteps:
    """The steps `measure_head` times and counts, on one set of tiny inputs."""

    step: Callable[[], None]  # the minimal step with the head
    without_head: Callable[[], None]  # the same step without it
    head_alone: Callable[[], None]  # the head's forward and backward, nothing else


def head_steps(impl: str, device: torch.device) -> HeadSteps:
    latent, sample = ((B, *LATENT_MAP), (B, *IMAGE)) if impl == "shaped" else ((B, K), (B, D))
    mu, logvar, weight = _leaves(device, latent, latent, (K, D))
    x = torch.rand(B, D, generator=torch.Generator().manual_seed(1)).round().to(device).view(sample)
    head = head_fn(impl)
    if impl == "shaped":  # a linear decoder to images; the step without the head decodes mu alike

        def decode(z):
            return (z.flatten(1) @ weight).view(sample)
    else:

        def decode(z):
            return z @ weight

    def step():
        _, loss = head(mu, logvar, decode, x)
        loss.backward()
        mu.grad = logvar.grad = weight.grad = None

    def without_head():
        decode(mu).sum().backward()
        mu.grad = weight.grad = None

    out, grad_z = _leaves(device, sample, latent)
    one = torch.ones((), device=device)

    def head_alone():
        z, loss = head(mu, logvar, lambda _: out, x)
        torch.autograd.grad([loss, z], [mu, logvar, out], [one, grad_z.detach()])

    if impl == "no launches":
        return HeadSteps(_launches_skipped(step), without_head, _launches_skipped(head_alone))
    return HeadSteps(step, without_head, head_alone)


def interleaved(steps: dict[str, Callable[[], object]], device: torch.device, reps: int, rounds: int) -> dict:
    """{name: [median host us of each round]}: `rounds` rounds, each timing every step for reps // rounds
    steps in turn, so that a slow spell of the machine weighs on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(median_us(step, device, max(1, reps // rounds)))
    return times


def measure_heads(impls: list[str], device: torch.device, reps: int, rounds: int, driver) -> list[Result]:
    """The head of each impl, timed in interleaved rounds (each round: every impl's step and the step without
    the head); host_us is the median over the rounds of (step - without)."""
    heads = {impl: head_steps(impl, device) for impl in impls}
    steps = {(impl, part): getattr(h, part) for impl, h in heads.items() for part in ("step", "without_head")}
    times = interleaved(steps, device, reps, rounds)
    results = []
    for impl, h in heads.items():
        with_head, without = times[impl, "step"], times[impl, "without_head"]
        per_round = [a - b for a, b in zip(with_head, without, strict=True)]
        launches, triton_launches = (None, None)
        if impl != "compile" or device.type == "cuda":
            h.head_alone()  # warm
            launches, triton_launches = count_launches(h.head_alone, device, driver)
        results.append(Result(
            "head", impl, statistics.median(per_round), statistics.median(with_head), statistics.median(without),
            launches, triton_launches, per_round,
        ))  # fmt: skip
    return results


# -------------------------------------------------------------------------------------------- engine


def tiny_trainer(device: torch.device) -> Trainer:
    """The engine as `python -m fastvae.train --fused` builds it, on a tiny MLP VAE (D=16, 8 hidden, K=4)."""
    data = torch.randint(0, 256, (64, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    splits = DataSplits(data, data[:16], "tiny")
    argv = ["--fused", "--likelihood", "bernoulli", "--hidden", "8", "--latent-dim", str(K), "--batch-size", str(B)]
    config = make_config(build_parser().parse_args(argv), device, splits)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    batches = DeviceBatches(splits.train, B, device=device, seed=0)
    return Trainer(config, model, batches, batches, io.StringIO(), device)


def measure_engine(device: torch.device, reps: int, rounds: int, driver) -> list[Result]:
    trainer = tiny_trainer(device)
    x = next(iter(trainer.train.epoch(0)))
    model, optimizer = trainer.model, trainer.optimizer

    def bare_step():
        out = model.loss(x)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    steps = {"engine": lambda: trainer.train_step(x), "bare loop": bare_step}
    times = interleaved(steps, device, reps, rounds)
    results = []
    for impl, step in steps.items():
        us = statistics.median(times[impl])
        launches, triton_launches = count_launches(step, device, driver)
        results.append(Result("engine", impl, us, us, None, launches, triton_launches, times[impl]))
    return results


# ------------------------------------------------------------------------------------------- reporting


def render(results: list[Result], env: dict[str, str]) -> Table:
    table = Table(title=f"Host overhead on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
                  f"commit {env['commit']})")  # fmt: skip
    for column in ("step", "impl", "host us", "vs fused", "launches", "Triton launches", "step us", "without us"):
        table.add_column(column, justify="right")
    fused = {r.name: r for r in results if r.impl in ("fused", "engine")}
    for r in results:
        ref = fused.get(r.name)
        ratio = f"{r.host_us / ref.host_us:.1f}x" if ref and r is not ref and ref.host_us > 0 else "-"
        table.add_row(
            r.name, r.impl, f"{r.host_us:.1f}", ratio, "-" if r.launches is None else str(r.launches),
            "-" if r.triton_launches is None else str(r.triton_launches), f"{r.step_us:.1f}",
            "-" if r.baseline_us is None else f"{r.baseline_us:.1f}",
        )  # fmt: skip
    return table


def main(argv: list[str] | None = None) -> list[Result]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=2000, help="timed steps per measurement, over all rounds")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (host us: the median over them)")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="head implementations")
    p.add_argument("--breakdown", action="store_true", help="add the fused head's parts: " + ", ".join(BREAKDOWN))
    p.add_argument("--no-engine", action="store_true", help="skip the engine step")
    p.add_argument("--json", default=None, help="write results and environment here")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("this measures compiled kernels' launches, not the interpreter: run it with TRITON_INTERPRET unset")
    torch.set_num_threads(1)
    device = torch.device("cuda" if cuda else "cpu")
    env = environment(device)
    if not cuda:
        env["launches"] = "compile-only driver (sm_90a): no-op launches"
    from fastvae.kernels.compile_only import compile_only

    with contextlib.nullcontext(None) if cuda else compile_only() as driver:
        impls = args.impls + list(BREAKDOWN if args.breakdown else ())
        results = measure_heads(impls, device, args.reps, args.rounds, driver)
        if not args.no_engine:
            results += measure_engine(device, args.reps, args.rounds, driver)
    Console(width=max(Console().width, 120)).print(render(results, env))
    if args.json:
        settings = {"reps": args.reps, "rounds": args.rounds, "B": B, "K": K, "D": D, "threads": 1,
                    "command": " ".join(sys.argv)}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"benchmark": "host_overhead", "environment": env, "settings": settings,
                       "results": [asdict(r) for r in results]}, f, indent=2)  # fmt: skip
    return results


if __name__ == "__main__":
    main()
