"""End-to-end training throughput: samples/s of full training steps of the same 784-400-20 MLP VAE
(Bernoulli likelihood, Adam lr 1e-3) on MNIST-shaped data (the embedded 28x28 sprites).

Systems, each measured in the same run:
  baseline          the canonical PyTorch VAE example's way (bench/baseline_vae_example.py): a DataLoader
                    over PIL + ToTensor per sample (num_workers=1 and pin_memory on CUDA), .item() per step
  reference         fastvae's training engine (`fastvae.engine.Trainer`) with the PyTorch reference ops
  reference+compile the same with --compile
  fused             the engine with the Triton kernels (CUDA only)
  fused+compile     the same with --compile (CUDA only)
  fused+bf16        the fused engine with --amp bf16 (CUDA only)
  fused+graphs      the fused engine with --cuda-graphs: each step one replay of a captured CUDA graph
  reference+graphs  the same with the PyTorch reference ops (CUDA only)

The first `--warmup` epochs of each system are not timed (compilation, allocator, DataLoader start-up);
then every epoch is timed from a device synchronisation to a device synchronisation. Reported: the median
epoch time, samples/s from it, and each system's test loss after its epochs (negative ELBO with one
draw of z, nats per sample), so the systems' learning can be compared too.

Usage:  python -m bench.train_throughput [--batch 128 1024] [--epochs 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from bench import baseline_vae_example as example
from bench.environment import environment
from fastvae.data import DataSplits, DeviceBatches, load_dataset
from fastvae.engine import EVAL_BATCH, Trainer, synchronize, test_statistics
from fastvae.options import build_model, build_parser, make_config

CPU_SYSTEMS = ("baseline", "reference", "reference+compile")
CUDA_SYSTEMS = (
    "baseline", "reference", "reference+graphs", "fused", "fused+compile", "fused+bf16", "fused+graphs"
)  # fmt: skip
ALL_SYSTEMS = (
    "baseline", "reference", "reference+compile", "reference+graphs", "fused", "fused+compile", "fused+bf16",
    "fused+graphs",
)  # fmt: skip
# The engine flags of each fastvae system (the baseline has its own loop).
ENGINE_FLAGS = {
    "reference": ["--no-fused"],
    "reference+compile": ["--no-fused", "--compile"],
    "fused": ["--fused"],
    "fused+compile": ["--fused", "--compile"],
    "fused+bf16": ["--fused", "--amp", "bf16"],
    "fused+graphs": ["--fused", "--cuda-graphs"],
    "reference+graphs": ["--no-fused", "--cuda-graphs"],
}


@dataclass
class Result:
    system: str
    batch_size: int
    epoch_seconds: list[float] = field(default_factory=list)  # timed epochs only
    samples_per_epoch: int = 0
    test_loss: float | None = None  # nats per sample, after all epochs

    @property
    def median_epoch_s(self) -> float:
        return statistics.median(self.epoch_seconds)

    @property
    def samples_per_s(self) -> float:
        return self.samples_per_epoch / self.median_epoch_s


def _timed_epochs(run_epoch: Callable[[int], object], epochs: int, warmup: int, device: torch.device) -> list[float]:
    seconds = []
    for epoch in range(epochs):
        synchronize(device)
        start = time.perf_counter()
        run_epoch(epoch)
        synchronize(device)
        if epoch >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def baseline(
    splits: DataSplits, batch_size: int, device: torch.device
) -> tuple[example.ExampleVAE, torch.optim.Optimizer, DataLoader]:
    """The example's model (seeded), its Adam and its training DataLoader."""
    torch.manual_seed(0)
    model = example.ExampleVAE().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, optimizer, example.loader(splits.train, batch_size, device=device, shuffle=True)


def run_baseline(splits: DataSplits, batch_size: int, epochs: int, warmup: int, device: torch.device) -> Result:
    model, optimizer, train = baseline(splits, batch_size, device)
    result = Result("baseline", batch_size, samples_per_epoch=len(train.dataset))
    result.epoch_seconds = _timed_epochs(
        lambda _: example.train_epoch(model, train, optimizer, device), epochs, warmup, device
    )
    test = example.loader(splits.test, EVAL_BATCH, device=device, shuffle=False)
    result.test_loss = example.test_loss(model, test, device)
    return result


def engine(system: str, splits: DataSplits, batch_size: int, device: torch.device) -> Trainer:
    """The training engine as `python -m fastvae.train` builds it, with statistics written nowhere.
    A compiled system starts from a fresh dynamo state (compiled afresh for each system and batch size)."""
    if "compile" in system:
        torch._dynamo.reset()
    argv = ["--likelihood", "bernoulli", "--hidden", "400", "--latent-dim", "20", "--lr", "1e-3",
            "--batch-size", str(batch_size), "--device", str(device), *ENGINE_FLAGS[system]]
    args = build_parser().parse_args(argv)
    config = make_config(args, device, splits)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    train = DeviceBatches(splits.train, batch_size, device=device, seed=0)
    test = DeviceBatches(splits.test, EVAL_BATCH, device=device, seed=0, drop_last=False)
    return Trainer(config, model, train, test, io.StringIO(), device)


def engine_epoch(trainer: Trainer, epoch: int) -> None:
    """One epoch of the engine's steps with its statistics reads every --log-every steps; no evaluation."""
    for indices in trainer.train.index_batches(epoch):
        trainer.step_on(indices)
        if trainer.step % trainer.config["log_every"] == 0:
            trainer.log_train(epoch)
    trainer.log_train(epoch)


def run_engine(
    system: str, splits: DataSplits, batch_size: int, epochs: int, warmup: int, device: torch.device
) -> Result:
    trainer = engine(system, splits, batch_size, device)
    result = Result(system, batch_size, samples_per_epoch=len(trainer.train) * batch_size)
    result.epoch_seconds = _timed_epochs(lambda epoch: engine_epoch(trainer, epoch), epochs, warmup, device)
    trainer.model.eval()
    result.test_loss = -test_statistics(trainer.model, trainer.test, trainer.config["amp"])["test_elbo"]
    return result


def render(results: list[Result], env: dict[str, str]) -> Table:
    table = Table(title=f"Training throughput on {env['device']} (torch {env['torch']}, commit {env['commit']})")
    for column in ("system", "batch", "epochs timed", "median epoch s", "samples/s", "vs baseline", "test loss"):
        table.add_column(column, justify="right")
    baseline = {r.batch_size: r for r in results if r.system == "baseline"}
    for r in results:
        base = baseline.get(r.batch_size)
        speedup = f"{r.samples_per_s / base.samples_per_s:.1f}x" if base and r is not base else "-"
        table.add_row(r.system, str(r.batch_size), str(len(r.epoch_seconds)), f"{r.median_epoch_s:.2f}",
                      f"{r.samples_per_s:,.0f}", speedup, f"{r.test_loss:.2f}")
    return table


def to_json(results: list[Result], env: dict[str, str], args: argparse.Namespace) -> dict:
    return {
        "benchmark": "train_throughput",
        "environment": env,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "results": [
            {**asdict(r), "median_epoch_s": r.median_epoch_s, "samples_per_s": r.samples_per_s} for r in results
        ],
    }


def main(argv: list[str] | None = None) -> list[Result]:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", nargs="+", choices=ALL_SYSTEMS, default=CUDA_SYSTEMS if cuda else CPU_SYSTEMS)
    p.add_argument("--batch", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--epochs", type=int, default=4, help="epochs per system, including the warm-up")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs first")
    p.add_argument("--num-train", type=int, default=60_000)
    p.add_argument("--num-test", type=int, default=10_000)
    p.add_argument("--json", default=None, help="write results and environment here")
    args = p.parse_args(argv)
    if not 0 <= args.warmup < args.epochs:
        p.error(f"--warmup must be in [0, --epochs), got {args.warmup} with --epochs {args.epochs}")
    device = torch.device("cuda" if cuda else "cpu")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not cuda and not interpret and any(s.startswith("fused") for s in args.systems):
        p.error("the fused systems need CUDA (or TRITON_INTERPRET=1, which times the interpreter, not kernels)")
    if not cuda and any(s.endswith("+graphs") for s in args.systems):
        p.error("the +graphs systems capture CUDA graphs: they need CUDA")
    splits = load_dataset("sprites", num_train=args.num_train, num_test=args.num_test)
    console = Console(width=max(Console().width, 120))
    env = environment(device)
    results = []
    for batch_size in args.batch:
        for system in args.systems:
            console.log(f"{system}, batch {batch_size}")
            run = run_baseline if system == "baseline" else lambda *a, s=system: run_engine(s, *a)
            results.append(run(splits, batch_size, args.epochs, args.warmup, device))
            if args.json:  # after every system: a run stopped part-way keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(to_json(results, env, args), f, indent=2)
    console.print(render(results, env))
    return results


if __name__ == "__main__":
    main()
