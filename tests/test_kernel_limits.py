"""What CUDA limits, modelled without a GPU: grid sizes, int32 products, the int type of a by-value seed, and
the variants that a CUDA graph capture must find loaded.

Under TRITON_INTERPRET=1 (this suite): the latent noise is unchanged, the forward's programs loop over the
samples past its grid's y, and `CachedKernel.plan` refuses grids that CUDA would. The rest runs this file as
a script without TRITON_INTERPRET (`probe`): under the compile-only driver, the kernels compiled for sm_90a,
launches recorded and nothing run (no value is read: sizes of 2^31 elements cost address space only).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from fastvae.kernels import latent
from fastvae.kernels.compile_only import compile_only
from fastvae.kernels.launch import CachedKernel
from fastvae.kernels.resources import compiled_kernels
from helpers import compiled_report, raised

from fastvae.ops import SampleLatent  # also registers torch.ops.fastvae

SEED = 2**40 + 5
# Refused by CUDA (y, z above 65535, x above 2^31 - 1), or by Triton's launcher (a dimension of 0, which it
# skips; 2^31 programs, which overflow its C int), and the largest that are not.
REFUSED = [(1, 65536, 1), (1, 1, 65536), (2**31, 1, 1), (0, 1, 1), (1, 0, 1), (65536, 32768, 1)]
ACCEPTED = [(2**31 - 1, 1, 1), (1, 65535, 1), (32768, 65535, 1)]


# ------------------------------------------------------------------------------- under the interpreter


# z = latent_forward(mu, logvar, seed, S) before the grid and offset changes: (S, B, K, seed) -> {index: z}.
# The Philox counter of z[s, b, k] is its flat index, so these pin the noise; the interpreter's fp32 log and
# exp are numpy's (an ulp apart on some CPUs), while another counter would change z by O(1).
PINNED = {
    (3, 5, 7, 2**40 + 5): {
        (0, 0, 0): 0.3475532531738281, (2, 4, 6): -1.202114224433899, (1, 2, 3): -2.3908166885375977,
        (2, 0, 6): 0.5892602205276489,
    },
    (2, 3, 1030, 2**33 + 1): {  # two K blocks under the interpreter
        (0, 0, 0): -2.3965511322021484, (1, 2, 1029): -1.7402355670928955, (1, 1, 515): -2.3291335105895996,
        (1, 0, 1029): 1.9635579586029053,
    },
    (1, 40, 3, 7): {  # an int32 seed
        (0, 0, 0): 0.435200572013855, (0, 39, 2): -0.3142244815826416, (0, 20, 1): -0.9589397311210632,
        (0, 0, 2): 2.4394943714141846,
    },
}  # fmt: skip


def test_noise_is_unchanged(kernel_device):
    """On a GPU the fp32 log and exp are its own (a few ulps from numpy's): atol 1e-5 there."""
    g = torch.Generator().manual_seed(0)
    for (S, B, K, seed), values in PINNED.items():
        mu, logvar = torch.randn(B, K, generator=g), torch.randn(B, K, generator=g) * 0.5
        z, _, _ = latent.latent_forward(mu.to(kernel_device), logvar.to(kernel_device), seed, S)
        got = torch.stack([z[index] for index in values]).cpu()
        atol = 1e-6 if kernel_device.type == "cpu" else 1e-5
        torch.testing.assert_close(got, torch.tensor(list(values.values())), rtol=0, atol=atol)


def test_forward_loops_over_the_samples_past_grid_y(monkeypatch, kernel_device):
    """S > 65535 with a grid y of 65535 programs, scaled down (65535 interpreted programs take minutes): with
    a grid y of 2, each program loops over every other sample, and the outputs are those of one program per
    sample, bit for bit."""
    g = torch.Generator().manual_seed(1)
    mu, logvar = (torch.randn(3, 4, generator=g).to(kernel_device) for _ in range(2))
    monkeypatch.setattr(latent._forward, "plans", {})
    expected = latent.latent_forward(mu, logvar, SEED, 5)
    monkeypatch.setattr(latent, "_MAX_GRID_Y", 2)
    monkeypatch.setattr(latent._forward, "plans", {})
    got = latent.latent_forward(mu, logvar, SEED, 5)
    assert {plan.grid for plan in latent._forward.plans.values()} == {(1, 2, 1)}  # the call's (and on a GPU its twin's)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_plans_refuse_grids_cuda_cannot_launch():
    kernel = CachedKernel(latent._latent_bwd_kernel, values=("seed_value",))
    for grid in REFUSED:
        with pytest.raises(ValueError, match=r"^_latent_bwd_kernel: grid .*(65535|2147483647|2\^31)"):
            kernel.plan(grid, grid, (), (), 4)
    for grid in ACCEPTED:
        assert kernel.plan(grid, grid, (), (), 4).grid == grid
    assert set(kernel.plans) == set(ACCEPTED)


# ------------------------------------------------------- under the compile-only driver (in a subprocess)


@pytest.fixture(scope="module")
def report() -> dict:
    return compiled_report(Path(__file__))


def test_many_samples_launch_within_the_grid_limits(report):
    found = report["many_samples"]
    assert found["error"] is None
    assert found["grids"] == {"_latent_fwd_kernel": [1, 65535, 1], "_latent_bwd_kernel": [1, 1, 1]}


def test_sample_offsets_are_64_bit(report):
    """S*B = 2^31: s*B must be computed in int64; the compiled variants hold no 32-bit scalar product."""
    found = report["wide_offsets"]
    assert found["error"] is None
    assert set(found["i32_products"]) == {"_latent_fwd_kernel", "_latent_bwd_kernel"}
    assert all(products == [] for products in found["i32_products"].values()), found["i32_products"]
    assert all(found["i64_products"].values())  # the check reads the TTIR's products: there are some


def test_the_compile_only_launcher_refuses_what_cuda_refuses(report):
    found = report["grids"]
    for grid in REFUSED:
        assert "invalid argument" in (found[str(grid)] or ""), (grid, found[str(grid)])
    assert all(found[str(grid)] is None for grid in ACCEPTED)
    assert found["recorded"] == [list(grid) for grid in ACCEPTED]


def test_a_seed_reaches_the_variant_of_its_int_type(report):
    """The custom op turns a CPU seed tensor into an int: 5 makes Triton type the seed i32, 2^40 i64; a plan
    keyed without that type launched the i32 variant with 2^40."""
    found = report["seed_types"]
    assert found["error"] is None
    assert found["types"] == {"_latent_fwd_kernel": ["i32", "i64"], "_latent_bwd_kernel": ["i32", "i64"]}


def test_an_eager_call_prepares_the_variants_of_its_capture(report):
    """After one eager (int-seed) step, the variants that the same step inside a capture launches (its seed a
    device tensor, read in-kernel) are compiled and loaded: the capture compiles and loads nothing."""
    found = report["twins"]
    assert found["prepared"] == {"_latent_fwd_kernel": True, "_latent_bwd_kernel": True}
    assert found["capture_error"] is None
    assert found["loaded_in_capture"] == []
    assert found["captured"] == ["_latent_fwd_kernel", "_latent_bwd_kernel"]


@triton.jit
def _noop_kernel(x_ptr):
    tl.store(x_ptr, 0)


def probe() -> dict:
    """Each check's findings under the compile-only driver (sm_90a), with the error it raised (or None)."""
    report: dict[str, dict] = {}
    with compile_only() as driver:

        def launches_of(run: Callable[[], object]) -> tuple[str | None, list]:
            start = len(driver.launches)
            error = raised(run)
            return error, driver.launches[start:]

        def variant(launch):
            return compiled_kernels(driver.get_current_device())[launch.metadata.hash]

        def forward_and_backward(S: int, B: int, K: int, dtype: torch.dtype = torch.float32) -> None:
            mu, logvar = torch.zeros(B, K, dtype=dtype), torch.zeros(B, K, dtype=dtype)
            latent.latent_forward(mu, logvar, SEED, S, log_ratio=False)
            grad_z = torch.zeros(1, 1, 1, dtype=dtype).expand(S, B, K)  # no memory: stride 0
            latent.latent_backward(grad_z, None, None, mu, logvar, SEED)

        error, ran = launches_of(lambda: forward_and_backward(70000, 3, 2))
        report["many_samples"] = {"error": error, "grids": {launch.name: launch.grid for launch in ran}}

        error, ran = launches_of(lambda: forward_and_backward(2**15, 2**16, 1, torch.float16))
        ttir = {launch.name: variant(launch).asm["ttir"] for launch in ran}
        report["wide_offsets"] = {
            "error": error,
            "i32_products": {name: re.findall(r"arith\.muli [^:\n]*: i32\b", ir) for name, ir in ttir.items()},
            "i64_products": {name: bool(re.search(r"arith\.muli [^:\n]*: i64\b", ir)) for name, ir in ttir.items()},
        }

        x = torch.zeros(1)
        start = len(driver.launches)
        report["grids"] = {str(grid): raised(lambda grid=grid: _noop_kernel[grid](x)) for grid in REFUSED + ACCEPTED}
        report["grids"]["recorded"] = [launch.grid for launch in driver.launches[start:]]

        def seeds() -> None:
            for seed in (5, 2**40):
                mu, logvar = torch.zeros(4, 3).requires_grad_(), torch.zeros(4, 3).requires_grad_()
                z, kl, lr = torch.ops.fastvae.sample_latent(mu, logvar, torch.tensor([seed]), 2)
                (z.sum() + kl.sum() + lr.sum()).backward()

        error, ran = launches_of(seeds)
        types: dict[str, list[str]] = {}
        for launch in ran:
            types.setdefault(launch.name, []).append(variant(launch).src.signature["seed_value"])
        report["seed_types"] = {"error": error, "types": types}

        def step(seed: int | torch.Tensor) -> None:
            mu, logvar = torch.zeros(6, 5).requires_grad_(), torch.zeros(6, 5).requires_grad_()
            z, kl = SampleLatent.apply(mu, logvar, seed, 1, False)
            (z.sum() + kl.sum()).backward()

        latent._forward.plans.clear()  # only the step's plans: the checks above built twins of their own
        latent._backward.plans.clear()
        step(SEED)
        in_memory = latent._forward.constexpr_names.index("SEED_IN_MEMORY")
        prepared = {
            kernel.fn.__name__: any(plan.constexprs[in_memory] and plan.compiled for plan in kernel.plans.values())
            for kernel in (latent._forward, latent._backward)
        }
        loaded = len(driver.loaded)
        with driver.capture():
            error, ran = launches_of(lambda: step(torch.tensor([SEED])))  # a device seed, as a capture draws
        report["twins"] = {
            "prepared": prepared,
            "capture_error": error,
            "loaded_in_capture": driver.loaded[loaded:],
            "captured": [launch.name for launch in ran],
        }
    return report


if __name__ == "__main__":
    print(json.dumps(probe()))
