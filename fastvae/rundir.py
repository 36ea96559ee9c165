"""The run directory (`--out`, `--resume RUN_DIR`): its files, a fresh run's preparation and a resumed
run's settings, config and metrics.

A run directory holds RUN_FILES: config.json, metrics.jsonl (a JSON row per statistics reading and
per evaluation), checkpoint.pt, the PICTURES, and eval.json from `fastvae.evaluate`. A resumed run keeps
its settings but RESUME_MAY_CHANGE, its data (checked by shape and fingerprint) and the metrics its
checkpoint knows of. A completed run (every epoch done) can be resumed too: it trains nothing more, and
`fastvae.train` writes the final pictures that are missing.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from fastvae import checkpoint as ckpt
from fastvae.data import DataSplits, is_data_file
from fastvae.options import ConfigError

PICTURES = ("samples.png", "reconstructions.png", "interpolations.png", "manifold.png", "loss.png")  # pictures.py
RUN_FILES = (
    "config.json", "metrics.jsonl", "checkpoint.pt", ckpt.PREVIOUS, "checkpoint.damaged.pt", *PICTURES, "eval.json"
)
LOCK_FILE = "run.lock"  # held (flock) by the one process that writes the run; it holds that process's PID

# Settings a resumed run may change; every other one is part of the run and must stay as it was.
RESUME_MAY_CHANGE = (
    "epochs", "log_every", "checkpoint_every", "pictures", "tensorboard", "device", "data_dir", "download"
)
# Settings of one invocation, never taken over from the run being resumed.
PER_INVOCATION = ("resume", "overwrite", "stop_after", "out", "auto_resume", "from_previous", "dist_timeout")
_FUSED_OF_IMPL = {"auto": None, "triton": True, "torch": False}
# The settings that name a user's data file, each with the config.json key of that file's SHA-256. A resume
# or an evaluation may give a file's new path (the file moved) when its SHA-256 is the one recorded.
DATA_FILES = {"dataset": "dataset_sha256", "test_data": "test_data_sha256"}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _comparable(dest: str, value: Any) -> Any:
    """A command-line value in the form config.json stores it."""
    if dest == "hidden" and value is not None:
        return [h for group in value for h in group]
    return value


def resume_settings(
    args: argparse.Namespace, explicit: set[str]
) -> tuple[argparse.Namespace, dict[str, Any], dict[str, Any]]:
    """--resume RUN_DIR: the run's settings with the allowed changes, its checkpoint and its config.

    A completed run passes when --epochs is left out or equal to its epochs (it finishes: nothing to train).
    """
    run_dir = Path(args.resume)
    if not run_dir.is_dir():
        raise ConfigError(f"--resume {run_dir}: no such run directory")
    path = run_dir / (ckpt.PREVIOUS if getattr(args, "from_previous", False) else "checkpoint.pt")
    if not path.is_file():
        raise ConfigError(
            f"--resume {run_dir}: {path} not found, so there is nothing to resume from; start the run afresh "
            f"with its command and --out {run_dir} --overwrite (or --auto-resume, which starts or resumes it)"
        )
    try:
        state = ckpt.load(path)
    except ckpt.CheckpointError as err:
        if err.damaged and path.name == "checkpoint.pt" and (run_dir / ckpt.PREVIOUS).is_file():
            raise ckpt.CheckpointError(
                f"{err}; resume from the checkpoint before it with: --resume {run_dir} --from-previous",
                damaged=True,
            ) from None
        raise
    old = state["config"]
    allowed = ", ".join(_flag(d) for d in (*RESUME_MAY_CHANGE, "stop_after"))
    for dest in sorted(explicit - set(RESUME_MAY_CHANGE) - set(PER_INVOCATION) - set(DATA_FILES)):
        # The run's value; for --fused, config "fused" holds the ops the run used, so --no-fused
        # matches a CPU run that was started without the flag.
        new, before = _comparable(dest, getattr(args, dest)), old.get(dest)
        if new != before:
            raise ConfigError(
                f"--resume {run_dir}: {_flag(dest)} {json.dumps(new)} differs from the run's {json.dumps(before)}; "
                f"a resumed run keeps its settings (only {allowed} may change)"
            )
    settings = {dest: old.get(dest) for dest in vars(args)}
    settings.update(
        hidden=None if old.get("hidden") is None else [old["hidden"]],  # None: an own model (--model)
        fused=_FUSED_OF_IMPL.get(old.get("impl"), old.get("fused")),  # "auto" resolves again on this device
        **{d: getattr(args, d) for d in PER_INVOCATION},
    )
    settings.update({d: getattr(args, d) for d in RESUME_MAY_CHANGE if d in explicit})
    settings.update(data_files(old, {d: getattr(args, d) for d in DATA_FILES if d in explicit}, f"--resume {run_dir}"))
    settings["out"] = str(run_dir)
    for dest, default in (("checkpoint_every", 0), ("pictures", True), ("cuda_graphs", False)):  # older runs
        if settings.get(dest) is None:
            settings[dest] = default
    if settings["epochs"] < state["epoch"]:
        raise ConfigError(
            f"--resume {run_dir}: the run has completed {state['epoch']} epochs, more than --epochs "
            f"{settings['epochs']}; leave out --epochs to finish the run, or pass a larger one to train further"
        )
    if args.stop_after is not None and args.stop_after <= state["step"]:
        raise ConfigError(f"--stop-after {args.stop_after}: the run is at step {state['step']} already")
    return argparse.Namespace(**settings), state, old


def default_out_dir(dataset: str) -> Path:
    """runs/<dataset>-<local time stamp>: the run directory when --out is not given."""
    stem = Path(dataset).stem if is_data_file(dataset) else dataset
    return Path("runs") / f"{stem}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_out_dir(args: argparse.Namespace) -> Path:
    """The run directory of a fresh run: a non-empty one is refused, unless --overwrite (whose deletion
    waits for `clear_run_files`, once the run's data and settings have passed their checks)."""
    out_dir = Path(args.out) if args.out else default_out_dir(args.dataset)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a directory")
    if out_dir.is_dir() and any(p.name != LOCK_FILE for p in out_dir.iterdir()) and not args.overwrite:
        if (out_dir / "checkpoint.pt").is_file():
            raise ConfigError(
                f"--out {out_dir} is not empty: pass --resume {out_dir} to continue its run, or --overwrite "
                "to replace it (--auto-resume resumes a run where there is one and starts one where not)"
            )
        raise ConfigError(
            f"--out {out_dir} is not empty but holds no checkpoint (a run stopped before its first one, or "
            "other files): pass --overwrite, or --auto-resume, to start the run afresh there"
        )
    return out_dir


def auto_resume(args: argparse.Namespace, explicit: set[str]) -> tuple[argparse.Namespace, set[str]]:
    """--auto-resume: resume the run in --out when it has a checkpoint, else start it afresh there
    (replacing what a run killed before its first checkpoint left). Returns the args and explicit set."""
    if args.out is None:
        raise ConfigError("--auto-resume needs --out RUN_DIR: the run directory to start or resume")
    if (Path(args.out) / "checkpoint.pt").is_file():
        return argparse.Namespace(**{**vars(args), "resume": args.out, "out": None}), explicit - {"out"}
    return argparse.Namespace(**{**vars(args), "overwrite": True}), explicit


@contextlib.contextmanager
def lock_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's exclusive lock (creating the directory) for the `with` block; the lock dies
    with its process. ConfigError naming the holder's PID when another has it. A read-only directory gets
    no lock (no process can write it). A directory this made that holds nothing else afterwards (the run
    failed before writing) is removed again."""
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = open(run_dir / LOCK_FILE, "a+")  # noqa: SIM115 (held open for the run)
    except OSError as err:
        if err.errno in (errno.EROFS, errno.EACCES) and run_dir.is_dir():
            yield
            return
        raise
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise ConfigError(
                f"{run_dir} is in use by another fastvae process (PID {holder}); wait for it to end or stop it, "
                "then run this again"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            yield
        finally:
            if created and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
                (run_dir / LOCK_FILE).unlink()
                run_dir.rmdir()
    finally:
        lock.close()


def clear_run_files(out_dir: Path) -> None:
    """Delete an earlier run's files (RUN_FILES) from `out_dir`, leaving any other file alone."""
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)


def data_fingerprint(splits: DataSplits) -> str:
    """16 hex digits of the SHA-256 of both splits' shapes, dtypes and bytes (config.json's data_sha256)."""
    digest = hashlib.sha256()
    for split in (splits.train, splits.test):
        digest.update(str((tuple(split.shape), str(split.dtype))).encode())
        digest.update(split.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes: 64 hex digits, as `sha256sum` prints them."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_file_digests(settings: dict[str, Any]) -> dict[str, str]:
    """config.json's "dataset_sha256" and "test_data_sha256": the SHA-256 of each user's file that `settings`
    names (a named data set has none)."""
    named = {dest: settings.get(dest) for dest in DATA_FILES}
    return {DATA_FILES[dest]: file_sha256(Path(path)) for dest, path in named.items() if is_data_file(path)}


def data_files(config: dict[str, Any], given: dict[str, str | None], where: str) -> dict[str, str | None]:
    """The data files a resume or an evaluation of the run `config` reads: for each of DATA_FILES, the path in
    `given` (this invocation's --dataset / --test-data; None or absent: not given) or else the run's own.
    Each file the run recorded a SHA-256 of must still have it: a moved copy is fine, another file is a
    ConfigError naming both digests; so is a new path where the run used a named data set or no test file,
    or where it recorded no digest. `where` begins each message ("--resume RUN_DIR")."""
    paths = {}
    for dest, key in DATA_FILES.items():
        before, path = config.get(dest), given.get(dest)
        path = before if path is None else path
        flag, recorded = _flag(dest), config.get(key)
        if path != before and not (is_data_file(before) and is_data_file(path)):
            raise ConfigError(
                f"{where}: {flag} {json.dumps(path)} differs from the run's {json.dumps(before)}; a run keeps its "
                "data, and only a moved copy of its data file may be named anew"
            )
        if path != before and recorded is None:
            raise ConfigError(
                f"{where}: the run recorded no SHA-256 of its {flag} file {before} (it predates them), so {path} "
                f"cannot be checked against it; give the file at {before}"
            )
        if recorded is not None:
            if not Path(path).is_file() and path == before:
                raise ConfigError(
                    f"{where}: the run's {flag} file {path} is not there; if it moved, give its new path with "
                    f"{flag} PATH"
                )
            if not Path(path).is_file():
                raise ConfigError(f"{where}: {flag} {path}: no such file")
            digest = file_sha256(Path(path))
            if digest != recorded:
                raise ConfigError(
                    f"{where}: {flag} {path} has SHA-256 {digest}, but the run's {before} had {recorded}; a run "
                    "continues, and is evaluated, on the data it was trained on"
                )
        paths[dest] = path
    return paths


def resumed_config(config: dict[str, Any], old: dict[str, Any], step: int, run_dir: Path) -> dict[str, Any]:
    """The config of the run in `run_dir`, resumed at `step`: its own `old` one with the settings this
    invocation may change taken from `config` (this invocation's, from `make_config`) and the resume
    recorded under "resumed". Raises ConfigError when `config`'s data differ from the run's."""
    for key in ("data_shape", "num_train", "num_test", "data_sha256"):
        if key in old and config[key] != old[key]:
            raise ConfigError(
                f"--resume {run_dir}: the data set differs from the run's ({key} {json.dumps(config[key])}, "
                f"was {json.dumps(old[key])})"
            )
    resumed = {"step": step, **{k: config[k] for k in ("command", "started", "world_size")}}
    merged = {**old, **{k: config[k] for k in (*RESUME_MAY_CHANGE, *PER_INVOCATION, *DATA_FILES, "fused")}}
    merged["resumed"] = [*old.get("resumed", []), resumed]
    merged["world_size"] = config["world_size"]
    return merged


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` to `path` as indented JSON, atomically."""
    ckpt.atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def restore_metrics(path: Path, rows: int, saved: list[str] | None) -> tuple[list[dict[str, Any]], bool]:
    """Cut metrics.jsonl back to the `rows` lines the checkpoint knows of, rewriting it only when something
    follows them; a missing or damaged file is rewritten from `saved` (the checkpoint's copy of those
    lines; None in older checkpoints). Returns (the rows, whether the file was repaired)."""
    data = path.read_bytes() if path.is_file() else b""
    lines = data.split(b"\n")
    try:
        if len(lines) <= rows or (rows and lines[rows - 1] == b""):
            raise ValueError(f"has {len(lines) - 1} rows, fewer than the {rows} the checkpoint was written after")
        history = []
        for number, line in enumerate(lines[:rows], 1):
            try:
                history.append(json.loads(line.decode()))
            except ValueError:  # UnicodeDecodeError and JSONDecodeError
                raise ValueError(f"line {number} is not a JSON row") from None
    except ValueError as err:
        if saved is not None and len(saved) == rows:
            ckpt.atomic_write(path, lambda f: f.write("".join(line + "\n" for line in saved).encode()))
            return [json.loads(line) for line in saved], True
        raise ConfigError(
            f"{path} {err}, and the checkpoint holds no copy of its rows; restore the file from a backup, "
            "or start the run afresh with --overwrite"
        ) from None
    kept = b"".join(line + b"\n" for line in lines[:rows])
    if data != kept:
        ckpt.atomic_write(path, lambda f: f.write(kept))
    return history, False
