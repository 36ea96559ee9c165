"""Every Triton kernel of fastvae, forward and backward, once per variant at small shapes: the program that
`compute-sanitizer` runs (`python -m bench.gpu_check` does, under memcheck and racecheck).

    compute-sanitizer --tool memcheck python -m bench.sanitize_kernels
    python -m bench.sanitize_kernels [--dtype fp32]   # no CUDA device: under Triton's interpreter
    compute-sanitizer ... python -m bench.sanitize_kernels --require-cuda   # stop, with the reason, without CUDA

Through the public ops (impl="triton"), so each call reaches the kernels the way a user's does:
  latent      `sample_latent_iw` forward and backward with gradients on z, kl and log_ratio (two kernels)
  likelihood  `log_likelihood` forward and backward (the kernel twice: log p, then d/d out), and `elbo_loss`
              forward (log p and the gradient in one launch) and backward with an upstream gradient of 2
              (the in-place rescale kernel does work) and a gradient wrt x
at shapes with tails on both axes (B, K, D not multiples of the blocks; D past one block, so the kernel's
loop over D runs with a tail), S = 1 and 3, fp32 and bf16, both distributions, every form of the Gaussian
log-scale (none, a float, a scalar, per-dimension, per-row and per-element tensors, with and without a
gradient), and inputs whose addresses are not 16-byte aligned (a separately compiled variant).

Not reached: the latent kernels' 64-bit noise counter, compiled only for S*B*K >= 2**31 elements.

Every output and gradient must be finite. For memcheck, run with PYTORCH_NO_CUDA_MEMORY_CACHING=1: with
torch's caching allocator a tensor lies inside a larger block, where an out-of-bounds access goes unseen.
Exit status 0 when every case ran, 1 when an output was not finite. With --require-cuda (as bench.gpu_check
runs it under the tool), a process where CUDA is not usable prints one line, `no CUDA under this run:
REASON` (torch's warning, e.g. error 999 from cudaGetDeviceCount when the tool's container runtime hides the
device, or its error at initialisation), and exits with 4 (NO_CUDA_EXIT) without running a case: the
kernels would otherwise run on the CPU under the interpreter, where the tool sees none of them.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

NO_CUDA = "no CUDA under this run: "  # --require-cuda's line without CUDA, before the reason
NO_CUDA_EXIT = 4
ON_CUDA = "cases on CUDA:"  # in the last line of a run whose kernels ran on CUDA


def cuda_status() -> tuple[bool, str]:
    """Whether CUDA is usable in this process and, if not, why: torch's warning (torch only warns when the
    driver fails, e.g. error 999), its error at initialisation, or that it sees no device."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            return True, ""
    reasons = [str(w.message) for w in caught]
    if not reasons:
        try:
            torch.cuda.init()
        except (RuntimeError, AssertionError) as err:
            reasons.append(str(err))
    return False, " ".join(" ".join(reasons).split()) or "torch sees no CUDA device"


CUDA_OK, NO_CUDA_REASON = cuda_status()
if not CUDA_OK:  # before triton loads: the kernels then run under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastvae  # noqa: E402

DEVICE = torch.device("cuda" if CUDA_OK else "cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LATENT_SHAPES = [(1, 1), (7, 3), (33, 129)]  # (B, K)
LIKELIHOOD_SHAPES = [(1, 1), (5, 33), (3, 1031)]  # (B, D); 1031 > the GPU's largest block of D (1024)
# The Gaussian's log-scale: how it is passed, and whether it needs a gradient.
LOG_SCALES = ["none", "float", "scalar", "per-dim", "per-dim-no-grad", "per-row", "per-element"]


@dataclass(frozen=True)
class Case:
    op: str  # "latent" or "likelihood"
    B: int
    width: int  # K or D
    samples: int
    dtype: str
    dist: str = "-"
    log_scale: str = "-"
    unaligned: bool = False

    def __str__(self) -> str:
        name = "K" if self.op == "latent" else "D"
        extra = "" if self.op == "latent" else f" {self.dist} log_scale={self.log_scale}"
        return (f"{self.op} B={self.B} {name}={self.width} S={self.samples} {self.dtype}{extra}"
                f"{' unaligned' if self.unaligned else ''}")  # fmt: skip


def cases(dtypes: list[str]) -> Iterator[Case]:
    for dtype in dtypes:
        for samples in (1, 3):
            for B, K in LATENT_SHAPES:
                for unaligned in (False, True):
                    yield Case("latent", B, K, samples, dtype, unaligned=unaligned)
            for B, D in LIKELIHOOD_SHAPES:
                for log_scale in LOG_SCALES:
                    yield Case("likelihood", B, D, samples, dtype, "gaussian", log_scale)
                yield Case("likelihood", B, D, samples, dtype, "bernoulli")
                for dist in ("gaussian", "bernoulli"):
                    yield Case("likelihood", B, D, samples, dtype, dist, "none" if dist == "gaussian" else "-", True)


def tensor(values: torch.Tensor, dtype: torch.dtype, unaligned: bool, grad: bool = False) -> torch.Tensor:
    """`values` on the device in `dtype`; with `unaligned`, a view one element into a larger buffer, so its
    address is not a multiple of 16 bytes."""
    values = values.to(device=DEVICE, dtype=dtype)
    if unaligned:
        buffer = torch.empty(values.numel() + 1, device=DEVICE, dtype=dtype)
        view = buffer[1:].view(values.shape)
        view.copy_(values)
        values = view
    return values.requires_grad_(grad)


def log_scale_for(case: Case, g: torch.Generator) -> torch.Tensor | float | None:
    out_shape = (case.samples, case.B, case.width)
    shapes = {"scalar": (), "per-dim": (case.width,), "per-dim-no-grad": (case.width,),
              "per-row": (case.B, case.width), "per-element": out_shape}  # fmt: skip
    if case.log_scale in ("none", "-"):
        return None
    if case.log_scale == "float":
        return 0.3
    values = torch.randn(shapes[case.log_scale], generator=g) * 0.3
    return tensor(values, DTYPES[case.dtype], False, grad=case.log_scale != "per-dim-no-grad")


def run_latent(case: Case, g: torch.Generator) -> list[torch.Tensor]:
    dtype = DTYPES[case.dtype]
    mu = tensor(torch.randn(case.B, case.width, generator=g), dtype, case.unaligned, grad=True)
    logvar = tensor(torch.randn(case.B, case.width, generator=g) * 0.5, dtype, case.unaligned, grad=True)
    z, kl, log_ratio = fastvae.sample_latent_iw(mu, logvar, samples=case.samples, impl="triton")
    loss = z.float().sum() + kl.sum() + log_ratio.sum()
    return [z, kl, log_ratio, *torch.autograd.grad(loss, (mu, logvar))]


def run_likelihood(case: Case, g: torch.Generator) -> list[torch.Tensor]:
    dtype = DTYPES[case.dtype]
    x_values = torch.rand(case.B, case.width, generator=g)
    x = tensor(x_values.round() if case.dist == "bernoulli" else x_values, dtype, case.unaligned, grad=True)
    out = tensor(torch.randn(case.samples, case.B, case.width, generator=g), dtype, case.unaligned, grad=True)
    log_scale = log_scale_for(case, g)
    kw = {"dist": case.dist, "log_scale": log_scale, "impl": "triton"}
    leaves = [t for t in (x, out, log_scale) if isinstance(t, torch.Tensor) and t.requires_grad]
    logp = fastvae.log_likelihood(x, out, **kw)
    grads = torch.autograd.grad(logp.sum(), leaves)
    kl = torch.rand(case.B, generator=g).to(DEVICE)
    loss = fastvae.elbo_loss(x, out, kl, **kw)
    grads += torch.autograd.grad(2.0 * loss, leaves)  # upstream 2: the stash is rescaled on the device
    return [logp, loss, *grads]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--require-cuda", action="store_true",
                   help=f"without usable CUDA, print why and exit with {NO_CUDA_EXIT} instead of running the cases")
    args = p.parse_args(argv)
    if args.require_cuda and not CUDA_OK:
        print(f"{NO_CUDA}{NO_CUDA_REASON}", flush=True)
        return NO_CUDA_EXIT
    g = torch.Generator().manual_seed(0)
    bad = 0
    all_cases = list(cases(args.dtype))
    for case in all_cases:
        outputs = (run_latent if case.op == "latent" else run_likelihood)(case, g)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()  # a fault is reported at this case, not a later one
        finite = all(bool(torch.isfinite(t).all()) for t in outputs)
        bad += not finite
        print(f"{case}: {'ok' if finite else 'NOT FINITE'}", flush=True)
    where = "CUDA" if DEVICE.type == "cuda" else "the CPU under TRITON_INTERPRET=1"
    print(f"{len(all_cases)} cases on {where}: {len(all_cases) - bad} finite, {bad} not finite")  # ON_CUDA
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
