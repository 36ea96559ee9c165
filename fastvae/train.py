"""Train a VAE from the command line: `python -m fastvae.train [options]` (`--help` lists them).

The whole data set lives on the device; the hot loop keeps running sums of the statistics and of the
gradient norm there and reads them (one host synchronisation) every `--log-every` steps; a non-finite
sum stops the run with a diagnosis of the first bad step (exit code 3). RUN_DIR (`--out`) receives
config.json, metrics.jsonl, checkpoint.pt, samples.png, reconstructions.png and loss.png. All
statistics are in nats per sample.

Reliability (docs/training.md): checkpoint.pt is written atomically at each epoch end, every
`--checkpoint-every` steps, on SIGINT/SIGTERM and at `--stop-after`; `--resume RUN_DIR` continues a
run exactly (bitwise on the CPU). Exit codes: 0 done (or stopped by --stop-after), 2 bad options,
data or checkpoint, 3 non-finite training, 130 SIGINT, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import shlex
import signal
import sys
import threading
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
from fastvae import checkpoint as ckpt
from fastvae import checks
from fastvae.data import DataError, DataSplits, DeviceBatches, load_dataset
from fastvae.distributed import DistributedContext, LossForward, seed_noise
from fastvae.images import plot_lines, save_grid, save_reconstructions
from fastvae.model import ARCHS, VAE, LossOutput

STATS = ("loss", "elbo", "kl", "log_px", "iwae")
EVAL_BATCH = 1000  # rows per evaluation batch
PICTURES = ("samples.png", "reconstructions.png", "loss.png")


class ConfigError(Exception):
    """A bad combination of options or an unusable device: printed as is, exit code 2."""


class NonFiniteError(Exception):
    """The device-side flag saw a non-finite loss or gradient norm since the last good state."""


class TrainingDiverged(Exception):
    """The diagnosis of a non-finite step, printed as is: exit code 3."""


class RunStopped(Exception):  # noqa: N818 (a normal outcome, not an error)
    """The run stopped early with a checkpoint (signal or --stop-after); `code` is the exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class ImmediateExit(BaseException):  # noqa: N818
    """A second SIGINT/SIGTERM: leave at once, without saving (BaseException: nothing catches it on the way)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


EXIT_NONFINITE = 3
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


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


def _float_at_least(minimum: float, strict: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            relation = ">" if strict else ">="
            raise argparse.ArgumentTypeError(f"must be a finite number {relation} {minimum:g}, got {text}")
        return value

    return parse


_positive_float = _float_at_least(0.0, strict=True)
_non_negative_float = _float_at_least(0.0, strict=False)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2) instead of the whole usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the options)\n")


# Settings a resumed run may change; every other one is part of the run and must stay as it was.
RESUME_MAY_CHANGE = ("epochs", "log_every", "checkpoint_every", "device", "data_dir", "download")
# Settings of one invocation, never taken over from the run being resumed.
PER_INVOCATION = ("resume", "overwrite", "stop_after", "out")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    train.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam's learning rate")
    train.add_argument("--beta", type=_non_negative_float, default=1.0, help="weight of the KL term")
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
    out.add_argument(
        "--overwrite", action="store_true", help="train into an existing non-empty --out (replaces its run files)"
    )
    reliable = parser.add_argument_group("checkpoints and resume (see docs/training.md)")
    reliable.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its checkpoint.pt; only --epochs, --log-every, "
        "--checkpoint-every, --device, --data-dir, --download and --stop-after may be given anew",
    )
    reliable.add_argument(
        "--checkpoint-every",
        type=_non_negative_int,
        default=0,
        help="steps between checkpoints, besides the one at each epoch end (0: epoch ends only)",
    )
    reliable.add_argument(
        "--stop-after",
        type=_positive_int,
        metavar="STEPS",
        help="stop once the run has done STEPS steps in all, with a checkpoint to --resume from (exit code 0)",
    )
    return parser


def explicit_options(argv: Sequence[str]) -> set[str]:
    """The settings (dests) given on the command line `argv`, as opposed to their defaults."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


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
    """Device-side sums of the `LossOutput` statistics and of the gradient norm; `read` is the only host
    synchronisation. A non-finite value stays in its sum (inf and NaN are sticky) until the next `read`,
    which is how the non-finite guard sees a bad loss or gradient without a per-step sync.
    Under torchrun `read` averages over the ranks too and `finite` looks at every rank (collectives: every
    rank calls them at the same step), so the statistics cover the global batch; `sums` are this rank's."""

    def __init__(self, device: torch.device, ctx: DistributedContext | None = None) -> None:
        self.sums = torch.zeros(len(STATS) + 1, dtype=torch.float64, device=device)
        self.count = 0
        self.ctx = ctx or DistributedContext()

    def add(self, out: LossOutput, grad_norm: torch.Tensor | None = None) -> None:
        norm = out.loss.new_zeros(()) if grad_norm is None else grad_norm
        self.sums += torch.stack([out.loss.detach(), out.elbo, out.kl, out.log_px, out.iwae, norm]).double()
        self.count += 1

    def read(self) -> dict[str, float]:
        """The means since the previous read, by STATS name, and "grad_norm" (of the summed gradient norms)."""
        total = self.ctx.all_reduce_sum(self.sums.clone())
        means = (total / (self.count * self.ctx.world_size)).tolist()
        self.sums.zero_()
        self.count = 0
        return dict(zip((*STATS, "grad_norm"), means, strict=True))

    def finite(self) -> bool:
        """No non-finite value since the previous read (a host sync)."""
        return not self.ctx.any_true(~torch.isfinite(self.sums).all())


@torch.no_grad()
def test_statistics(
    model: VAE, test: DeviceBatches, amp: str, ctx: DistributedContext | None = None
) -> dict[str, float]:
    """Test ELBO, KL and log p(x|z) over the whole split (one draw of z per sample), nats per sample.

    Under torchrun each rank evaluates its shard of the split (`test` is sharded) and the sums are all-reduced.
    """
    sums = torch.zeros(3, dtype=torch.float64, device=test.device)
    for x in test.epoch(0):
        with autocast(test.device, amp):
            log_px, kl = model.log_px_and_kl(x)
        sums += torch.stack([(log_px - kl).sum(), kl.sum(), log_px.sum()]).double()
    (ctx or DistributedContext()).all_reduce_sum(sums)
    elbo, kl, log_px = (sums / len(test.data)).tolist()
    return {"test_elbo": elbo, "test_kl": kl, "test_log_px": log_px}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------- the loop


@dataclass
class Trainer:
    """One training run: the model, its optimizer, the data on the device and the run's records.

    `checkpoint_path` (None: no checkpoints) is where `save_checkpoint` writes. Every step adds its
    loss and its gradient norm to device-side sums (`running`); `log_train` reads them and raises
    NonFiniteError when one is not finite, after which `diagnose` re-runs the steps since the last
    good state (a copy kept at each clean statistics reading) to say which step and which term failed.
    """

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
    checkpoint_path: Path | None = None
    ctx: DistributedContext = field(default_factory=DistributedContext)  # torchrun: this process's rank

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=self.config["lr"], fused=self.device.type == "cuda"
        )
        # Under torchrun: DistributedDataParallel, which averages the gradients over the ranks in backward.
        self.loss_module = self.ctx.wrap(LossForward(self.model), self.device)
        self.loss_step = self._make_loss_step()
        self.running = RunningMeans(self.device, self.ctx)
        self.metrics_rows = 0  # lines written to metrics.jsonl (kept in the checkpoint)
        self.stop_signal: int | None = None
        self.checkpoint_step: int | None = None  # the step of the last checkpoint written or loaded
        self._good: dict[str, Any] | None = None  # the state at the last clean statistics reading
        self.started = time.perf_counter()
        self._window_start = self.started
        self._window_samples = 0

    def _make_loss_step(self) -> Callable[[torch.Tensor, float], LossOutput]:
        iw_samples, amp = self.config["iw_samples"], self.config["amp"]

        def loss_step(x: torch.Tensor, beta: float) -> LossOutput:
            with autocast(self.device, amp):
                return self.loss_module(x, beta, iw_samples)

        return torch.compile(loss_step) if self.config["compile"] else loss_step

    def beta(self) -> float:
        """The KL weight at the current step: linear from 0 over --kl-warmup steps, then --beta."""
        warmup = self.config["kl_warmup"]
        return self.config["beta"] * (min(1.0, self.step / warmup) if warmup else 1.0)

    def train_step(self, x: torch.Tensor) -> None:
        out = self.loss_step(x, self.beta())
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        # The non-finite guard, on the device: the per-tensor gradient norms, summed into `running`.
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.stack(torch._foreach_norm(grads)).sum() if grads else None
        self.optimizer.step()
        self.running.add(out, grad_norm)
        self.step += 1
        self._window_samples += len(x) * self.ctx.world_size  # the global batch (the ranks' parts are equal)

    def write(self, row: dict[str, Any]) -> None:
        row["wall_time_s"] = round(time.perf_counter() - self.started, 3)
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        self.metrics_rows += 1
        self.last[row["kind"]] = row
        self.history.append(row)

    def log_train(self, epoch: int) -> None:
        """Read the running means (host sync), with the throughput since the previous reading.
        Raises NonFiniteError (writing no row) when a loss or gradient norm since then was not finite."""
        if self.running.count == 0:
            return
        _synchronize(self.device)
        means = self.running.read()
        if not all(math.isfinite(v) for v in means.values()):
            raise NonFiniteError
        del means["grad_norm"]
        now = time.perf_counter()
        seconds = now - self._window_start
        self.train_seconds += seconds
        self.train_samples += self._window_samples
        row = {"kind": "train", "step": self.step, "epoch": epoch, "beta": self.beta(), **means}
        if self.config["iw_samples"] == 1:
            del row["iwae"]  # the same as the ELBO
        row["samples_per_s"] = self._window_samples / seconds if seconds > 0 else None
        self.write(row)
        self._window_start, self._window_samples = now, 0

    def evaluate(self, epoch: int) -> None:
        """Log the pending training statistics, evaluate on the test split; excluded from the timing."""
        self.log_train(epoch)
        self.model.eval()
        stats = test_statistics(self.model, self.test, self.config["amp"], self.ctx)
        self.write({"kind": "eval", "step": self.step, "epoch": epoch, **stats})
        self.model.train()
        self._window_start = time.perf_counter()

    def epoch(self, epoch: int, start: int = 0) -> Iterator[None]:
        """Train one epoch from batch `start` on, yielding after every step (for the progress bar and
        for stopping: after a yield the state is complete and `capture` gives it). The epoch-end
        evaluation runs after the last yield, also when `start` is the end of the epoch."""
        log_every, eval_every = self.config["log_every"], self.config["eval_every"]
        for x in self.train.epoch(epoch, start):
            self.train_step(x)
            if eval_every and self.step % eval_every == 0:
                self.evaluate(epoch)
                self._keep_good(epoch, self.train.position)
            elif self.step % log_every == 0:
                self.log_train(epoch)
                self._keep_good(epoch, self.train.position)
            yield
        if not eval_every:
            self.evaluate(epoch)
        self.log_train(epoch)
        self._keep_good(epoch + 1, 0)

    # ------------------------------------------------------------------------------ state and checkpoints

    def capture(self, epoch: int, position: int) -> dict[str, Any]:
        """A copy of everything the run's future depends on; training resumes at batch `position` of
        `epoch`. The checkpoint payload, less the permutation."""
        return ckpt.clone(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "epoch": epoch,
                "position": position,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                },
                "running": {"sums": self.running.sums, "count": self.running.count},
                "metrics_rows": self.metrics_rows,
                "train_seconds": self.train_seconds,
                "train_samples": self.train_samples,
                "config": self.config,
            }
        )

    def restore(self, state: dict[str, Any]) -> None:
        """Put the run back in a captured (or checkpointed) state."""
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as err:
            problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"{self.checkpoint_path} does not fit the run's model: {problem}") from None
        self.step = state["step"]
        own = self._own_part(state)
        if own is None:  # written by another number of processes: this rank's noise restarts, and the
            seed_noise(self.config["seed"], self.ctx.rank, self.step)  # ranks share the window's sums
            sums = [part["running"]["sums"] for part in state["ranks"]]
            own = {"running": {"sums": sum(sums) / len(sums), "count": state["running"]["count"]}}
        else:
            torch.set_rng_state(own["rng"]["torch"])
            if self.device.type == "cuda" and own["rng"]["cuda"]:
                torch.cuda.set_rng_state_all(own["rng"]["cuda"])
        self.running.sums.copy_(own["running"]["sums"])
        self.running.count = own["running"]["count"]
        self.metrics_rows = state["metrics_rows"]
        self.train_seconds = state.get("train_seconds", 0.0)
        self.train_samples = state.get("train_samples", 0)

    def _own_part(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """This rank's RNG state and statistics window in `state`, or None when it has none.

        A checkpoint holds every rank's, under "ranks" (rank order); one written by a different number of
        processes has none for this rank. A `capture` holds this process's own.
        """
        parts = state.get("ranks")
        if parts is None:
            return state
        return parts[self.ctx.rank] if len(parts) == self.ctx.world_size else None

    def _keep_good(self, epoch: int, position: int) -> None:
        """Called after a clean statistics reading: the state to re-run from if a later step fails."""
        self._good = self.capture(epoch, position)

    def all_finite(self) -> bool:
        """The statistics since the last reading and every parameter are finite (a host sync)."""
        params = [p.detach() for p in self.model.parameters()]
        return self.running.finite() and all(bool(torch.isfinite(p).all()) for p in params)

    def save_checkpoint(self, epoch: int, position: int) -> None:
        """Write checkpoint.pt atomically for a resume at batch `position` of `epoch`; never a
        non-finite one (raises NonFiniteError instead)."""
        if self.checkpoint_path is None:
            return
        _synchronize(self.device)
        if not self.all_finite():
            raise NonFiniteError
        state = self.capture(epoch, position)
        state["permutation"] = self.train.permutation(epoch).cpu()
        own = {"rng": state["rng"], "running": {**state["running"], "sums": state["running"]["sums"].cpu()}}
        state["ranks"] = self.ctx.all_gather_object(own)  # every rank's noise and window; rank 0 writes
        if self.ctx.is_main:
            ckpt.save(self.checkpoint_path, state)
        self.ctx.barrier()  # no rank leaves (and has torchrun stop the others) before the file is written
        self.checkpoint_step = self.step

    def should_stop(self) -> bool:
        """--stop-after reached, or a signal came. Under torchrun the ranks agree on a signal at the
        statistics readings (every --log-every steps), so that they all stop after the same step."""
        stop_after = self.config.get("stop_after")
        if stop_after is not None and self.step >= stop_after:
            return True
        if not self.ctx.is_distributed:
            return self.stop_signal is not None
        if self.step % self.config["log_every"]:
            return False
        return self.ctx.any_true(torch.tensor(self.stop_signal is not None, device=self.device))

    def on_signal(self, signum: int, frame: object) -> None:
        """SIGINT/SIGTERM: stop after the current step; a second one leaves at once."""
        if self.stop_signal is not None:
            raise ImmediateExit(signum)
        self.stop_signal = signum

    # -------------------------------------------------------------------------------------- diagnosis

    def diagnose(self) -> str:
        """Re-run the steps since the last good state, checking each, and describe the first bad one."""
        detected, good = self.step, self._good
        where = self._checkpoint_text()
        if good is None:
            return f"a non-finite loss or gradient before step {detected}. {where}"
        self.restore(good)
        epoch, position = good["epoch"], good["position"]
        if position >= len(self.train):
            epoch, position = epoch + 1, 0
        params = dict(self.model.named_parameters())
        for x in self.train.epoch(epoch, position):
            if self.step >= detected:
                break
            beta, lr = self.beta(), self.optimizer.param_groups[0]["lr"]
            with torch.no_grad(), autocast(self.device, self.config["amp"]):
                _, logvar = self.model.encode(x)
            max_logvar = logvar.detach().abs().max().item()
            out = self.loss_step(x, beta)
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            terms = [name for name, value in (("KL", out.kl), ("log-likelihood", out.log_px)) if not value.isfinite()]
            if not out.loss.isfinite() and not terms:
                terms = ["loss"]
            modules = sorted(
                {
                    name.rpartition(".")[0] or name
                    for name, p in params.items()
                    if p.grad is not None and not bool(torch.isfinite(p.grad).all())
                }
            )
            if self.ctx.any_true(torch.tensor(bool(terms or modules), device=self.device)):  # on any rank
                what = [f"the {' and the '.join(terms)} went non-finite"] if terms else []
                if modules:
                    what.append(f"non-finite gradients of {', '.join(modules)}")
                if not what:
                    what = ["a non-finite loss in another process's part of the batch"]
                hint = f"Try a lower --lr (now {lr:g})" + (" or --amp off" if self.config["amp"] != "off" else "")
                return (
                    f"training diverged at step {self.step + 1}: {'; '.join(what)}. Largest |logvar| "
                    f"{max_logvar:.4g}, learning rate {lr:g}. {where} {hint}."
                )
            self.optimizer.step()
            self.step += 1
        return (
            f"a non-finite loss or gradient between steps {good['step'] + 1} and {detected}, which did not "
            f"recur when those steps were re-run. {where} Try a lower --lr or --amp off."
        )

    def _checkpoint_text(self) -> str:
        if self.checkpoint_step is None or self.checkpoint_path is None:
            return "No checkpoint was written."
        return f"The last good checkpoint is {self.checkpoint_path} (step {self.checkpoint_step})."


# ------------------------------------------------------------------------------------ presentation


def _stats_text(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    speed = row.get("samples_per_s")
    return (
        f"loss {row['loss']:.2f}  ELBO {row['elbo']:.2f}  KL {row['kl']:.2f}  "
        + (f"{speed:,.0f} samples/s" if speed else "")
    ).rstrip()


def run_epochs(trainer: Trainer, console: Console, start_epoch: int = 0, start_position: int = 0) -> None:
    """All epochs from batch `start_position` of `start_epoch` on, with a progress bar per epoch (on a
    terminal) or a line per epoch (otherwise). Writes a checkpoint at each epoch end and every
    --checkpoint-every steps; on a signal or at --stop-after it writes one and raises RunStopped."""
    epochs, every = trainer.config["epochs"], trainer.config.get("checkpoint_every") or 0
    progress = Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[stats]}"),
        console=console,
        disable=not console.is_terminal,
    )
    trainer._keep_good(start_epoch, start_position)
    with progress:
        for epoch in range(start_epoch, epochs):
            start = start_position if epoch == start_epoch else 0
            task = progress.add_task(
                "", total=len(trainer.train), completed=start, epoch=f"{epoch + 1}/{epochs}", stats=""
            )
            for _ in trainer.epoch(epoch, start):
                progress.update(task, advance=1, stats=_stats_text(trainer.last.get("train")))
                if trainer.should_stop():
                    trainer.save_checkpoint(epoch, trainer.train.position)
                    raise RunStopped(0 if trainer.stop_signal is None else SIGNAL_EXIT[trainer.stop_signal])
                if every and trainer.step % every == 0:
                    trainer.save_checkpoint(epoch, trainer.train.position)
            trainer.save_checkpoint(epoch + 1, 0)
            test = trainer.last["eval"]["test_elbo"]
            progress.update(task, stats=f"{_stats_text(trainer.last.get('train'))}  test ELBO {test:.2f}")
            if not console.is_terminal:
                console.print(
                    f"epoch {epoch + 1}/{epochs}: {_stats_text(trainer.last.get('train'))}, test ELBO {test:.2f}"
                )
            if trainer.should_stop() and epoch + 1 < epochs:
                raise RunStopped(0 if trainer.stop_signal is None else SIGNAL_EXIT[trainer.stop_signal])


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

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", *PICTURES, "eval.json")
_FUSED_OF_IMPL = {"auto": None, "triton": True, "torch": False}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_options(args: argparse.Namespace, explicit: set[str]) -> None:
    """Conflicts between options that argparse does not see; each a one-line ConfigError."""
    if args.resume is not None and args.overwrite:
        raise ConfigError(
            "--resume and --overwrite exclude each other: --resume continues a run, --overwrite starts one afresh"
        )
    if args.resume is not None and "out" in explicit:
        raise ConfigError("--resume RUN_DIR names the run directory already; leave out --out")
    if args.resume is not None:
        return  # the other settings come from the run; resume_settings checks what was given anew
    if "sigma" in explicit and args.likelihood != "gaussian":
        raise ConfigError(f"--sigma applies to --likelihood gaussian only, not {args.likelihood}")
    if "image_size" in explicit and args.dataset != "sprites":
        raise ConfigError(f"--image-size applies to --dataset sprites only, not {args.dataset}")


def _comparable(dest: str, value: Any) -> Any:
    """A command-line value in the form config.json stores it."""
    if dest == "hidden" and value is not None:
        return [h for group in value for h in group]
    return value


def _stored(dest: str, config: dict[str, Any]) -> Any:
    if dest == "fused":
        return _FUSED_OF_IMPL.get(config.get("impl"), config.get("fused"))
    return config.get(dest)


def resume_settings(
    args: argparse.Namespace, explicit: set[str]
) -> tuple[argparse.Namespace, dict[str, Any], dict[str, Any]]:
    """--resume RUN_DIR: the run's settings with the allowed changes, its checkpoint and its config."""
    run_dir = Path(args.resume)
    if not run_dir.is_dir():
        raise ConfigError(f"--resume {run_dir}: no such run directory")
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: {path} not found, so there is nothing to resume from")
    state = ckpt.load(path)
    old = state["config"]
    allowed = ", ".join(_flag(d) for d in (*RESUME_MAY_CHANGE, "stop_after"))
    for dest in sorted(explicit - set(RESUME_MAY_CHANGE) - set(PER_INVOCATION)):
        new, before = _comparable(dest, getattr(args, dest)), _stored(dest, old)
        if new != before:
            raise ConfigError(
                f"--resume {run_dir}: {_flag(dest)} {json.dumps(new)} differs from the run's {json.dumps(before)}; "
                f"a resumed run keeps its settings (only {allowed} may change)"
            )
    settings = {dest: old.get(dest) for dest in vars(args)}
    settings.update(
        hidden=[old["hidden"]], fused=_stored("fused", old), **{d: getattr(args, d) for d in PER_INVOCATION}
    )
    settings.update({d: getattr(args, d) for d in RESUME_MAY_CHANGE if d in explicit})
    settings["out"] = str(run_dir)
    if settings.get("checkpoint_every") is None:
        settings["checkpoint_every"] = 0
    if settings["epochs"] <= state["epoch"]:
        raise ConfigError(
            f"--resume {run_dir}: the run has completed {state['epoch']} of --epochs {settings['epochs']}; "
            f"pass a larger --epochs to train further"
        )
    if args.stop_after is not None and args.stop_after <= state["step"]:
        raise ConfigError(f"--stop-after {args.stop_after}: the run is at step {state['step']} already")
    return argparse.Namespace(**settings), state, old


def prepare_out_dir(args: argparse.Namespace) -> Path:
    """The run directory of a fresh run: a non-empty one is refused, unless --overwrite."""
    out_dir = Path(args.out) if args.out else default_out_dir(args.dataset)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not args.overwrite:
            raise ConfigError(
                f"--out {out_dir} is not empty: pass --resume {out_dir} to continue its run, or --overwrite "
                "to replace it"
            )
        for name in RUN_FILES:
            (out_dir / name).unlink(missing_ok=True)
    return out_dir


def data_fingerprint(splits: DataSplits) -> str:
    digest = hashlib.sha256()
    for split in (splits.train, splits.test):
        digest.update(str((tuple(split.shape), str(split.dtype))).encode())
        digest.update(split.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _check_same_data(config: dict[str, Any], old: dict[str, Any], run_dir: Path) -> None:
    for key in ("data_shape", "num_train", "num_test", "data_sha256"):
        if key in old and config[key] != old[key]:
            raise ConfigError(
                f"--resume {run_dir}: the data set differs from the run's ({key} {json.dumps(config[key])}, "
                f"was {json.dumps(old[key])})"
            )


def _write_json(path: Path, obj: Any) -> None:
    ckpt.atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def _restore_metrics(path: Path, rows: int) -> list[dict[str, Any]]:
    """Cut metrics.jsonl back to the `rows` lines the checkpoint knows of; returns them."""
    lines = path.read_text().splitlines() if path.is_file() else []
    if len(lines) < rows:
        raise ConfigError(f"{path} has {len(lines)} rows, fewer than the {rows} the checkpoint was written after")
    try:
        history = [json.loads(line) for line in lines[:rows]]
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is corrupt: {err}") from None
    ckpt.atomic_write(path, lambda f: f.write("".join(line + "\n" for line in lines[:rows]).encode()))
    return history


@contextlib.contextmanager
def _signals_to(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Route SIGINT and SIGTERM to `handler` (in the main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in SIGNAL_EXIT}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def train(args: argparse.Namespace, console: Console, explicit: set[str] | None = None) -> Path:
    """Run the training that `args` describe; returns the run directory.

    `explicit`: the settings given on the command line (default: those that differ from the defaults).
    Raises ConfigError, DataError, CheckpointError (exit code 2), TrainingDiverged (3), RunStopped.
    """
    if explicit is None:
        defaults = vars(build_parser().parse_args([]))
        explicit = {k for k, v in vars(args).items() if v != defaults.get(k)}
    check_options(args, explicit)
    try:
        ctx = DistributedContext.from_env()  # torchrun's RANK, WORLD_SIZE and LOCAL_RANK (docs/distributed.md)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    state = old_config = None
    if args.resume is not None:
        args, state, old_config = resume_settings(args, explicit)  # every rank loads the checkpoint
        out_dir = Path(args.out)
    else:
        out_dir = prepare_out_dir(args) if ctx.is_main else None  # rank 0 prepares the run directory
    try:
        device = ctx.device(resolve_device(args.device))  # cuda:LOCAL_RANK under torchrun
    except ValueError as err:
        raise ConfigError(str(err)) from None
    resolve_impl(args.fused, device)  # fail before loading any data
    if not ctx.is_main:
        console = Console(quiet=True)  # rank 0 prints
    with ctx.session(device):
        out_dir = Path(ctx.broadcast_object(str(out_dir)))  # rank 0's (default_out_dir has a time stamp)
        return _train(args, console, ctx, device, out_dir, state, old_config)


def _train(
    args: argparse.Namespace,
    console: Console,
    ctx: DistributedContext,
    device: torch.device,
    out_dir: Path,
    state: dict[str, Any] | None,
    old_config: dict[str, Any] | None,
) -> Path:
    """`train` once the process group (under torchrun) is up: every rank runs this."""
    splits = load_dataset(
        args.dataset,
        data_dir=args.data_dir,
        download=args.download,
        seed=args.seed,
        num_train=args.num_train,
        num_test=args.num_test,
        image_size=args.image_size,
    )
    if args.batch_size > len(splits.train):
        raise ConfigError(
            f"--batch-size {args.batch_size} is larger than the {len(splits.train)} training samples, so an "
            "epoch would have no batches; use a smaller --batch-size"
        )
    config = make_config(args, device, splits)
    config["data_sha256"] = data_fingerprint(splits)
    config["world_size"] = ctx.world_size
    if old_config is not None:
        _check_same_data(config, old_config, out_dir)
        resumed = {"step": state["step"], "command": config["command"], "started": config["started"]}
        resumed["world_size"] = ctx.world_size
        config = {**old_config, **{k: config[k] for k in (*RESUME_MAY_CHANGE, *PER_INVOCATION, "fused")}}
        config["resumed"] = [*old_config.get("resumed", []), resumed]
        config["world_size"] = ctx.world_size
    torch.manual_seed(args.seed)
    model = build_model(config).to(device)  # the same on every rank
    seed_noise(args.seed, ctx.rank)  # but each rank draws its own sampling noise
    shard = {"rank": ctx.rank, "world_size": ctx.world_size}  # --batch-size is the global batch
    train_batches = DeviceBatches(splits.train, args.batch_size, device=device, seed=args.seed, **shard)
    test_batches = DeviceBatches(
        splits.test, EVAL_BATCH, device=device, seed=args.seed, drop_last=False, **shard
    )
    config["out"] = str(out_dir)
    trainer = Trainer(config, model, train_batches, test_batches, io.StringIO(), device, ctx=ctx)
    trainer.checkpoint_path = out_dir / "checkpoint.pt"
    start_epoch = start_position = 0
    if state is not None:  # check that the run can continue before touching its files
        trainer.restore(state)
        start_epoch, start_position = state["epoch"], state["position"]
        if not torch.equal(state["permutation"], train_batches.permutation(start_epoch).cpu()):
            raise ConfigError(
                f"{trainer.checkpoint_path}: the data order of epoch {start_epoch} differs from the "
                "checkpoint's (another torch version?), so the run cannot continue exactly"
            )
        trainer.checkpoint_step = state["step"]
        if ctx.is_main:  # rank 0 writes the run directory
            trainer.history = _restore_metrics(out_dir / "metrics.jsonl", state["metrics_rows"])
        trainer.last = {row["kind"]: row for row in trainer.history}
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(out_dir / "config.json", config)
    console.print(
        f"Training on {splits.name} {tuple(splits.sample_shape)}: {len(splits.train)} train, "
        f"{len(splits.test)} test samples; {device}, {_ops_name(config)}. Run directory: {out_dir}"
        + (f"; {ctx.world_size} processes, global batch {args.batch_size}" if ctx.is_distributed else ""),
        soft_wrap=True,
    )
    if state is not None:
        console.print(f"Resuming at step {trainer.step} (epoch {start_epoch + 1}, batch {start_position}).")
    launcher = "torchrun [the same torchrun options]" if ctx.is_distributed else "python"
    resume_command = f"{launcher} -m fastvae.train --resume {shlex.quote(str(out_dir))}"
    metrics_path = out_dir / "metrics.jsonl" if ctx.is_main else Path(os.devnull)  # rank 0 writes
    with open(metrics_path, "a" if state else "w") as metrics:
        trainer.metrics = metrics
        try:
            with _signals_to(trainer.on_signal):
                run_epochs(trainer, console, start_epoch, start_position)
        except NonFiniteError:
            raise TrainingDiverged(trainer.diagnose()) from None
        except RunStopped:
            reason = (
                f"Interrupted by {signal.Signals(trainer.stop_signal).name}"
                if trainer.stop_signal is not None
                else "Stopped (--stop-after)"
            )
            console.print(
                f"{reason} after step {trainer.step}; checkpoint written to {trainer.checkpoint_path}.", soft_wrap=True
            )
            console.print(f"Resume with: {resume_command}", soft_wrap=True)
            raise
        except ImmediateExit as err:
            err.args = (f"{trainer._checkpoint_text()} Resume with: {resume_command}",)
            raise
    if not ctx.is_main:
        return out_dir
    skipped = write_pictures(trainer, splits, out_dir)
    console.print(summary_table(trainer))
    drawn = [str(out_dir / name) for name in PICTURES if (out_dir / name).exists()]
    console.print("Pictures: " + ", ".join(drawn), soft_wrap=True)  # paths stay whole
    for reason in skipped:
        console.print(f"Skipped {reason}")
    console.print(f"Evaluate with: python -m fastvae.evaluate {out_dir}", soft_wrap=True)
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        train(args, Console(), explicit_options(argv))
    except (DataError, ConfigError, ckpt.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except RunStopped as stop:
        return stop.code
    except ImmediateExit as err:
        name = signal.Signals(err.signum).name
        print(f"error: stopped at once by a second {name}, without saving. {err.args[0]}", file=sys.stderr)
        return SIGNAL_EXIT[err.signum]
    except KeyboardInterrupt:
        print("error: interrupted outside the training loop; nothing more was saved", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
