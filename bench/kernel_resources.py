"""Registers, spills, stack, shared memory and global access widths of every kernel variant the public ops
launch, compiled by Triton for sm_80 (A100) and sm_90a (H100) on this machine: no GPU needed.

Each case drives the public ops (`sample_latent`, `sample_latent_iw`, `log_likelihood`, `elbo_loss`), forward
and backward, on CPU tensors under `compile_only`: every launch is bound, specialised and compiled exactly
as on that GPU, then recorded instead of run (nothing reads the tensors' values). Each compiled variant is
measured (`fastvae.kernels.resources`) and checked against the budget: no spills, no local memory, at most
128 registers per thread, at least 2 programs per SM, and 128-bit global accesses through the pointers that
the case passes contiguous, 16-byte aligned and with rows a multiple of 16 elements (Triton specialises an
integer on divisibility by 16, so that is what lets it prove a row stride keeps 16-byte alignment).

    python -m bench.kernel_resources                 # summary; exit status 1 if a variant breaks the budget
    python -m bench.kernel_resources --json PATH     # every launch's resources, for tests
    python -m bench.kernel_resources --update-docs   # rewrite the table in docs/design.md
    python -m bench.kernel_resources --cases FILE.py # the CASES list of another file (planted regressions)

Must run without TRITON_INTERPRET=1 (under it `@triton.jit` functions are interpreted, never compiled).
The wide-counter case (S*B*K = 2^31) allocates z and its gradient with torch.empty: 4 GiB each of address
space that nothing touches (the launches are recorded, not run), so no memory is used.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import triton
from fastvae.kernels.compile_only import TARGETS, compile_only
from fastvae.kernels.resources import Budget, Resources, UnsupportedTriton, compiled_kernels, measure, violations

import fastvae
from fastvae import checks, functional

DOCS = Path(__file__).resolve().parents[1] / "docs" / "design.md"
DOCS_BEGIN = "<!-- kernel-resources:begin (python -m bench.kernel_resources --update-docs) -->"
DOCS_END = "<!-- kernel-resources:end -->"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Pointer arguments of the kernels, by what they hold.
LATENT_INPUTS = ("mu_ptr", "lv_ptr")
LATENT_OUTPUTS = ("z_ptr", "gz_ptr", "dmu_ptr", "dlv_ptr")  # gz: the gradient of z, allocated here


@dataclass(frozen=True)
class Case:
    """Public-op calls, forward and backward, and the pointers whose accesses must be `Budget.vector_bits`."""

    name: str
    run: Callable[[], None]
    vector: tuple[str, ...] = ()


def tensor(shape: tuple[int, ...], dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
    """Contiguous, uninitialised, starting `offset` elements into its storage: an odd offset puts its address
    off 16-byte alignment, as a view into a larger buffer would be."""
    return torch.empty(math.prod(shape) + offset, dtype=dtype)[offset:].view(shape)


def latent_case(
    dtype: str, samples: int, B: int, K: int, offset: int = 0, note: str = "", seeds_in_memory: bool = False
) -> Case:
    """`sample_latent` (S = 1) or `sample_latent_iw`, then backward from all outputs; with `seeds_in_memory`
    the kernels read the seed from memory, as the steps of a `--cuda-graphs` run do (`functional.DeviceSeeds`)."""
    op = "sample_latent" if samples == 1 else "sample_latent_iw"

    def run() -> None:
        mu, logvar = (tensor((B, K), DTYPES[dtype], offset).requires_grad_() for _ in range(2))
        seeds = functional.DeviceSeeds(mu.device, 2**40) if seeds_in_memory else None
        with functional.device_seeds(seeds) if seeds else contextlib.nullcontext():
            if samples == 1:
                outputs = fastvae.sample_latent(mu, logvar, impl="triton")
            else:
                outputs = fastvae.sample_latent_iw(mu, logvar, samples=samples, impl="triton")
            torch.autograd.backward(outputs, [torch.empty_like(o) for o in outputs])

    vector = (LATENT_INPUTS if offset == 0 else ()) + LATENT_OUTPUTS if K % 16 == 0 else ()
    return Case(f"{op} {dtype} S={samples} B={B} K={K}{note}", run, vector)


# Log-scale tensors (Gaussian) by shape; a form is "<shape> learned" (requires grad: the kernels write its
# gradient) or "<shape> fixed". "none" is unit variance, "float" a Python float.
LOG_SCALE_SHAPES: dict[str, Callable[[int, int, int], tuple[int, ...]]] = {
    "()": lambda S, B, D: (),
    "(D,)": lambda S, B, D: (D,),
    "(B, D)": lambda S, B, D: (B, D),
    "(S, B, D)": lambda S, B, D: (S, B, D),
}


def likelihood_case(
    dist: str, dtype: str, samples: int, B: int, D: int, log_scale: str = "none", offset: int = 0, note: str = ""
) -> Case:
    """`log_likelihood` forward and backward, then `elbo_loss` forward and backward, on out (S, B, D)
    (or (B, D) for S = 1) with a log-scale of the form `log_scale` (Gaussian only)."""
    shape, _, use = log_scale.rpartition(" ")

    def make_log_scale() -> torch.Tensor | float | None:
        if log_scale in ("none", "float"):
            return 0.5 if log_scale == "float" else None
        ls = tensor(LOG_SCALE_SHAPES[shape](samples, B, D), DTYPES[dtype], offset)
        return ls.requires_grad_(use == "learned")

    def run() -> None:
        x = tensor((B, D), DTYPES[dtype], offset)
        out = tensor((samples, B, D) if samples > 1 else (B, D), DTYPES[dtype], offset).requires_grad_()
        ls = make_log_scale()
        logp = fastvae.log_likelihood(x, out, dist=dist, log_scale=ls, impl="triton")
        logp.backward(torch.empty_like(logp))
        fastvae.elbo_loss(x, out, tensor((B,), torch.float32), dist=dist, log_scale=ls, impl="triton").backward()

    vector: tuple[str, ...] = ()
    if D % 16 == 0:
        inputs = ("x_ptr", "out_ptr") + (("ls_ptr",) if shape not in ("", "()") else ())
        grads = ("dout_ptr",) + (("dls_ptr",) if use == "learned" else ())
        # the stash that elbo_loss's backward rescales, 1-D: vectorised when its size is a multiple of 16
        stash = ("stash_ptr",) + (("stash_ls_ptr",) if use == "learned" and shape != "()" else ())
        vector = (inputs if offset == 0 else ()) + grads + stash
    ls_name = f" log_scale={log_scale}" if dist == "gaussian" else ""
    return Case(f"log_likelihood+elbo_loss {dist} {dtype} S={samples} B={B} D={D}{ls_name}{note}", run, vector)


ODD = " (inputs at an odd element offset)"
CASES = [
    latent_case("fp32", 1, 256, 32),
    latent_case("bf16", 4, 256, 32),
    latent_case("fp16", 4, 64, 128),
    latent_case("fp32", 2, 64, 20, note=" (K not a multiple of 16)"),
    latent_case("fp32", 3, 512, 3, note=" (K not a multiple of 16, BLOCK_K = 4)"),
    latent_case("bf16", 1, 16, 1000, note=" (K not a multiple of 16, several K blocks)"),
    latent_case("bf16", 2, 256, 32, offset=1, note=ODD),
    latent_case("bf16", 1024, 16384, 128, note=" (wide Philox counter: S*B*K = 2^31)"),
    latent_case("fp32", 70000, 4, 32, note=" (S > 65535, CUDA's limit on grid y: the samples looped over)"),
    latent_case("fp32", 1, 256, 32, note=" (seed read from memory)", seeds_in_memory=True),
    likelihood_case("gaussian", "fp32", 1, 64, 784),
    likelihood_case("gaussian", "fp16", 1, 64, 784, "float"),
    likelihood_case("gaussian", "fp32", 2, 32, 784, "() learned"),
    likelihood_case("gaussian", "bf16", 4, 64, 784, "(D,) learned"),
    likelihood_case("gaussian", "bf16", 1, 64, 784, "(B, D) fixed"),
    likelihood_case("gaussian", "fp32", 2, 32, 784, "(S, B, D) learned"),
    likelihood_case("gaussian", "fp32", 2, 32, 781, "(D,) learned", note=" (D not a multiple of 16)"),
    likelihood_case("gaussian", "fp32", 2, 64, 20, "(S, B, D) learned", note=" (D not a multiple of 16)"),
    likelihood_case("gaussian", "bf16", 2, 64, 48, "(D,) learned"),
    likelihood_case("bernoulli", "bf16", 1, 64, 784),
    likelihood_case("bernoulli", "fp16", 4, 32, 784),
    likelihood_case("bernoulli", "fp32", 2, 32, 784, offset=1, note=ODD),
]


@contextlib.contextmanager
def cpu_tensors_launch_kernels() -> Iterator[None]:
    """Let impl="triton" take CPU tensors, as it does under TRITON_INTERPRET=1: here they reach the compiler."""
    with mock.patch.object(checks, "interpreter_enabled", return_value=True):
        yield


@dataclass
class CaseResult:
    case: str
    target: str
    vector: list[str]
    error: str | None = None
    launches: list[dict[str, Any]] = field(default_factory=list)  # hash, kernel, constexprs, resources

    def problems(self, budget: Budget) -> list[str]:
        """Why this case fails: a compile error, a variant over the budget, or a pointer it names as vector
        that no launch accesses (a renamed argument must not pass unchecked)."""
        if self.error:
            return [f"{self.case} on {self.target}: {self.error}"]
        found = []
        seen = set()
        for launch in self.launches:
            res = Resources.from_json(launch["resources"])
            seen |= {a.pointer for a in res.accesses}
            found += [f"{self.case}: {v}" for v in violations(res, budget, self.vector)]
        found += [f"{self.case} on {self.target}: no launch accesses {p}" for p in self.vector if p not in seen]
        return found


def _constexprs(kernel: Any) -> str:
    """The `tl.constexpr` parameters a variant was compiled with: 'BLOCK_B=64 BLOCK_K=32 WIDE_COUNTER' (a flag
    by its name when true, left out when false)."""
    fn = kernel.src.fn
    values = {fn.arg_names[i]: kernel.src.constants[(i,)] for i in sorted(fn.constexprs)}
    return " ".join(name if v is True else f"{name}={v}" for name, v in values.items() if v is not False)


def run_cases(cases: list[Case], target: str) -> list[CaseResult]:
    """Compile every launch of `cases` for `target` and measure each variant (once per variant)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("kernel_resources: unset TRITON_INTERPRET (interpreted kernels are never compiled)")
    results = []
    with compile_only(TARGETS[target]) as driver, cpu_tensors_launch_kernels():
        for case in cases:
            result = CaseResult(case.name, target, list(case.vector))
            first = len(driver.launches)
            try:
                case.run()
            except Exception as e:  # a variant that does not compile fails its case, not the others
                result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            result.launches = [{"hash": la.metadata.hash, "kernel": la.name} for la in driver.launches[first:]]
            results.append(result)
    kernels = compiled_kernels(driver.get_current_device())
    measured: dict[str, dict[str, Any]] = {}
    for result in results:
        for launch in result.launches:
            kernel = kernels.get(launch["hash"])
            if kernel is None:  # e.g. a @triton.jit function that no module holds by name
                raise LookupError(f"{launch['kernel']}: compiled variant not found in any loaded module")
            if launch["hash"] not in measured:
                measured[launch["hash"]] = measure(kernel).to_json()
            launch.update(constexprs=_constexprs(kernel), resources=measured[launch["hash"]])
    return results


def report(cases: list[Case], targets: list[str]) -> dict[str, Any]:
    """Everything the JSON holds: versions, date, budget and each case's launches per target."""
    data = {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "budget": asdict(Budget()),
        "unsupported": None,  # why this Triton cannot be measured, if so
        "results": [],
    }
    try:
        data["results"] = [asdict(r) for target in targets for r in run_cases(cases, target)]
    except UnsupportedTriton as e:
        data["unsupported"] = f"triton {triton.__version__}: {e}"
    return data


def problems(data: dict[str, Any]) -> list[str]:
    """Every budget violation and compile error in a report."""
    budget = Budget(**data["budget"])
    return [p for r in data["results"] for p in CaseResult(**r).problems(budget)]


def _widths(res: dict[str, Any], kind: str) -> str:
    """'128: mu lv · 64: seed' — the pointers accessed at each width, widest first."""
    by_bits: dict[int, list[str]] = {}
    for a in res["accesses"]:
        if a["kind"] == kind:
            by_bits.setdefault(a["bits"], []).append(re.sub(r"_ptr$", "", a["pointer"]))
    return " · ".join(f"{b}: {' '.join(sorted(set(p)))}" for b, p in sorted(by_bits.items(), reverse=True)) or "–"


def _spills(res: dict[str, Any]) -> str:
    """'0', or 'stores+loads' in bytes per thread."""
    return f"{res['spill_stores']}+{res['spill_loads']}" if res["spill_stores"] or res["spill_loads"] else "0"


def markdown(data: dict[str, Any]) -> str:
    """One row per kernel variant (first case that launched it), each target's numbers side by side."""
    targets = list(dict.fromkeys(r["target"] for r in data["results"]))
    by_case: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in data["results"]:
        by_case.setdefault(r["case"], {})[r["target"]] = r["launches"]
    rows: dict[tuple[str, ...], list[Any]] = {}
    for case, per_target in by_case.items():
        for launches in zip(*(per_target[t] for t in targets), strict=False):  # unequal only with an error
            key = tuple(launch["hash"] for launch in launches)
            if key not in rows:
                rows[key] = [case, launches]
    slash = " / ".join(targets)
    lines = [
        f"Triton {data['triton']}, torch {data['torch']}, {data['date']}; per target: {slash}. Registers and "
        "stack per thread, spills in bytes per thread (stores+loads), shared memory in bytes per program, "
        "programs resident per SM; widths in bits of the global loads and stores per pointer argument.",
        "",
        "| kernel | first case launching it | constexprs, warps | registers | spills | stack | shared | programs/SM "
        "| loads | stores |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, launches in rows.values():
        res = [launch["resources"] for launch in launches]
        cols = [
            " / ".join(str(get(r)) for r in res)
            for get in (itemgetter("registers"), _spills, itemgetter("stack"), itemgetter("shared"),
                        itemgetter("programs_per_sm"))
        ]  # fmt: skip
        widths = [[_widths(r, kind) for r in res] for kind in ("load", "store")]
        widths = [w[0] if len(set(w)) == 1 else " / ".join(w) for w in widths]  # once when the targets agree
        lines.append(
            f"| `{launches[0]['kernel']}` | {case} | {launches[0]['constexprs']}, {res[0]['num_warps']} | "
            + " | ".join(cols + widths) + " |"
        )
    return "\n".join(lines)


def update_docs(table: str, path: Path = DOCS) -> None:
    """Replace what lies between the table's markers in `path`."""
    text = path.read_text()
    head, rest = text.split(DOCS_BEGIN, 1)
    _, tail = rest.split(DOCS_END, 1)
    path.write_text(f"{head}{DOCS_BEGIN}\n{table}\n{DOCS_END}{tail}")


def load_cases(path: str) -> list[Case]:
    """The `CASES` list of the Python file at `path`."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so that Triton finds the module of its @triton.jit functions
    spec.loader.exec_module(module)
    return module.CASES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", choices=sorted(TARGETS), help="default: all")
    p.add_argument("--cases", help="a Python file with a CASES list (default: the public ops' cases)")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--markdown", action="store_true", help="print the table")
    p.add_argument("--update-docs", action="store_true", help=f"rewrite the table in {DOCS.name}")
    args = p.parse_args(argv)
    data = report(load_cases(args.cases) if args.cases else CASES, args.target or sorted(TARGETS))
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    if data["unsupported"]:
        print(f"kernel_resources: not measured: {data['unsupported']}", file=sys.stderr)
        return 2
    table = markdown(data)
    if args.update_docs:
        update_docs(table)
    if args.markdown or not (args.json or args.update_docs):
        print(table)
    found = problems(data)
    for problem in found:
        print(problem, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
