"""MNIST and Fashion-MNIST from IDX files (the MNIST format), found in torchvision's layout or fetched by it."""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np
import torch

from fastvae.data.splits import DataError, DataSplits

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError; EOFError: a truncated .gz
        raise DataError(f"cannot read {path}: {err}") from err


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped if the name ends in `.gz`.

    Layout: two zero bytes, a dtype code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dims, each dim as a big-endian uint32, then the values big-endian.
    Returns an array of that shape in native byte order. Raises DataError for anything malformed.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'none'})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dims need {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{path}: IDX header says shape {shape} of {dtype.name} ({expected} bytes), "
            f"but the file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


_IDX_IMAGES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
_TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}  # class name = folder under data_dir


def _idx_dirs(name: str, data_dir: Path) -> list[Path]:
    """Folders searched, torchvision's (name-specific) layout first, then `data_dir` itself."""
    return [data_dir / _TORCHVISION[name] / "raw", data_dir]


def _candidates(folder: Path, stem: str) -> list[Path]:
    return [folder / stem, folder / f"{stem}.gz"]


def _find_idx_images(name: str, data_dir: Path) -> dict[str, Path] | None:
    """The train/test image files of the first folder that has both, or None."""
    for folder in _idx_dirs(name, data_dir):
        found: dict[str, Path] = {}
        for split, stem in _IDX_IMAGES.items():
            path = next((p for p in _candidates(folder, stem) if p.is_file()), None)
            if path is None:
                break
            found[split] = path
        else:
            return found
    return None


def _missing_message(name: str, data_dir: Path) -> str:
    looked = [
        p
        for folder in _idx_dirs(name, data_dir)
        for stem in _IDX_IMAGES.values()
        for p in _candidates(folder, stem)
    ]
    return (
        f"{name} images not found. Looked for:\n"
        + "".join(f"  {p}\n" for p in looked)
        + "Pass --download to fetch them with torchvision, or put the IDX files "
        f"({', '.join(_IDX_IMAGES.values())}, optionally .gz) in one of those folders."
    )


def _download(name: str, data_dir: Path) -> None:
    """Fetch the raw files into data_dir/<MNIST|FashionMNIST>/raw through torchvision."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, _TORCHVISION[name])
    try:
        cls(root=str(data_dir), train=True, download=True)
        cls(root=str(data_dir), train=False, download=True)
    except Exception as err:  # URLError, RuntimeError on a bad checksum, OSError: all mean "no files"
        raise DataError(
            f"downloading {name} into {data_dir} failed ({type(err).__name__}: {err}). Without network "
            f"access, put the IDX files in {data_dir / _TORCHVISION[name] / 'raw'} or {data_dir}."
        ) from err


def _idx_images(path: Path) -> torch.Tensor:
    """An IDX image file -> (N, 1, H, W) uint8."""
    images = read_idx(path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(f"{path}: expected (N, H, W) uint8 images, got {images.shape} of {images.dtype}")
    return torch.from_numpy(images).unsqueeze(1)


def _load_idx(name: str, data_dir: Path, download: bool) -> DataSplits:
    files = _find_idx_images(name, data_dir)
    if files is None and download:
        _download(name, data_dir)
        files = _find_idx_images(name, data_dir)
    if files is None:
        raise DataError(_missing_message(name, data_dir))
    train, test = _idx_images(files["train"]), _idx_images(files["test"])
    if train.shape[1:] != test.shape[1:]:
        raise DataError(f"{name}: train images are {tuple(train.shape[2:])}, test {tuple(test.shape[2:])}")
    return DataSplits(train, test, name)


