"""Training checkpoints: an atomic writer and a checked reader (docs/training.md describes the format).

A checkpoint is a `torch.save` file of one dict that holds only tensors and plain values (dicts, lists,
strings, numbers, booleans, None), so it loads with `torch.load(weights_only=True)`:

    format: "fastvae-checkpoint"          version: FORMAT_VERSION
    model, optimizer: the state dicts     step: optimizer steps done
    epoch, position: the epoch in progress and its batches done (position 0: the epoch has not started)
    permutation: that epoch's sample order    rng: {"torch": CPU state, "cuda": [per-device states]}
    running: {"sums", "count"}: the statistics window not yet logged (rng and running: rank 0's)
    ranks: [{"rng", "running"} per process, in rank order]: one entry without torchrun
    metrics_rows: lines of metrics.jsonl that belong to the run up to `step`
    train_seconds, train_samples: the throughput counters    config: the run's settings
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "fastvae-checkpoint"
FORMAT_VERSION = 2
REQUIRED = {
    "model": dict,
    "optimizer": dict,
    "step": int,
    "epoch": int,
    "position": int,
    "permutation": torch.Tensor,
    "rng": dict,
    "running": dict,
    "metrics_rows": int,
    "config": dict,
}


class CheckpointError(Exception):
    """An unreadable or foreign checkpoint file; the message names the file and the problem."""


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Any) -> None:
    """Write `path` through `write(file)` into a temp file, flush + fsync, rename over `path`, fsync the dir.

    A crash or an exception at any point leaves the previous `path` (if any) untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


class _WriteErrors(io.RawIOBase):
    """A binary file that keeps the first OSError of its writes: torch.save's zip writer turns one into
    `RuntimeError: ... unexpected pos`, which says nothing of a full disk."""

    def __init__(self, f: Any) -> None:
        super().__init__()
        self.f = f
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.f.flush()


def _torch_save(state: dict[str, Any], f: Any) -> None:
    """torch.save into `f`; a failed write raises its own OSError (with `f`'s path), not torch's."""
    sink = _WriteErrors(f)
    try:
        torch.save(state, sink)
    except (RuntimeError, OSError) as err:
        if sink.error is None:
            raise
        found = sink.error
        raise OSError(found.errno, found.strerror or os.strerror(found.errno or 0), f.name) from err


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically; `payload` gets the format marker and version. A failed write
    (full disk, read-only file system) raises OSError naming the temp file."""
    state = {"format": FORMAT, "version": FORMAT_VERSION, **payload}
    atomic_write(path, lambda f: _torch_save(state, f))


def load(path: Path) -> dict[str, Any]:
    """Read and check a checkpoint (on the CPU). Raises CheckpointError with a one-line message."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # every torch.save file since torch 1.6 is a zip archive
        raise CheckpointError(f"{path} is not a fastvae checkpoint (not a file written by torch.save)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f": {found.group(1)}" if found else ""
        raise CheckpointError(
            f"{path} is not a fastvae checkpoint: it holds objects other than tensors and plain values{what}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        problem = _one_line(err)
        raise CheckpointError(f"{path} is truncated or corrupt (cannot read the archive: {problem})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastvae checkpoint (no {FORMAT!r} format marker)")
    version = state.get("version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}; this fastvae reads version {FORMAT_VERSION}"
        )
    for key, kind in REQUIRED.items():
        if not isinstance(state.get(key), kind):
            raise CheckpointError(f"{path} is corrupt: field {key!r} is missing or not a {kind.__name__}")
    return state


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def clone(obj: Any) -> Any:
    """A deep copy of nested dicts/lists/tuples of tensors (cloned, detached) and plain values."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone(v) for v in obj)
    return obj
