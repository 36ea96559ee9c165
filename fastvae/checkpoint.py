"""Training checkpoints: an atomic writer and a checked reader (docs/training.md describes the format).

A checkpoint is a `torch.save` file of one dict that holds only tensors and plain values (dicts, lists,
strings, numbers, booleans, None), so it loads with `torch.load(weights_only=True)`:

    format: "fastvae-checkpoint"          version: FORMAT_VERSION
    model, optimizer: the state dicts     step: optimizer steps done
    epoch, position: the epoch in progress and its batches done (position 0: the epoch has not started)
    permutation: that epoch's sample order    rng: {"torch": CPU state, "cuda": the training GPU's or None}
    running: {"sums", "count"}: the statistics window not yet logged (rng and running: rank 0's)
    ranks: [{"rng", "running"} per process, in rank order]: one entry without torchrun
    metrics_rows: lines of metrics.jsonl that belong to the run up to `step`
    metrics_lines: those lines themselves (metrics.jsonl is repaired from them)
    train_seconds, train_samples: the throughput counters    config: the run's settings
    sha256: the SHA-256 of everything else (`payload_digest`), checked on loading with the zip's CRC-32s

`save` keeps the file it replaces as PREVIOUS (checkpoint.prev.pt) beside it, so a damaged latest one
still leaves a way on (`--resume RUN_DIR --from-previous`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import shutil
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
PREVIOUS = "checkpoint.prev.pt"  # the checkpoint before the latest, beside it


class CheckpointError(Exception):
    """An unreadable or foreign checkpoint file; the message names the file and the problem.
    `damaged`: the file is one of ours whose bytes changed (a CRC-32 or the payload's SHA-256 fails)."""

    def __init__(self, message: str, damaged: bool = False) -> None:
        super().__init__(message)
        self.damaged = damaged


def payload_digest(state: dict[str, Any]) -> str:
    """The SHA-256 (hex) of a checkpoint's payload, less its "sha256": every tensor's dtype, shape and bytes
    and every plain value's repr, in key order (sorted), so the same payload always gives the same digest."""
    digest = hashlib.sha256()

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            for key in sorted(obj, key=repr):
                digest.update(f"K{key!r}".encode())
                walk(obj[key])
        elif isinstance(obj, (list, tuple)):
            digest.update(f"L{len(obj)}".encode())
            for item in obj:
                walk(item)
        else:
            digest.update(f"V{obj!r}".encode())

    walk({k: v for k, v in state.items() if k != "sha256"})
    return digest.hexdigest()


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
    """Write a checkpoint atomically; `payload` gets the format marker, version and SHA-256. The file it
    replaces becomes PREVIOUS beside it (a hard link renamed into place: `path` exists throughout). A
    failed write (full disk, read-only file system) raises OSError naming the temp file."""
    path = Path(path)
    state = {"format": FORMAT, "version": FORMAT_VERSION, **payload}
    state["sha256"] = payload_digest(state)
    if path.is_file():
        tmp = path.with_name(f".{PREVIOUS}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(path, tmp)
        os.replace(tmp, path.with_name(PREVIOUS))
    atomic_write(path, lambda f: _torch_save(state, f))


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete the temp files (`.NAME.tmp-PID`) of writes that did not finish, but this process's; call
    it holding the run directory's lock, so no live writer owns them. Returns those removed."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp-*"):
        if tmp.name.rpartition("-")[2] != str(os.getpid()) and tmp.is_file():
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


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
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile:
        bad = None  # no zip directory: torch.load's message below says truncated or corrupt
    except Exception as err:  # noqa: BLE001 (zlib.error, OSError...: a member cannot be read back)
        bad = f"a member ({_one_line(err)})"
    if bad is not None:
        raise CheckpointError(f"{path} is damaged: {bad} fails its CRC-32 check", damaged=True)
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
    if "sha256" in state and state["sha256"] != payload_digest(state):  # files without one predate it
        raise CheckpointError(f"{path} is damaged: its payload does not match its SHA-256", damaged=True)
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
