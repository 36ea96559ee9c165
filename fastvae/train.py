"""Train a VAE from the command line: `python -m fastvae.train [options]` (`--help` lists them).

The whole data set lives on the device; the hot loop keeps running sums of the statistics there and
reads them (one host synchronisation) every `--log-every` steps. RUN_DIR (`--out`) receives
config.json, metrics.jsonl, checkpoint.pt, samples.png, reconstructions.png and loss.png.
All statistics are in nats per sample.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import fastvae
from fastvae import checks
from fastvae.data import DataError, DataSplits, DeviceBatches, load_dataset
from fastvae.images import plot_lines, save_grid, save_reconstructions
from fastvae.model import ARCHS, VAE, LossOutput

STATS = ("loss", "elbo", "kl", "log_px", "iwae")
EVAL_BATCH = 1000  # rows per evaluation batch
PICTURES = ("samples.png", "reconstructions.png", "loss.png")


class ConfigError(Exception):
    """A bad combination of options or an unusable device: printed as is, exit code 2."""


# ------------------------------------------------------------------------------------------- options


def _sigma(text: str) -> float | str:
    if text == "learned":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'learned', got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"sigma must be a positive finite number, got {text}")
    return value


def _positive_ints(text: str) -> list[int]:
    """'400' or '512,256' -> [400] or [512, 256]."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return values


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastvae.train",
        description="Train a VAE with the fused ELBO. Statistics are in nats per sample.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset", default="sprites", help="sprites, mnist, fashion-mnist or a .npz/.npy/.pt path"
    )
    data.add_argument("--data-dir", default="data", help="where the MNIST-style IDX files are (or go)")
    data.add_argument("--download", action="store_true", help="fetch missing MNIST files with torchvision")
    data.add_argument("--num-train", type=_positive_int, help="use the first N training samples")
    data.add_argument("--num-test", type=_positive_int, help="use the first N test samples")
    data.add_argument("--image-size", type=_positive_int, default=28, help="side of the sprites, pixels")
    model = parser.add_argument_group("model")
    model.add_argument("--likelihood", choices=checks.DISTS, default="gaussian")
    model.add_argument("--sigma", type=_sigma, default=1.0, help="Gaussian std: a number or 'learned'")
    model.add_argument("--arch", choices=ARCHS, default="mlp")
    model.add_argument(
        "--hidden",
        type=_positive_ints,
        action="append",
        help="hidden layer sizes, repeatable or 512,256 [400]",
    )
    model.add_argument("--latent-dim", type=_positive_int, default=20)
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=_positive_int, default=10)
    train.add_argument("--batch-size", type=_positive_int, default=128)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--beta", type=float, default=1.0, help="weight of the KL term")
    train.add_argument(
        "--kl-warmup", type=_non_negative_int, default=0, help="steps of linear beta warm-up from 0"
    )
    train.add_argument("--iw-samples", type=_positive_int, default=1, help="K > 1 trains on the IWAE_K bound")
    train.add_argument(
        "--fused",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the Triton kernels (default: on CUDA; elsewhere the PyTorch reference)",
    )
    train.add_argument("--compile", action="store_true", help="torch.compile the loss step")
    train.add_argument("--amp", choices=("off", "bf16"), default="off", help="autocast the forward to bf16")
    train.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    train.add_argument("--seed", type=_non_negative_int, default=0)
    out = parser.add_argument_group("output")
    out.add_argument("--out", help="run directory (default: runs/<dataset>-<timestamp>)")
    out.add_argument("--log-every", type=_positive_int, default=50, help="steps between statistics reads")
    out.add_argument(
        "--eval-every",
        type=_non_negative_int,
        default=0,
        help="steps between test evaluations (0: each epoch end)",
    )
    return parser


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"--device {name!r} is not a device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def resolve_impl(fused: bool | None, device: torch.device) -> str:
    """--fused/--no-fused -> the ops' impl: "auto" (Triton on CUDA), "triton" or "torch"."""
    if fused is None:
        return "auto"
    if not fused:
        return "torch"
    if device.type == "cuda" or (device.type == "cpu" and checks.interpreter_enabled()):
        return "triton"
    raise ConfigError(
        f"--fused needs a CUDA device for the Triton kernels, and the device is {device}. Use --no-fused "
        "(the PyTorch reference), or set TRITON_INTERPRET=1 to run the kernels on the CPU (very slow)."
    )


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def make_config(args: argparse.Namespace, device: torch.device, splits: DataSplits) -> dict[str, Any]:
    """Every setting of the run, resolved, plus the data shape and the versions of the software."""
    config = vars(args).copy()
    config.update(
        hidden=[h for group in args.hidden or [[400]] for h in group],
        device=str(device),
        impl=resolve_impl(args.fused, device),
        data_shape=list(splits.sample_shape),
        num_train=len(splits.train),
        num_test=len(splits.test),
        versions={"torch": str(torch.__version__), "triton": _version("triton"), "fastvae": fastvae.__version__},
        command=" ".join([Path(sys.executable).name, "-m", "fastvae.train", *sys.argv[1:]]),
        started=datetime.now().isoformat(timespec="seconds"),
    )
    config["fused"] = config["impl"] == "triton" or (config["impl"] == "auto" and device.type == "cuda")
    return config


def build_model(config: dict[str, Any]) -> VAE:
    """The VAE a config describes (also used by `fastvae.evaluate`), on the CPU."""
    try:
        return VAE(
            tuple(config["data_shape"]),
            config["latent_dim"],
            arch=config["arch"],
            hidden=tuple(config["hidden"]),
            likelihood=config["likelihood"],
            sigma=config["sigma"],
            beta=config["beta"],
            impl=config["impl"],
        )
    except ValueError as err:
        raise ConfigError(str(err).replace("`", "")) from None


def default_out_dir(dataset: str) -> Path:
    stem = Path(dataset).stem if dataset.lower().endswith((".npz", ".npy", ".pt")) else dataset
    return Path("runs") / f"{stem}-{datetime.now():%Y%m%d-%H%M%S}"


# ------------------------------------------------------------------------------------ the statistics


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


class RunningMeans:
    """Device-side sums of the `LossOutput` statistics; `read` is the only host synchronisation."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(STATS), dtype=torch.float64, device=device)
        self.count = 0

    def add(self, out: LossOutput) -> None:
        self.sums += torch.stack([out.loss.detach(), out.elbo, out.kl, out.log_px, out.iwae]).double()
        self.count += 1

    def read(self) -> dict[str, float]:
        means = (self.sums / self.count).tolist()
        self.sums.zero_()
        self.count = 0
        return dict(zip(STATS, means, strict=True))


@torch.no_grad()
def test_statistics(model: VAE, test: DeviceBatches, amp: str) -> dict[str, float]:
    """Test ELBO, KL and log p(x|z) over the whole split (one draw of z per sample), nats per sample."""
    sums = torch.zeros(3, dtype=torch.float64, device=test.device)
    for x in test.epoch(0):
        with autocast(test.device, amp):
            log_px, kl = model.log_px_and_kl(x)
        sums += torch.stack([(log_px - kl).sum(), kl.sum(), log_px.sum()]).double()
    elbo, kl, log_px = (sums / len(test.data)).tolist()
    return {"test_elbo": elbo, "test_kl": kl, "test_log_px": log_px}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------- the loop


@dataclass
class Trainer:
    """One training run: the model, its optimizer, the data on the device and the run's records."""

    config: dict[str, Any]
    model: VAE
    train: DeviceBatches
    test: DeviceBatches
    metrics: IO[str]
    device: torch.device
    step: int = 0
    train_seconds: float = 0.0
    train_samples: int = 0
    last: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=self.config["lr"], fused=self.device.type == "cuda"
        )
        self.loss_step = self._make_loss_step()
        self.running = RunningMeans(self.device)
        self.started = time.perf_counter()
        self._window_start = self.started
        self._window_samples = 0

    def _make_loss_step(self) -> Callable[[torch.Tensor, float], LossOutput]:
        iw_samples, amp = self.config["iw_samples"], self.config["amp"]

        def loss_step(x: torch.Tensor, beta: float) -> LossOutput:
            with autocast(self.device, amp):
                return self.model.loss(x, beta=beta, iw_samples=iw_samples)

        return torch.compile(loss_step) if self.config["compile"] else loss_step

    def beta(self) -> float:
        """The KL weight at the current step: linear from 0 over --kl-warmup steps, then --beta."""
        warmup = self.config["kl_warmup"]
        return self.config["beta"] * (min(1.0, self.step / warmup) if warmup else 1.0)

    def train_step(self, x: torch.Tensor) -> None:
        out = self.loss_step(x, self.beta())
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        self.running.add(out)
        self.step += 1
        self._window_samples += len(x)

    def write(self, row: dict[str, Any]) -> None:
        row["wall_time_s"] = round(time.perf_counter() - self.started, 3)
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        self.last[row["kind"]] = row
        self.history.append(row)

    def log_train(self, epoch: int) -> None:
        """Read the running means (host sync), with the throughput since the previous reading."""
        if self.running.count == 0:
            return
        _synchronize(self.device)
        now = time.perf_counter()
        seconds = now - self._window_start
        self.train_seconds += seconds
        self.train_samples += self._window_samples
        row = {"kind": "train", "step": self.step, "epoch": epoch, "beta": self.beta(), **self.running.read()}
        if self.config["iw_samples"] == 1:
            del row["iwae"]  # the same as the ELBO
        row["samples_per_s"] = self._window_samples / seconds if seconds > 0 else None
        self.write(row)
        self._window_start, self._window_samples = now, 0

    def evaluate(self, epoch: int) -> None:
        """Log the pending training statistics, evaluate on the test split; excluded from the timing."""
        self.log_train(epoch)
        self.model.eval()
        stats = test_statistics(self.model, self.test, self.config["amp"])
        self.write({"kind": "eval", "step": self.step, "epoch": epoch, **stats})
        self.model.train()
        self._window_start = time.perf_counter()

    def epoch(self, epoch: int) -> Iterator[None]:
        """Train one epoch, yielding after every step (for the progress bar)."""
        log_every, eval_every = self.config["log_every"], self.config["eval_every"]
        for x in self.train.epoch(epoch):
            self.train_step(x)
            if eval_every and self.step % eval_every == 0:
                self.evaluate(epoch)
            elif self.step % log_every == 0:
                self.log_train(epoch)
            yield
        if not eval_every:
            self.evaluate(epoch)
        self.log_train(epoch)

    def save_checkpoint(self, path: Path, epoch: int) -> None:
        """model, optimizer, step, epoch (completed) and config; written to a temp file, then renamed."""
        tmp = path.with_name(path.name + ".tmp")
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": epoch,
            "config": self.config,
        }
        torch.save(state, tmp)
        os.replace(tmp, path)


# ------------------------------------------------------------------------------------ presentation


def _stats_text(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    speed = row.get("samples_per_s")
    return (
        f"loss {row['loss']:.2f}  ELBO {row['elbo']:.2f}  KL {row['kl']:.2f}  "
        + (f"{speed:,.0f} samples/s" if speed else "")
    ).rstrip()


def run_epochs(trainer: Trainer, console: Console, out_dir: Path) -> None:
    """All epochs, with a progress bar per epoch (on a terminal) or a line per epoch (otherwise)."""
    epochs = trainer.config["epochs"]
    progress = Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[stats]}"),
        console=console,
        disable=not console.is_terminal,
    )
    with progress:
        for epoch in range(epochs):
            task = progress.add_task("", total=len(trainer.train), epoch=f"{epoch + 1}/{epochs}", stats="")
            for _ in trainer.epoch(epoch):
                progress.update(task, advance=1, stats=_stats_text(trainer.last.get("train")))
            trainer.save_checkpoint(out_dir / "checkpoint.pt", epoch + 1)
            test = trainer.last["eval"]["test_elbo"]
            progress.update(task, stats=f"{_stats_text(trainer.last['train'])}  test ELBO {test:.2f}")
            if not console.is_terminal:
                console.print(
                    f"epoch {epoch + 1}/{epochs}: {_stats_text(trainer.last['train'])}, test ELBO {test:.2f}"
                )


def write_pictures(trainer: Trainer, splits: DataSplits, out_dir: Path) -> list[str]:
    """samples.png and reconstructions.png for image data, and loss.png; returns what was skipped."""
    model, shape = trainer.model, splits.sample_shape
    model.eval()
    skipped = []
    if len(shape) == 3 and shape[0] in (1, 3):
        save_grid(model.sample(64), out_dir / "samples.png", nrow=8)
        originals = splits.test[:8].to(trainer.device)
        originals = originals.float() / 255 if originals.dtype == torch.uint8 else originals.float()
        save_reconstructions(originals, model.reconstruct(originals), out_dir / "reconstructions.png")
    else:
        skipped = [f"samples.png, reconstructions.png: the data are not images (sample shape {shape})"]
    series = {
        "train ELBO": [(r["step"], r["elbo"]) for r in trainer.history if r["kind"] == "train"],
        "test ELBO": [(r["step"], r["test_elbo"]) for r in trainer.history if r["kind"] == "eval"],
    }
    plot_lines(
        series,
        out_dir / "loss.png",
        title="ELBO during training",
        xlabel="step",
        ylabel="ELBO (nats per sample)",
    )
    return skipped


def _ops_name(config: dict[str, Any]) -> str:
    return "fused Triton ops" if config["fused"] else "PyTorch reference ops"


def summary_table(trainer: Trainer) -> Table:
    train, test, config = trainer.last["train"], trainer.last["eval"], trainer.config
    table = Table(title="fastvae training run", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("data", f"{config['dataset']}: {config['num_train']} train, {config['num_test']} test"),
        (
            "device / ops",
            f"{config['device']} / {'fused Triton' if config['fused'] else 'PyTorch reference'}",
        ),
        ("epochs / steps", f"{config['epochs']} / {trainer.step}"),
        ("train loss (last log)", f"{train['loss']:.3f}"),
        ("train ELBO / KL", f"{train['elbo']:.3f} / {train['kl']:.3f}"),
        ("test ELBO", f"{test['test_elbo']:.3f} nats per sample"),
        ("throughput", f"{trainer.train_samples / trainer.train_seconds:,.0f} samples/s"),
        (
            "training time",
            f"{trainer.train_seconds:.1f} s (wall {time.perf_counter() - trainer.started:.1f} s)",
        ),
    ]
    if config["iw_samples"] > 1:
        rows.insert(5, (f"train IWAE_{config['iw_samples']}", f"{train['iwae']:.3f}"))
    for name, value in rows:
        table.add_row(name, value)
    return table


# ---------------------------------------------------------------------------------------------- main


def train(args: argparse.Namespace, console: Console) -> Path:
    """Run the training that `args` describe; returns the run directory."""
    device = resolve_device(args.device)
    resolve_impl(args.fused, device)  # fail before loading any data
    splits = load_dataset(
        args.dataset,
        data_dir=args.data_dir,
        download=args.download,
        seed=args.seed,
        num_train=args.num_train,
        num_test=args.num_test,
        image_size=args.image_size,
    )
    config = make_config(args, device, splits)
    torch.manual_seed(args.seed)
    model = build_model(config).to(device)
    out_dir = Path(args.out) if args.out else default_out_dir(args.dataset)
    out_dir.mkdir(parents=True, exist_ok=True)
    config["out"] = str(out_dir)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    train_batches = DeviceBatches(splits.train, args.batch_size, device=device, seed=args.seed)
    test_batches = DeviceBatches(splits.test, EVAL_BATCH, device=device, seed=args.seed, drop_last=False)
    console.print(
        f"Training on {splits.name} {tuple(splits.sample_shape)}: {len(splits.train)} train, "
        f"{len(splits.test)} test samples; {device}, {_ops_name(config)}. Run directory: {out_dir}"
    )
    with open(out_dir / "metrics.jsonl", "w") as metrics:
        trainer = Trainer(config, model, train_batches, test_batches, metrics, device)
        run_epochs(trainer, console, out_dir)
    skipped = write_pictures(trainer, splits, out_dir)
    console.print(summary_table(trainer))
    drawn = [str(out_dir / name) for name in PICTURES if (out_dir / name).exists()]
    console.print("Pictures: " + ", ".join(drawn), soft_wrap=True)  # paths stay whole
    for reason in skipped:
        console.print(f"Skipped {reason}")
    console.print(f"Evaluate with: python -m fastvae.evaluate {out_dir}", soft_wrap=True)
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        train(args, Console())
    except (DataError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
