"""Train a VAE from the command line: `python -m fastvae.train [options]` (`--help` lists them).

The whole data set lives on the device; the hot loop keeps running sums of the statistics there and reads
them with the parameters' norm (one host synchronisation) every `--log-every` steps; a non-finite value
stops the run with a diagnosis of the first bad step (exit code 3). With --cuda-graphs each step is one
replay of a captured CUDA graph (fastvae/graphs.py). RUN_DIR (`--out`) receives
config.json, metrics.jsonl, checkpoint.pt and, at the end, the pictures of fastvae.pictures (unless
--no-pictures). All statistics are in nats per sample.

Reliability (docs/training.md): checkpoint.pt is written atomically at each epoch end, every
`--checkpoint-every` steps, on SIGINT/SIGTERM and at `--stop-after`; `--resume RUN_DIR` continues a
run exactly (bitwise on the CPU), and on a completed run draws the pictures that are missing. Exit
codes: 0 done (or stopped by --stop-after), 2 bad options, data or checkpoint, or an OS error (full
disk, unwritable or vanished run directory), 3 non-finite training, 130 SIGINT, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fastvae import checkpoint as ckpt
from fastvae.data import TEST_FRACTION, DataError, DataSplits, DeviceBatches, load_dataset, split_array
from fastvae.distributed import DistributedContext, PeerLost, seed_noise
from fastvae.engine import EVAL_BATCH, ImmediateExit, NonFiniteError, Trainer
from fastvae.model import VAE
from fastvae.options import (
    ConfigError,
    build_parser,
    check_cuda_graphs,
    check_options,
    explicit_options,
    make_config,
    resolve_device,
    resolve_impl,
)
from fastvae.own_model import GivenModel, check_own_model_options, model_args_of, model_settings, run_model
from fastvae.pictures import RunRecord, draw, pictures_of
from fastvae.rundir import (
    auto_resume,
    clear_run_files,
    data_file_digests,
    data_fingerprint,
    lock_run_dir,
    prepare_out_dir,
    restore_metrics,
    resume_settings,
    resumed_config,
    write_json,
)
from fastvae.tensorboard import EventLog, check_available

EXIT_NONFINITE = 3
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class RunIOError(Exception):
    """An OS error (full disk, read-only or vanished run directory) during the run: the message names the
    path, the system's reason, the last good checkpoint and the resume command. Exit code 2."""


class Interrupted(BaseException):  # noqa: N818
    """SIGINT or SIGTERM outside the training loop and the pictures (start-up, data loading)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def os_error_text(err: OSError) -> str:
    """`err` as one line: the path (or paths) it names and the system's reason (strerror)."""
    reason = err.strerror or (os.strerror(err.errno) if err.errno else str(err) or type(err).__name__)
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    return f"{paths}: {reason}" if paths else reason


def check_out_writable(out_dir: Path) -> None:
    """Raise OSError unless files can be made in `out_dir`, or, where it does not exist yet, in its nearest
    existing ancestor (which must be a directory). Nothing is left behind."""
    base = out_dir
    while not base.exists() and base.parent != base:
        base = base.parent
    if not base.is_dir():
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(base))
    probe = base / f".fastvae-write-test-{os.getpid()}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    probe.unlink()


def checkpoint_bytes(trainer: Trainer) -> int:
    """About how large checkpoint.pt gets, in bytes: the model, Adam's two moments per parameter, the
    data order, and 1 MiB for the rest (RNG states, settings, zip headers)."""
    params = sum(t.numel() * t.element_size() for t in trainer.model.state_dict().values())
    return 3 * params + 8 * len(trainer.train.data) + 2**20


def check_free_space(trainer: Trainer, out_dir: Path) -> None:
    """Raise ConfigError unless `out_dir`'s file system has room for a checkpoint write: the checkpoint,
    its temp file and the kept previous one (less the checkpoints already there)."""
    size = checkpoint_bytes(trainer)
    present = sum(p.stat().st_size for p in out_dir.glob("checkpoint*.pt") if p.is_file())
    need = 3 * size - present
    free = shutil.disk_usage(out_dir if out_dir.is_dir() else out_dir.parent).free
    if free < need:
        raise ConfigError(
            f"{out_dir}: {free / 2**20:.1f} MiB free, but writing a checkpoint of about "
            f"{size / 2**20:.1f} MiB needs {need / 2**20:.1f} MiB (the checkpoint, its temp file and the "
            "previous one); free some space or choose another --out"
        )


class TrainingDiverged(Exception):
    """The diagnosis of a non-finite step, printed as is: exit code 3."""


class PicturesInterrupted(Exception):
    """A SIGINT or SIGTERM while the final pictures were drawn: the message is printed, exit code 130 or 143."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class RunStopped(Exception):  # noqa: N818 (a normal outcome, not an error)
    """The run stopped early with a checkpoint (signal or --stop-after); `code` is the exit code, `run_dir`
    the run directory and `final` the last metrics rows by kind ("train", "eval"; those written so far)."""

    def __init__(self, code: int, run_dir: Path | None = None, final: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.run_dir = run_dir
        self.final = final or {}


# ------------------------------------------------------------------------------------ presentation


def _stopped(trainer: Trainer) -> RunStopped:
    """RunStopped with the exit code: 0 at --stop-after, 130 or 143 after SIGINT or SIGTERM."""
    code = 0 if trainer.stop_signal is None else SIGNAL_EXIT[trainer.stop_signal]
    return RunStopped(code, Path(trainer.config["out"]), final_rows(trainer))


def final_rows(trainer: Trainer) -> dict[str, dict[str, Any]]:
    """The run's last "train" and "eval" metrics rows (as in metrics.jsonl; those it has)."""
    return {kind: trainer.last[kind] for kind in ("train", "eval") if kind in trainer.last}


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
    trainer.keep_good(start_epoch, start_position)
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
                    raise _stopped(trainer)
                if every and trainer.step % every == 0:
                    trainer.save_checkpoint(epoch, trainer.train.position)
            trainer.save_checkpoint(epoch + 1, 0)
            test = trainer.last["eval"]["test_elbo"]
            progress.update(task, stats=f"{_stats_text(trainer.last.get('train'))}  test ELBO {test:.2f}")
            if not console.is_terminal:
                console.print(
                    f"epoch {epoch + 1}/{epochs}: {_stats_text(trainer.last.get('train'))}, test ELBO {test:.2f}",
                    soft_wrap=True,  # one line per epoch in a log file
                )
            if trainer.should_stop() and epoch + 1 < epochs:
                raise _stopped(trainer)


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
        ("test ELBO", f"{test['test_elbo']:.3f} nats per sample"
         + (f" ({test['test_bpd']:.4f} bits/dim)" if "test_bpd" in test else "")),
        ("throughput", f"{trainer.train_samples / trainer.train_seconds:,.0f} samples/s"),
        (
            "training time",
            f"{trainer.train_seconds:.1f} s (wall {time.perf_counter() - trainer.started:.1f} s)",
        ),
    ]
    if "sigma_mean" in train:  # --sigma learned
        rows.insert(6, ("learned σ mean (min, max)",
                        f"{train['sigma_mean']:.4f} ({train['sigma_min']:.4f}, {train['sigma_max']:.4f})"))
    if config["iw_samples"] > 1:
        rows.insert(5, (f"train IWAE_{config['iw_samples']}", f"{train['iwae']:.3f}"))
    for name, value in rows:
        table.add_row(name, value)
    return table


# ---------------------------------------------------------------------------------------------- main


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


def train(
    args: argparse.Namespace,
    console: Console,
    explicit: set[str],
    *,
    model: GivenModel | None = None,
    data: torch.Tensor | None = None,
) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Run the training that `args` describe; returns the run directory and its last metrics rows by kind
    ("train", "eval").

    `explicit`: the settings given on the command line (`explicit_options(argv)`). `model`: a `fastvae.VAE`
    or a factory given in-process (`fastvae.fit`), instead of --arch or --model. `data`: a tensor
    (N, *sample_shape) given in-process, split as a user's file is (`fastvae.data.split_array`), instead of
    --dataset. Raises ConfigError, DataError, CheckpointError (exit code 2), TrainingDiverged (3), RunStopped.
    """
    if args.auto_resume:
        args, explicit = auto_resume(args, explicit)
    if args.from_previous and args.resume is None:
        raise ConfigError("--from-previous applies to --resume RUN_DIR only")
    check_options(args, explicit)
    check_own_model_options(args, explicit, model)
    if args.tensorboard is not None:
        check_available()  # before any work
    try:
        ctx = DistributedContext.from_env()  # torchrun's RANK, WORLD_SIZE and LOCAL_RANK (docs/distributed.md)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    with contextlib.ExitStack() as held:
        return _locked_train(args, console, explicit, ctx, held, (model, data))


def _locked_train(
    args: argparse.Namespace,
    console: Console,
    explicit: set[str],
    ctx: DistributedContext,
    held: contextlib.ExitStack,
    given: tuple[GivenModel | None, torch.Tensor | None],
) -> tuple[Path, dict[str, dict[str, Any]]]:
    """`train` from the run directory's lock on: rank 0 takes it (held until `held` closes) before any
    file is written, and removes the temp files that dead writers left."""
    state = old_config = None
    if args.resume is not None:
        if ctx.is_main:
            if Path(args.resume).is_dir():  # else resume_settings says there is no such run directory
                held.enter_context(lock_run_dir(Path(args.resume)))
        args, state, old_config = resume_settings(args, explicit)  # every rank loads the checkpoint
        out_dir = Path(args.out)
    else:
        out_dir = prepare_out_dir(args) if ctx.is_main else None  # rank 0 prepares the run directory
        if ctx.is_main:
            check_out_writable(out_dir)  # before the data load (a resumed run may be read-only: nothing to do)
            held.enter_context(lock_run_dir(out_dir))
    if ctx.is_main:
        ckpt.remove_stale_temps(out_dir)
    try:
        device = ctx.device(resolve_device(args.device))  # cuda:LOCAL_RANK under torchrun
    except ValueError as err:
        raise ConfigError(str(err)) from None
    resolve_impl(args.fused, device)  # fail before loading any data
    check_cuda_graphs(args, device, ctx.world_size)
    if not ctx.is_main:
        console = Console(quiet=True)  # rank 0 prints
    with ctx.session(device, args.dist_timeout):
        out_dir = Path(ctx.broadcast_object(str(out_dir)))  # rank 0's (default_out_dir has a time stamp)
        return _train(args, console, ctx, device, out_dir, state, old_config, given)


def _load_data(args: argparse.Namespace, data: torch.Tensor | None, old_config: dict[str, Any] | None) -> DataSplits:
    """The run's splits: of the tensor `data` given in-process (split as a user's file is), else of --dataset."""
    if data is None and old_config is not None and old_config.get("data_in_process"):
        raise ConfigError(
            f"--resume {args.out}: the run's data were given in-process to fastvae.fit, so they cannot be loaded "
            "by name: pass them again, fastvae.fit(model, data, resume=RUN_DIR)"
        )
    common = {"seed": args.seed, "num_train": args.num_train, "num_test": args.num_test, "layout": args.layout,
              "likelihood": args.likelihood, "test_fraction": args.test_fraction}  # fmt: skip
    if data is not None:
        if args.test_data is not None:
            raise ConfigError(
                f"test_data={args.test_data!r} names a test file, but the data were given as an array: split them "
                "with test_fraction, or pass a data file and its test file"
            )
        return split_array(data, **common)
    return load_dataset(
        args.dataset,
        data_dir=args.data_dir,
        download=args.download,
        image_size=args.image_size,
        test_data=args.test_data,
        **common,
    )


def _model_for(
    config: dict[str, Any],
    splits: DataSplits,
    given: GivenModel | None,
    old_config: dict[str, Any] | None,
) -> VAE:
    """The run's model (on the CPU, or where a given instance is), its settings recorded in `config`: for a
    fresh own model what the instance reports; a resumed one must report what the run recorded."""
    model = run_model(config, splits.sample_shape, given)
    lo, hi = config["data_range"]
    if model.likelihood == "bernoulli" and not (lo >= 0.0 and hi <= 1.0):
        raise DataError(
            f"the data's values lie in [{lo:g}, {hi:g}], but the model's likelihood is bernoulli, whose values are "
            "probabilities in [0, 1]; scale the data, or give the model a gaussian likelihood"
        )
    if old_config is None:
        source = "in-process" if given is not None else "factory" if config.get("model") else "built-in"
        if source == "built-in":
            config["model_source"] = source
        else:
            config.update(model_settings(model, source, config.get("model"), model_args_of(config.get("model_args"))))
    elif config.get("model_source", "built-in") != "built-in":
        now = model_settings(model, config["model_source"], config.get("model"), config["model_args"])
        for key in ("model_class", "arch", "latent_dim", "latent_shape", "likelihood", "sigma"):
            if now[key] != config.get(key, now[key] if key == "latent_shape" else None):  # older runs lack it
                raise ConfigError(
                    f"--resume {config['out']}: the model differs from the run's ({key} {json.dumps(now[key])}, "
                    f"was {json.dumps(config.get(key))})"
                )
    return model


def _train(
    args: argparse.Namespace,
    console: Console,
    ctx: DistributedContext,
    device: torch.device,
    out_dir: Path,
    state: dict[str, Any] | None,
    old_config: dict[str, Any] | None,
    given: tuple[GivenModel | None, torch.Tensor | None],
) -> tuple[Path, dict[str, dict[str, Any]]]:
    """`train` once the process group (under torchrun) is up: every rank runs this."""
    splits = _load_data(args, given[1], old_config)
    for note in splits.notes:
        console.print(note, soft_wrap=True, markup=False)
    if args.batch_size > len(splits.train):
        raise ConfigError(
            f"--batch-size {args.batch_size} is larger than the {len(splits.train)} training samples, so an "
            "epoch would have no batches; use a smaller --batch-size"
        )
    config = make_config(args, device, splits)
    config["data_sha256"] = data_fingerprint(splits)
    if old_config is None:  # a resumed run keeps its own, checked by resume_settings
        fraction = TEST_FRACTION if args.test_fraction is None else args.test_fraction
        config["test_fraction"] = None if args.test_data else fraction  # None: a --test-data file
        config.update(data_file_digests(config))
    config["world_size"] = ctx.world_size
    if given[1] is not None:
        config["data_in_process"] = True
    if old_config is not None:
        config = resumed_config(config, old_config, state["step"], out_dir)
    config["out"] = str(out_dir)
    torch.manual_seed(args.seed)
    model = _model_for(config, splits, given[0], old_config).to(device)  # the same on every rank
    seed_noise(args.seed, ctx.rank)  # but each rank draws its own sampling noise
    shard = {"rank": ctx.rank, "world_size": ctx.world_size}  # --batch-size is the global batch
    train_batches = DeviceBatches(splits.train, args.batch_size, device=device, seed=args.seed, **shard)
    test_batches = DeviceBatches(
        splits.test, EVAL_BATCH, device=device, seed=args.seed, drop_last=False, **shard
    )
    trainer = Trainer(config, model, train_batches, test_batches, io.StringIO(), device, ctx=ctx)
    trainer.checkpoint_path = out_dir / "checkpoint.pt"
    start_epoch = start_position = 0
    if state is not None:  # check that the run can continue before touching its files
        trainer.restore(state)
        start_epoch, start_position = state["epoch"], state["position"]
        if not torch.equal(state["permutation"], train_batches.permutation(start_epoch).cpu()):
            raise ConfigError(
                f"{trainer.checkpoint_path}: the data order of epoch {start_epoch} differs from the "
                "checkpoint's (another torch version, or a GPU run of a fastvae that drew the order on the GPU?), "
                "so the run cannot continue exactly"
            )
        trainer.checkpoint_step = state["step"]
        if ctx.is_main:  # rank 0 writes the run directory
            if args.from_previous:  # the damaged latest stays for inspection; the previous one stays as is
                os.replace(trainer.checkpoint_path, out_dir / "checkpoint.damaged.pt")
                console.print(
                    f"Resuming from the previous checkpoint {out_dir / ckpt.PREVIOUS} (step {state['step']}); "
                    f"the latest is kept as {out_dir / 'checkpoint.damaged.pt'}.",
                    soft_wrap=True, markup=False,
                )
            metrics_path = out_dir / "metrics.jsonl"
            trainer.history, repaired = restore_metrics(metrics_path, state["metrics_rows"], state.get("metrics_lines"))
            if repaired:
                console.print(
                    f"{metrics_path} was damaged or missing: repaired from the checkpoint's copy of its rows.",
                    soft_wrap=True, markup=False,
                )
        trainer.last = {row["kind"]: row for row in trainer.history}
    completed = state is not None and start_epoch >= config["epochs"]  # resumed with every epoch done
    if ctx.is_main and not completed:
        check_free_space(trainer, out_dir)
    if ctx.is_main:
        if state is None:
            clear_run_files(out_dir)  # --overwrite: only now that the data and the settings have passed
        out_dir.mkdir(parents=True, exist_ok=True)
        if not completed:
            write_json(out_dir / "config.json", config)
    launcher = "torchrun [the same torchrun options]" if ctx.is_distributed else "python"
    resume_command = f"{launcher} -m fastvae.train --resume {shlex.quote(str(out_dir))}"
    in_process = config.get("model_source") == "in-process" or bool(config.get("data_in_process"))
    if in_process:
        resume_command = f"fastvae.fit(model, data, resume={str(out_dir)!r})"
    if completed:
        console.print(
            f"The run in {out_dir} has completed its {config['epochs']} epochs (step {trainer.step}): "
            "nothing to train. Writing its missing final files.",
            soft_wrap=True, markup=False,
        )
    else:
        console.print(
            f"Training on {splits.name} {tuple(splits.sample_shape)}: {len(splits.train)} train, "
            f"{len(splits.test)} test samples; {device}, {_ops_name(config)}. Run directory: {out_dir}"
            + (f"; {_processes(ctx.world_size)}, global batch {args.batch_size}" if ctx.is_distributed else ""),
            soft_wrap=True, markup=False,
        )
        if state is not None:
            console.print(f"Resuming at step {trainer.step} (epoch {start_epoch + 1}, batch {start_position}).")
        metrics_path = out_dir / "metrics.jsonl" if ctx.is_main else Path(os.devnull)  # rank 0 writes
        if ctx.is_main and args.tensorboard is not None:  # rank 0 writes, as metrics.jsonl
            trainer.events = EventLog(Path(args.tensorboard or out_dir / "tensorboard"), trainer.history)
        with open(metrics_path, "a" if state else "w") as metrics:
            trainer.metrics = metrics
            _train_epochs(trainer, console, start_epoch, start_position, resume_command)
    if ctx.is_main:
        finish_run(trainer, splits, out_dir, console, args.pictures, completed, resume_command, in_process)
    return out_dir, final_rows(trainer)


def _train_epochs(
    trainer: Trainer, console: Console, start_epoch: int, start_position: int, resume_command: str
) -> None:
    """`run_epochs` with SIGINT and SIGTERM routed to the trainer; prints how to resume a stopped run and
    raises TrainingDiverged (with the diagnosis), RunStopped or ImmediateExit (with the resume command)."""
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
            f"{reason} after step {trainer.step}; checkpoint written to {trainer.checkpoint_path}.",
            soft_wrap=True,
            markup=False,
        )
        console.print(f"Resume with: {resume_command}", soft_wrap=True, markup=False)
        raise
    except ImmediateExit as err:
        err.args = (f"{trainer.checkpoint_text()} Resume with: {resume_command}",)
        raise
    except OSError as err:
        resume = f" Resume with: {resume_command}" if trainer.checkpoint_step is not None else ""
        raise RunIOError(f"{os_error_text(err)}. {trainer.checkpoint_text()}{resume}") from None


def finish_run(
    trainer: Trainer,
    splits: DataSplits,
    out_dir: Path,
    console: Console,
    pictures: bool,
    only_missing: bool,
    resume_command: str,
    in_process: bool = False,
) -> None:
    """The end of a run, on rank 0, after its last checkpoint: draw its pictures (with `only_missing`, those
    not in `out_dir`; none without `pictures`), print the summary table and what was written, and how to
    evaluate the run (`in_process`: its model or data were given to fastvae.fit, which evaluate cannot load).

    A SIGINT or SIGTERM while the pictures are drawn raises PicturesInterrupted: the pictures already drawn
    are whole (each is written atomically), and `resume_command` draws the others.
    """
    names, skipped = pictures_of(splits.sample_shape, trainer.model.latent_dim, len(splits.test))
    if not pictures:
        names, skipped = [], []
    elif only_missing:
        names = [name for name in names if not (out_dir / name).is_file()]

    def interrupted(signum: int, frame: object) -> None:
        raise PicturesInterrupted(
            signum,
            f"stopped by {signal.Signals(signum).name} while drawing the pictures; the training is complete "
            f"and saved (step {trainer.step}). Write the missing pictures with: {resume_command}",
        )

    with _signals_to(interrupted):
        drawn = draw(names, RunRecord(trainer.model, splits.test, trainer.history, splits.name), out_dir)
    if trainer.events is not None:
        trainer.events.add_pictures(drawn, trainer.step)
        trainer.events.close()
    console.print(summary_table(trainer))
    paths = ", ".join(str(path) for path in drawn)
    if not pictures:
        console.print("Pictures: none (--no-pictures)")
    elif only_missing:
        console.print(
            f"Wrote the summary above and the missing pictures: {paths}" if drawn else "No picture was missing.",
            soft_wrap=True, markup=False,  # paths stay whole
        )
    else:
        console.print(f"Pictures: {paths}", soft_wrap=True, markup=False)
    for reason in skipped:
        console.print(f"Skipped {reason}", soft_wrap=True, markup=False)
    if in_process:
        console.print(
            f"Load the model with: fastvae.load_run({str(out_dir)!r}), with model= for a model given as an "
            "instance (its model or data were given to fastvae.fit in-process, which fastvae.evaluate cannot load)",
            soft_wrap=True, markup=False,
        )
    else:
        console.print(f"Evaluate with: python -m fastvae.evaluate {out_dir}", soft_wrap=True, markup=False)


def _processes(count: int) -> str:
    """A torchrun job's size in words: 1 process, 2 processes."""
    return f"{count} process" if count == 1 else f"{count} processes"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        with _signals_to(_raise_interrupted):  # SIGTERM as SIGINT before training (the loop has its own)
            train(args, Console(), explicit_options(argv))
    except (DataError, ConfigError, ckpt.CheckpointError, RunIOError, PeerLost) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {os_error_text(err)}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except RunStopped as stop:
        return stop.code
    except PicturesInterrupted as err:
        print(f"error: {err}", file=sys.stderr)
        return SIGNAL_EXIT[err.signum]
    except ImmediateExit as err:
        name = signal.Signals(err.signum).name
        how = "once the checkpoint write under way had ended" if err.saved else "without saving"
        print(f"error: stopped at once by a second {name}, {how}. {err.args[0]}", file=sys.stderr)
        return SIGNAL_EXIT[err.signum]
    except (Interrupted, KeyboardInterrupt) as err:
        signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
        print(
            f"error: interrupted by {signal.Signals(signum).name} before training started or after its last "
            "checkpoint; nothing more was saved",
            file=sys.stderr,
        )
        return SIGNAL_EXIT[signum]
    return 0


if __name__ == "__main__":
    sys.exit(main())
