"""Benchmark of the ELBO head: `sample_latent` + `elbo_loss`, forward and backward.

Implementations, measured in the same run:
  eager    the pure-PyTorch reference (impl="torch")
  compile  torch.compile of the reference
  fused    fastvae's fused ops (impl="triton"; on the CPU only under TRITON_INTERPRET=1,
           where it is counted but not timed: the interpreter's speed means nothing)

The decoder is left out: `out` (B, D) is a given tensor, and the gradient reaching z is a fixed
random tensor, so both ops' backward passes run.

Heads:
  flat     mu, logvar (B, K), x and out (B, D), unit variance (--batch, --dim, --latent)
  ldm      (--ldm) latent diffusion's KL autoencoder at 512 px: B=8, mu, logvar (8, 4, 64, 64), x and out
           (8, 3, 512, 512), a Gaussian with a learned log-scale per channel (3, 1, 1), in each --dtype:
           the ops on feature maps and images as they are (D = 786432, K = 16384)

Reported per case:
  time     ms of forward, backward, and forward+backward as called, launches included (CUDA: the mean of
           triton.testing.do_bench over rotating input buffers; CPU: perf_counter medians)
  graph    (CUDA) ms of forward+backward replayed from a captured CUDA graph: device time only
  GB/s     (CUDA) design bytes of the fused op / the graph time (the as-called time where the step could
           not be captured), against a measured device copy bandwidth
  saved    bytes autograd keeps from forward to backward: saved tensors (saved-tensor hooks) and tensors
           held on the graph's nodes (the fused loss's gradient stash), each storage counted once
  ops      ops per forward+backward step that do work (TorchDispatchMode; views, allocations and
           aliases left out): on a GPU each is a kernel launch; a fused-kernel launch counts as one op
  moved    bytes read+written by those ops, counting every tensor argument and result once per op
           (a launch counts its tensor arguments): a device-independent model of memory
           traffic. It over-counts the fused loss's in-place rescale, which reads nothing on the device
           when the upstream gradient is 1
  peak     (CUDA) peak memory allocated above the inputs
  launches (CUDA) GPU activities (kernels, memsets, copies) per forward+backward step, from torch.profiler

Usage:  python -m bench.elbo_head [--batch B ...] [--dim D ...] [--latent K ...] [--ldm] [--json PATH]
The issue's headline case: python -m bench.elbo_head --batch 4096 --dim 784 --latent 32
The latent-diffusion head: python -m bench.elbo_head --ldm
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch.utils._python_dispatch import TorchDispatchMode

import fastvae
from bench.environment import copy_bandwidth_gbs, environment

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# Per head: the latent's and a sample's shapes (None: (K,) and (D,)) and the learned log-scale's (None: none).
HEADS = {
    "flat": {"latent": None, "data": None, "log_scale": None},
    "ldm": {"latent": (4, 64, 64), "data": (3, 512, 512), "log_scale": (3, 1, 1)},
}


@dataclass
class Case:
    B: int
    D: int  # prod of the data shape
    K: int  # prod of the latent shape
    dtype: str
    dist: str
    head: str = "flat"  # a key of HEADS


def ldm_cases(dtypes: list[str]) -> list[Case]:
    """The latent-diffusion head in each dtype."""
    shapes = HEADS["ldm"]
    return [Case(8, math.prod(shapes["data"]), math.prod(shapes["latent"]), d, "gaussian", "ldm") for d in dtypes]


@dataclass
class Result:
    case: Case
    impl: str
    fwd_ms: float | None = None
    bwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    saved_bytes: int = 0
    ops_per_step: int = 0
    moved_bytes: int = 0
    peak_extra_bytes: int | None = None
    launches_per_step: int | None = None
    graph_ms: float | None = None  # fwd+bwd replayed from a captured CUDA graph: device time only
    graph_error: str | None = None  # why the step could not be captured in a CUDA graph
    gbs: float | None = None  # (fused) design bytes per step / the graph time, else / the as-called time


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs drawn on the device (a CPU draw of the bandwidth case's B x D would take seconds)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]

    def rand(*shape, scale=1.0, leaf=True):
        t = (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)
        return t.requires_grad_(leaf)

    shapes = HEADS[case.head]
    latent, data = (case.B, *(shapes["latent"] or (case.K,))), (case.B, *(shapes["data"] or (case.D,)))
    x = torch.rand(*data, generator=g, device=device).to(dtype)
    if case.dist == "bernoulli":
        x = x.round()
    inputs = {
        "mu": rand(*latent),
        "logvar": rand(*latent, scale=0.5),
        "x": x,
        "out": rand(*data),
        "grad_z": rand(*latent, leaf=False),
    }
    if shapes["log_scale"]:
        inputs["log_scale"] = rand(*shapes["log_scale"], scale=0.1)
    return inputs


def head(impl: str, dist: str) -> Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    def step(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        z, kl = fastvae.sample_latent(t["mu"], t["logvar"], impl=impl)
        return z, fastvae.elbo_loss(t["x"], t["out"], kl, dist=dist, log_scale=t.get("log_scale"), impl=impl)

    return step


def backward(t: dict[str, torch.Tensor], z: torch.Tensor, loss: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients wrt mu, logvar, out and a learned log-scale, returned rather than accumulated into .grad (as in a
    model, where they flow on into the encoder and decoder instead of being copied into leaves)."""
    leaves = [t["mu"], t["logvar"], t["out"], *([t["log_scale"]] if "log_scale" in t else [])]
    return torch.autograd.grad([loss, z], leaves, [None, t["grad_z"]])


def _node_attribute_tensors(roots: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Tensors held as attributes of the autograd graph's nodes (a custom op's ctx, e.g. the fused loss's
    gradient stash), which saved-tensor hooks do not see."""
    found, seen, stack = [], set(), [r.grad_fn for r in roots]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for value in getattr(node, "__dict__", {}).values():
            found += [obj for obj in torch.utils._pytree.tree_leaves(value) if isinstance(obj, torch.Tensor)]
        stack += [fn for fn, _ in node.next_functions]
    return found


def saved_bytes(fn, t) -> int:
    """Bytes autograd keeps from forward to backward during fn(t): saved tensors plus tensors held on the
    graph's nodes, each storage counted once."""
    storages: dict[int, int] = {}

    def count(tensor):
        s = tensor.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(count, lambda x: x):
        z, loss = fn(t)
    for tensor in _node_attribute_tensors((z, loss)):
        count(tensor)
    backward(t, z, loss)
    return sum(storages.values())


# Dispatched ops that launch nothing on a GPU and move no data: besides views, allocations and aliases.
NO_WORK = {
    torch.ops.aten.detach.default,
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_strided.default,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.new_empty.default,
    torch.ops.aten.new_empty_strided.default,
    torch.ops.aten.lift_fresh.default,
}


class CountOps(TorchDispatchMode):
    """Counts the dispatched ops that do work (each a kernel launch on a GPU: not views, allocations or
    aliases) and the bytes of their tensor arguments and results."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func.is_view or func in NO_WORK:
            return result
        self.ops += 1
        seen = set()
        for obj in torch.utils._pytree.tree_leaves((args, kwargs, result)):
            if isinstance(obj, torch.Tensor) and id(obj) not in seen:
                seen.add(id(obj))
                self.bytes += obj.numel() * obj.element_size()
        return result


@contextlib.contextmanager
def _launches_counted_as_ops(counter: CountOps) -> Iterator[None]:
    """Count each fused-kernel launch as one op moving its tensor arguments once, whatever runs it (under
    the interpreter, the interpreter's own tensor work would otherwise be counted)."""
    from fastvae.kernels.launch import CachedKernel

    launch = CachedKernel.launch

    def counted(self, plan, pointers, values=()):
        counter.ops += 1
        counter.bytes += sum(a.numel() * a.element_size() for a in pointers if isinstance(a, torch.Tensor))
        with torch.utils._python_dispatch._disable_current_modes():
            launch(self, plan, pointers, values)

    CachedKernel.launch = counted
    try:
        yield
    finally:
        CachedKernel.launch = launch


def count_ops(fn, t) -> tuple[int, int]:
    with CountOps() as counter, _launches_counted_as_ops(counter):
        z, loss = fn(t)
        backward(t, z, loss)
    return counter.ops, counter.bytes


def cuda_launches(step: Callable[[], object]) -> int:
    """GPU activities (kernels, memsets, copies) of one call of `step`, from the profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == DeviceType.CUDA)


def time_cpu(fn, t, reps: int) -> tuple[float, float, float]:
    fwd, total = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        z, loss = fn(t)
        t1 = time.perf_counter()
        backward(t, z, loss)
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        total.append(t2 - t0)
    f, ft = statistics.median(fwd) * 1e3, statistics.median(total) * 1e3
    return f, ft - f, ft


def time_cuda(fn, inputs: list[dict[str, torch.Tensor]]) -> tuple[float, float, float]:
    from triton.testing import do_bench

    state = {"i": 0}

    def pick():
        state["i"] = (state["i"] + 1) % len(inputs)
        return inputs[state["i"]]

    def fwd():  # with autograd recording, as in training (the graph is dropped)
        fn(pick())

    def fwd_bwd():
        t = pick()
        z, loss = fn(t)
        backward(t, z, loss)

    f = do_bench(fwd, warmup=50, rep=200)
    ft = do_bench(fwd_bwd, warmup=50, rep=200)
    return f, ft - f, ft


def time_cuda_graph(fn, t: dict[str, torch.Tensor]) -> tuple[float | None, str | None]:
    """ms of one forward+backward step replayed from a captured CUDA graph: the device's time without the
    host's launches (triton.testing.do_bench_cudagraph: a warm-up on a side stream, then as many steps as
    fill ~20 ms unrolled into one graph). (None, the error's first line) when the step cannot be captured."""
    from triton.testing import do_bench_cudagraph

    def fwd_bwd():
        z, loss = fn(t)
        backward(t, z, loss)

    try:
        return do_bench_cudagraph(fwd_bwd), None
    except Exception as err:  # a failed capture raises CUDA, allocator or dynamo errors alike
        torch.cuda.synchronize()
        return None, f"{type(err).__name__}: {next(iter(str(err).strip().splitlines()), '')}"


def fused_design_bytes(case: Case) -> int:
    """Bytes the fused kernels move per step by design: read x, out; write d out; latent read/write; with a learned
    log-scale, its per-element fp32 gradient written and read back for its reduction, and the log-scale
    expanded to the data shape (D values) read and its gradient written."""
    e = DTYPES[case.dtype].itemsize
    likelihood = 3 * case.B * case.D * e
    if HEADS[case.head]["log_scale"]:
        likelihood += 2 * case.B * case.D * 4 + 2 * case.D * e
    latent = (2 * case.B * case.K + case.B * case.K) * e + (2 * case.B * case.K + 2 * case.B * case.K) * e
    return likelihood + latent


def run_case(case: Case, impl: str, device: torch.device, reps: int) -> Result:
    torch.manual_seed(0)
    fn = head("torch" if impl == "compile" else ("triton" if impl == "fused" else "torch"), case.dist)
    if impl == "compile":
        torch._dynamo.reset()  # a fresh compile per case: no recompilation limit, no stale graphs
        fn = torch.compile(fn)
    t = make_inputs(case, device)
    res = Result(case, impl)
    for _ in range(2):  # warm-up (compilation, autotuning)
        z, loss = fn(t)
        backward(t, z, loss)
    res.saved_bytes = saved_bytes(fn, t)
    if impl != "compile":
        res.ops_per_step, res.moved_bytes = count_ops(fn, t)
    if device.type == "cuda":
        inputs = [make_inputs(case, device, seed=i) for i in range(4)]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        z, loss = fn(inputs[0])
        backward(inputs[0], z, loss)
        torch.cuda.synchronize()
        res.peak_extra_bytes = torch.cuda.max_memory_allocated() - base
        res.launches_per_step = cuda_launches(lambda: backward(inputs[0], *fn(inputs[0])))
        res.fwd_ms, res.bwd_ms, res.fwd_bwd_ms = time_cuda(fn, inputs)
        res.graph_ms, res.graph_error = time_cuda_graph(fn, inputs[0])
        if impl == "fused":
            res.gbs = fused_design_bytes(case) / (res.graph_ms or res.fwd_bwd_ms) / 1e6
    elif impl != "fused":
        res.fwd_ms, res.bwd_ms, res.fwd_bwd_ms = time_cpu(fn, t, reps)
    return res


def _fmt_ms(v):
    return "-" if v is None else f"{v:.3f}"


def _mb(v):
    return "-" if v is None else f"{v / 2**20:.2f}"


def render(results: list[Result], env: dict, bandwidth: float | None) -> Table:
    title = f"ELBO head on {env['device']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit']})"
    table = Table(title=title)
    for col in ("head", "B", "D", "K", "dtype", "dist", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "graph ms",
                "vs eager", "vs compile", "GB/s", "saved MB", "ops/step", "moved MB", "peak MB", "launches"):
        table.add_column(col, justify="right")
    by_case: dict[tuple, dict[str, Result]] = {}
    for r in results:
        c = r.case
        by_case.setdefault((c.head, c.B, c.D, c.K, c.dtype, c.dist), {})[r.impl] = r
    for key, impls in by_case.items():
        for impl, r in impls.items():
            ratio = {}
            for base in ("eager", "compile"):
                b = impls.get(base)
                ok = b and b.fwd_bwd_ms and r.fwd_bwd_ms and base != impl
                ratio[base] = f"{b.fwd_bwd_ms / r.fwd_bwd_ms:.2f}x" if ok else "-"
            gbs = "-" if r.gbs is None else f"{r.gbs:.0f}"
            if r.gbs and bandwidth:
                gbs += f" ({100 * r.gbs / bandwidth:.0f}%)"
            table.add_row(*map(str, key), impl, _fmt_ms(r.fwd_ms), _fmt_ms(r.bwd_ms), _fmt_ms(r.fwd_bwd_ms),
                          _fmt_ms(r.graph_ms), ratio["eager"], ratio["compile"], gbs, _mb(r.saved_bytes),
                          str(r.ops_per_step or "-"), _mb(r.moved_bytes or None), _mb(r.peak_extra_bytes),
                          str(r.launches_per_step or "-"))
    return table


def cases(args) -> list[Case]:
    if args.ldm:
        return ldm_cases(args.dtype)
    return [
        Case(B, D, K, dtype, dist)
        for B in args.batch for D in args.dim for K in args.latent for dtype in args.dtype for dist in args.dist
    ]


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[256, 4096, 65536] if cuda else [256, 4096])
    p.add_argument("--dim", type=int, nargs="+", default=[784, 3072, 12288] if cuda else [784])
    p.add_argument("--latent", type=int, nargs="+", default=[20, 128])
    p.add_argument("--ldm", action="store_true", help="the latent-diffusion head instead (B, D, K given by it)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--dist", nargs="+", choices=["gaussian", "bernoulli"], default=["gaussian", "bernoulli"])
    p.add_argument("--impl", nargs="+", choices=["eager", "compile", "fused"], default=["eager", "compile", "fused"])
    p.add_argument("--reps", type=int, default=20, help="timed repetitions on the CPU")
    p.add_argument("--json", default=None, help="write results and environment here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    impls = [i for i in args.impl if i != "fused" or cuda or os.environ.get("TRITON_INTERPRET") == "1"]
    console = Console(width=max(Console().width, 180))
    env = environment(device)
    bandwidth = copy_bandwidth_gbs(device) if cuda else None
    results = []
    for case in cases(args):
        for impl in impls:
            console.log(f"{case} {impl}")
            results.append(run_case(case, impl, device, args.reps))
            if args.json:  # after every case: a run stopped part-way keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"benchmark": "elbo_head", "environment": env, "copy_bandwidth_gbs": bandwidth,
                               "results": [asdict(r) for r in results]}, f, indent=2)
    console.print(render(results, env, bandwidth))
    if bandwidth:
        console.print(f"measured copy bandwidth: {bandwidth:.0f} GB/s")


if __name__ == "__main__":
    main()
