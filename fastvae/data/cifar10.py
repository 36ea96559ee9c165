"""CIFAR-10 from its python batches, as torchvision unpacks them, read without running pickled code."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import torch

from fastvae.data.splits import DataError, DataSplits, _reason

CIFAR10_FOLDER = "cifar-10-batches-py"  # torchvision's layout: DATA_DIR/cifar-10-batches-py/
CIFAR10_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_CIFAR10_SHAPE = (3, 32, 32)  # each row of a batch's data: 1024 red, then 1024 green, then 1024 blue values
# What a CIFAR-10 batch pickle may name: a dict of a numpy array and lists (nothing else is unpickled).
_CIFAR10_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),  # numpy 1 pickles, as in the published files
    ("numpy._core.multiarray", "_reconstruct"),  # numpy 2 pickles
    ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5, numpy 1 and 2
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # bytes in a pickle of protocol < 3
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain values only, so a data file cannot run code."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _CIFAR10_GLOBALS:
            raise pickle.UnpicklingError(f"it holds {module}.{name}, which a CIFAR-10 batch does not")
        return super().find_class(module, name)


def _cifar10_dirs(data_dir: Path) -> list[Path]:
    """Folders searched, torchvision's layout first, then `data_dir` itself."""
    return [data_dir / CIFAR10_FOLDER, data_dir]


def _missing_cifar10(folder: Path) -> list[str]:
    """The batch files that `folder` lacks."""
    return [name for batch in CIFAR10_BATCHES.values() for name in batch if not (folder / name).is_file()]


def _find_cifar10(data_dir: Path) -> Path | None:
    """The first folder that holds all six batch files, or None."""
    return next((d for d in _cifar10_dirs(data_dir) if not _missing_cifar10(d)), None)


def _read_cifar10_batch(path: Path) -> torch.Tensor:
    """One batch file (a pickled dict with b"data": uint8 (N, 3072)) -> (N, 3, 32, 32) uint8."""
    try:
        with path.open("rb") as f:
            batch = _BatchUnpickler(f, encoding="latin1").load()  # latin1: the published files are Python 2's
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as err:
        raise DataError(f"cannot read {path} as a CIFAR-10 batch: {_reason(err)}") from err
    data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
    dim = math.prod(_CIFAR10_SHAPE)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != dim:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: expected a dict with 'data', a uint8 array (N, {dim}), got {what}")
    return torch.from_numpy(data.reshape(len(data), *_CIFAR10_SHAPE).copy())


def _download_cifar10(data_dir: Path) -> None:
    """Fetch and unpack the batches into data_dir/cifar-10-batches-py through torchvision."""
    import torchvision.datasets

    try:
        torchvision.datasets.CIFAR10(root=str(data_dir), train=True, download=True)
    except Exception as err:  # URLError, RuntimeError on a bad checksum, OSError: all mean "no files"
        raise DataError(
            f"downloading cifar10 into {data_dir} failed ({type(err).__name__}: {err}). Without network "
            f"access, unpack cifar-10-python.tar.gz into {data_dir} (it makes {data_dir / CIFAR10_FOLDER})."
        ) from err


def _load_cifar10(data_dir: Path, download: bool) -> DataSplits:
    folder = _find_cifar10(data_dir)
    if folder is None and download:
        _download_cifar10(data_dir)
        folder = _find_cifar10(data_dir)
    if folder is None:
        raise DataError(
            "cifar10 batches not found. Looked in:\n"
            + "".join(f"  {d}, which lacks {', '.join(_missing_cifar10(d))}\n" for d in _cifar10_dirs(data_dir))
            + "Pass --download to fetch them with torchvision, or unpack the CIFAR-10 python version "
            f"(cifar-10-python.tar.gz) into {data_dir}."
        )
    splits = {
        split: torch.cat([_read_cifar10_batch(folder / name) for name in names])
        for split, names in CIFAR10_BATCHES.items()
    }
    return DataSplits(splits["train"], splits["test"], "cifar10")

