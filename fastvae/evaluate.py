"""Evaluate a training run: `python -m fastvae.evaluate RUN_DIR [--iw-samples K]`.

Loads the model and its config with `fastvae.load_run(RUN_DIR)` and the data again (a user's data file,
checked against the SHA-256 the run recorded, from `--dataset PATH` / `--test-data PATH` if it moved),
then reports on the test split, in nats per sample with standard errors over the test samples: the ELBO
(one draw of z per sample, analytic KL) and the importance-weighted bound log p(x) >= IWAE_K. Writes
RUN_DIR/eval.json. The ops run with impl "auto": the fused Triton kernels on CUDA.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fastvae.data import DataError, DeviceBatches, load_dataset
from fastvae.model import VAE, iwae_log_likelihood
from fastvae.options import ConfigError, HelpFormatter, Parser, resolve_device
from fastvae.rundir import data_files, write_json
from fastvae.runs import RunError, load_run
from fastvae.units import bits_per_dim, sigma_stats


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m fastvae.evaluate",
        description="Test ELBO and importance-weighted log-likelihood bound of a run, in nats per sample "
        "(and bits per dimension where they apply: docs/maths.md).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a directory written by fastvae.train")
    parser.add_argument("--iw-samples", type=int, default=1000, help="K, importance samples per test sample")
    parser.add_argument("--num-test", type=int, help="evaluate the first N test samples (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=100, help="test samples per batch")
    parser.add_argument("--chunk", type=int, default=100, help="importance samples decoded at once")
    parser.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the draws of z")
    parser.add_argument(
        "--dataset", metavar="PATH",
        help="the run's data file at a new place, if it moved (its SHA-256 must be the one the run recorded)",
    )
    parser.add_argument("--test-data", metavar="PATH", help="likewise, the run's --test-data file at a new place")
    return parser


def mean_and_se(values: torch.Tensor) -> dict[str, float]:
    """Mean and standard error of the mean of per-sample values (nats)."""
    values = values.double()
    se = values.std().item() / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": values.mean().item(), "se": se}


@torch.no_grad()
def per_sample_bounds(
    model: VAE, test: DeviceBatches, k: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per test sample (N,) each: ELBO, KL, log p(x|z) (one draw) and IWAE_k, in nats."""
    rows: list[tuple[torch.Tensor, ...]] = []
    for x in test.epoch(0):
        log_px, kl = model.log_px_and_kl(x)
        rows.append((log_px - kl, kl, log_px, iwae_log_likelihood(model, x, k, chunk)))
    return tuple(torch.cat(column).cpu() for column in zip(*rows, strict=True))  # type: ignore[return-value]


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    for name in ("iw_samples", "batch_size", "chunk"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device = resolve_device(args.device)
    model, config = load_run(args.run_dir, device)
    if config.get("data_in_process"):
        raise ConfigError(
            f"{args.run_dir}: the run's data were an array given to fastvae.fit, which cannot be loaded by name"
        )
    num_test = args.num_test if args.num_test is not None else config["num_test"]
    files = data_files(config, {"dataset": args.dataset, "test_data": args.test_data}, str(args.run_dir))
    # The test split does not depend on num_train: load a single training sample.
    splits = load_dataset(
        files["dataset"],
        data_dir=config["data_dir"],
        seed=config["seed"],
        num_train=1,
        num_test=num_test,
        image_size=config["image_size"],
        likelihood=config["likelihood"],
        layout=config.get("layout", "auto"),
        test_fraction=config.get("test_fraction"),
        test_data=files["test_data"],
    )
    test = DeviceBatches(splits.test, args.batch_size, device=device, seed=args.seed, drop_last=False)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    elbo, kl, log_px, iwae = per_sample_bounds(model, test, args.iw_samples, args.chunk)
    dim, eight_bit = math.prod(model.data_shape), splits.test.dtype == torch.uint8
    bounds = {key: mean_and_se(values) for key, values in (("test_elbo", elbo), ("iwae", iwae))}
    for bound in bounds.values():
        bpd = bits_per_dim(bound["mean"], dim, model.likelihood, eight_bit)
        if bpd is not None:
            bound["bpd"] = bpd
    results = {
        "run_dir": str(args.run_dir),
        "dataset": files["dataset"],
        **({"test_data": files["test_data"]} if files["test_data"] else {}),
        "num_test": len(elbo),
        "iw_samples": args.iw_samples,
        "device": str(device),
        "fused": device.type == "cuda",
        "units": "nats per sample",
        "test_elbo": bounds["test_elbo"],
        "test_kl": mean_and_se(kl),
        "test_log_px_given_z": mean_and_se(log_px),
        "iwae": bounds["iwae"],
        "seconds": round(time.perf_counter() - started, 3),
    }
    if model.log_scale is not None:
        results["sigma"] = sigma_stats(model)
    return results


def results_table(results: dict[str, Any]) -> Table:
    table = Table(title=f"{results['run_dir']}: {results['num_test']} test samples, nats per sample")
    for column in ("", "mean", "std. error", "bits/dim"):
        table.add_column(column, justify="right" if column else "left")
    k = results["iw_samples"]
    for name, key in (
        ("ELBO", "test_elbo"),
        ("KL", "test_kl"),
        ("log p(x|z)", "test_log_px_given_z"),
        (f"log p(x) >= IWAE_{k}", "iwae"),
    ):
        bpd = results[key].get("bpd")
        table.add_row(name, f"{results[key]['mean']:.3f}", f"{results[key]['se']:.3f}",
                      "" if bpd is None else f"{bpd:.4f}")
    if "sigma" in results:
        sigma = results["sigma"]
        table.add_row("learned σ mean (min, max)", f"{sigma['mean']:.4f}", "",
                      f"({sigma['min']:.4f}, {sigma['max']:.4f})")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        results = evaluate(args)
    except (DataError, ConfigError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    console.print(results_table(results))  # first: a run directory that cannot be written still shows them
    path = args.run_dir / "eval.json"
    try:
        write_json(path, results)  # atomic: an earlier eval.json stays whole if this fails
    except OSError as err:
        print(f"error: cannot write {path}: {err.strerror or err}; the results are above", file=sys.stderr)
        return 2
    console.print(f"{results['seconds']:.1f} s on {results['device']}; written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
