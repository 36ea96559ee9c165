"""Run by `test_cached_kernel.py` without TRITON_INTERPRET: does `CachedKernel`'s key pick the variant that
Triton itself would launch?

Under the compile-only driver (kernels compiled for sm_90a, launches recorded, nothing run), every launch of
the public fused ops goes twice: through `CachedKernel.launch` (after a plan's first launch, its
direct path) and through Triton's own dispatch. Each records the compiled variant it reached; they must be
the same. The cases vary what Triton specialises on: dtypes, alignment (views that start mid-row), sizes and
strides, ints that are 1 or multiples of 16, the seed, the KL weight and the log-scale's kind. Prints one JSON
line: {"launches": N, "direct": N, "mismatches": [...], "wrong_target": [...], "devices": N}; the last two check
that a plan launches each device's own compiled variant (the compile-only targets sm_80 and sm_90a stand for
two devices).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import torch
from fastvae.kernels import latent, likelihood
from fastvae.kernels.compile_only import TARGETS, compile_only
from fastvae.kernels.launch import CachedKernel

import fastvae
from fastvae import functional
from fastvae.ops import SampleLatent

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cases() -> Iterator[tuple[str, Callable[[], None]]]:
    g = torch.Generator().manual_seed(0)

    def leaf(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)

    def head(mu, logvar, x, decode, samples=1, **loss_args) -> None:
        if samples == 1:
            z, kl = fastvae.sample_latent(mu, logvar, impl="triton")
        else:
            z, kl, _ = fastvae.sample_latent_iw(mu, logvar, samples=samples, impl="triton")
        loss = fastvae.elbo_loss(x, decode(z), kl, impl="triton", **loss_args)
        (loss * 0.5).backward()  # an upstream gradient other than 1: the rescale's full path

    def bernoulli(B: int, K: int, D: int, dtype: torch.dtype) -> Callable[[], None]:
        w = leaf(K, D, dtype=dtype)
        x = torch.rand(B, D, generator=g).round().to(dtype)
        return lambda: head(leaf(B, K, dtype=dtype), leaf(B, K, dtype=dtype), x, lambda z: z @ w, dist="bernoulli")

    for dtype in DTYPES:
        for B, K, D in ((8, 4, 16), (5, 3, 33), (1, 16, 1)):
            yield f"bernoulli {dtype} B={B} K={K} D={D}", bernoulli(B, K, D, dtype)
    # The same sizes and strides, with views that start at a row (16-byte aligned) or one value into it (not).
    h, w, data = leaf(6, 16), leaf(5, 24), torch.rand(6, 25, generator=g)
    for name, start in (("aligned", 0), ("unaligned", 1)):
        yield f"{name} views", lambda start=start: head(
            h[:, start : start + 5], h[:, 8 + start : 13 + start], data[:, start : start + 24], lambda z: z @ w,
            dist="gaussian", log_scale=0.3,
        )  # fmt: skip
    mu_t = leaf(5, 6).t()
    yield "transposed mu, 2 samples", lambda: head(
        mu_t, leaf(6, 5), torch.rand(6, 24, generator=g), lambda z: z @ w, samples=2
    )
    log_scale = leaf(24)
    yield "learned (D,) log-scale, beta tensor", lambda: head(
        leaf(6, 5), leaf(6, 5), torch.rand(6, 24, generator=g), lambda z: z @ w, log_scale=log_scale,
        beta=torch.tensor(0.5),
    )  # fmt: skip
    yield "per-row log-likelihood", lambda: fastvae.log_likelihood(
        torch.rand(6, 24, generator=g), leaf(3, 6, 24), log_scale=leaf(3, 6, 24), impl="triton"
    ).sum().backward()
    seeds = functional.DeviceSeeds(torch.device("cpu"), 2**40)  # what a CUDA-graph run's steps draw

    def seed_in_memory() -> None:
        z, kl = SampleLatent.apply(leaf(6, 5), leaf(6, 5), seeds.draw(), 1, False)
        fastvae.elbo_loss(torch.rand(6, 24, generator=g), z @ w, kl, dist="bernoulli", impl="triton").backward()

    yield "seed read from memory", seed_in_memory


def _seeds() -> Iterator[int]:
    """Seeds of every class Triton specialises an int on: multiples of 16 and not, in turn."""
    seed = 2**40
    while True:
        yield seed
        yield seed + 1
        seed += 16


def main() -> None:
    seeds = _seeds()
    functional._draw_seed = lambda device: next(seeds)
    with compile_only() as driver:
        launch = CachedKernel.launch
        counts = {"launches": 0, "direct": 0}
        mismatches: list[dict[str, str]] = []
        current = {"case": ""}

        def twice(self, plan, pointers, values=()):
            direct = bool(plan.compiled)  # a plan launched before (on the one device): the direct path
            start = len(driver.launches)
            launch(self, plan, pointers, values)
            self._through_triton(plan, pointers, values)
            cached, triton = driver.launches[start:]
            counts["launches"] += 1
            counts["direct"] += direct
            if cached.metadata.hash != triton.metadata.hash:
                mismatches.append({**current, "kernel": cached.name, "constexprs": repr(plan.constexprs)})

        CachedKernel.launch = twice
        try:
            for current["case"], run in _cases():
                for _ in range(2):  # the first call caches each variant through Triton, the second is direct
                    run()
        finally:
            CachedKernel.launch = launch
    print(json.dumps({**counts, "mismatches": mismatches, **_per_device()}))


def _per_device() -> dict[str, object]:
    """A plan keeps a compiled variant per device: the same calls under the sm_80 driver, then sm_90a, then
    sm_80 again (each target is a device of its own), must launch variants compiled for the active target.
    Returns {"wrong_target": [the kernels launched with another target's variant], "devices": the most devices
    a plan has compiled for}."""
    _, run = next(_cases())
    launch = CachedKernel.launch
    calls: list[str] = []

    def counted(self, plan, pointers, values=()):
        calls.append(self.fn.__name__)
        launch(self, plan, pointers, values)

    wrong: list[str] = []
    CachedKernel.launch = counted
    try:
        for name in ("sm_80", "sm_90a", "sm_80"):
            calls.clear()
            with compile_only(TARGETS[name]) as driver:
                for _ in range(2):  # through Triton for a device the plan has not seen, then directly
                    run()
            reached = [launch.name for launch in driver.launches if launch.metadata.target == TARGETS[name]]
            wrong += [kernel for kernel in calls if kernel not in reached or reached.remove(kernel)]
            wrong += reached  # recorded with the right target, but not among the launches made
    finally:
        CachedKernel.launch = launch
    kernels = (latent._forward, latent._backward, likelihood._loglik, likelihood._finish, likelihood._rescale)
    devices = max(len(plan.compiled) for kernel in kernels for plan in kernel.plans.values())
    return {"wrong_target": wrong, "devices": devices}

if __name__ == "__main__":
    main()
