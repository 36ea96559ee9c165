"""Training data: embedded sprites, MNIST / Fashion-MNIST from IDX files, CIFAR-10 from its python batches,
and a user's own tensors.

`load_dataset` returns a `DataSplits` of CPU tensors: images as (N, C, H, W) uint8 in 0..255, vectors as
(N, D) uint8 or float32 in [0, 1]. `DeviceBatches` puts one split on the device and yields shuffled
float32 batches in [0, 1], flattened to (batch, D), with an exactly resumable order.

Every problem with the data itself raises `DataError`, whose message is meant for the user as is.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "DataError",
    "DataSplits",
    "DeviceBatches",
    "SHAPES",
    "load_dataset",
    "read_idx",
    "render_sprites",
    "to_float",
]


DATASETS = ("sprites", "mnist", "fashion-mnist", "cifar10")
"""The named data sets; any other name must be a .npz/.npy/.pt path."""


class DataError(Exception):
    """A data problem to show the user as a clear message (the CLI prints str(err) and exits with code 2)."""


@dataclass(frozen=True)
class DataSplits:
    """The train and test splits of one data set, on the CPU.

    `train` and `test` are (N, C, H, W) uint8 in 0..255 for images, or (N, D) uint8 / float32 in [0, 1]
    for vectors; both splits share the per-sample shape.
    """

    train: torch.Tensor
    test: torch.Tensor
    name: str

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample: (C, H, W) or (D,)."""
        return tuple(self.train.shape[1:])

    @property
    def dim(self) -> int:
        """D, the number of values in one flattened sample."""
        return math.prod(self.sample_shape)


# --------------------------------------------------------------------------------------------- sprites

SHAPES = ("square", "ellipse", "heart", "triangle")
"""The sprite shape classes; the `shape` factor indexes this tuple. Each fits the unit circle (to 3%) in its
own frame; their areas there are 1.96, 1.57, 2.16 and 1.30."""

_SUPERSAMPLE = 4  # subpixels per pixel side: 16 samples per pixel, so 17 grey levels on the edges
_CHUNK = 256  # images rendered at once; keeps the subpixel arrays small enough to stay in cache
_MIN_RADIUS, _MAX_RADIUS = 0.25, 0.5  # shape radius as a fraction of the image half-width, scale 0..1
_MAX_OFFSET = 1.0 - 1.1 * _MAX_RADIUS  # centres stay within +-this, so even the largest shape fits


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.7


def _ellipse(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + 4.0 * (v * v) <= 1.0  # semi-axes 1 and 0.5: elongated, so its rotation shows


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # The sextic heart (x^2 + y^2 - 1)^3 <= x^2 y^3 with y pointing up (rows point down), centred.
    x = 1.3 * u
    y = 0.118 - 1.3 * v
    x2 = x * x
    q = x2 + y * y - 1.0
    return q * q * q <= x2 * (y * y * y)


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Equilateral, inscribed in the unit circle, apex up: inside all three edge half-planes.
    return (v <= 0.5) & (0.8660254 * np.abs(u) - 0.5 * v <= 0.5)


ShapeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(u, v) sprite-frame coordinates in units of the radius, (k, H, W) float32 -> (k, H, W) bool inside."""
_SHAPE_FNS: tuple[ShapeFn, ...] = (_square, _ellipse, _heart, _triangle)


def _sprite_factors(n: int, seed: int | Sequence[int]) -> dict[str, np.ndarray]:
    """Draw the factors of `n` sprites; one (n, 5) uniform draw, so a prefix does not depend on `n`."""
    u = np.random.default_rng(seed).random((n, 5))
    return {
        "shape": np.minimum((u[:, 0] * len(SHAPES)).astype(np.int64), len(SHAPES) - 1),
        "scale": u[:, 1].astype(np.float32),
        "rotation": (2.0 * np.pi * u[:, 2]).astype(np.float32),
        "pos_x": u[:, 3].astype(np.float32),
        "pos_y": u[:, 4].astype(np.float32),
    }


def _coverage_counts(inside: np.ndarray, size: int) -> np.ndarray:
    """(k, size*s, size*s) bool -> (k, size, size) uint8: inside subpixels per pixel (s = _SUPERSAMPLE).

    Sums strided slices, which numpy does far faster than a reduction over short axes.
    """
    s = _SUPERSAMPLE
    rows = inside.view(np.uint8).reshape(len(inside), size, s, size * s)
    acc = rows[:, :, 0, :].copy()
    for i in range(1, s):
        acc += rows[:, :, i, :]
    cols = acc.reshape(len(inside), size, size, s)
    counts = cols[..., 0].copy()
    for j in range(1, s):
        counts += cols[..., j]
    return counts


def _render(shape_fn: ShapeFn, factors: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Render k sprites of one shape, described by `factors` (k-long arrays) -> (k, size, size) uint8."""
    grid = ((np.arange(size * _SUPERSAMPLE, dtype=np.float32) + 0.5) / (size * _SUPERSAMPLE)) * 2.0 - 1.0
    radius = _MIN_RADIUS + (_MAX_RADIUS - _MIN_RADIUS) * factors["scale"]
    cos = (np.cos(factors["rotation"]) / radius)[:, None, None]
    sin = (np.sin(factors["rotation"]) / radius)[:, None, None]
    dx = grid[None, None, :] - (_MAX_OFFSET * (2.0 * factors["pos_x"] - 1.0))[:, None, None]
    dy = grid[None, :, None] - (_MAX_OFFSET * (2.0 * factors["pos_y"] - 1.0))[:, None, None]
    u = cos * dx + sin * dy  # sprite frame, in units of its radius: (k, 1, W) + (k, H, 1) -> (k, H, W)
    v = cos * dy - sin * dx
    levels = np.rint(np.arange(_SUPERSAMPLE**2 + 1) * (255.0 / _SUPERSAMPLE**2)).astype(np.uint8)
    return levels[_coverage_counts(shape_fn(u, v), size)]


def render_sprites(
    n: int, size: int = 28, seed: int | Sequence[int] = 0
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render `n` dSprites-like images, deterministically from `seed`.

    Returns the images, (n, 1, size, size) uint8 (0 background, 255 inside the shape, anti-aliased edges
    from 4x4 supersampling), and their factors of variation, each an (n,) array:
    `shape` int64 index into `SHAPES`; `scale` float32 in [0, 1) (radius from 25% to 50% of the image
    half-width); `rotation` float32 radians in [0, 2*pi); `pos_x`, `pos_y` float32 in [0, 1) (left to
    right, top to bottom, over the range that keeps the largest shape inside the image).
    The first m images do not depend on `n`.
    """
    if n < 0 or size < 4:
        raise DataError(f"sprites need n >= 0 and size >= 4, got n={n}, size={size}")
    factors = _sprite_factors(n, seed)
    images = np.empty((n, 1, size, size), dtype=np.uint8)
    for shape, shape_fn in enumerate(_SHAPE_FNS):
        members = np.flatnonzero(factors["shape"] == shape)
        for start in range(0, len(members), _CHUNK):
            idx = members[start : start + _CHUNK]
            images[idx, 0] = _render(shape_fn, {k: f[idx] for k, f in factors.items()}, size)
    return images, factors


def _load_sprites(seed: int, num_train: int, num_test: int, image_size: int) -> DataSplits:
    if num_train < 1 or num_test < 1:
        raise DataError(f"sprites need num_train and num_test >= 1, got {num_train} and {num_test}")
    train, _ = render_sprites(num_train, image_size, seed=(seed, 0))
    test, _ = render_sprites(num_test, image_size, seed=(seed, 1))
    return DataSplits(torch.from_numpy(train), torch.from_numpy(test), "sprites")


# ------------------------------------------------------------------------------------------ IDX / MNIST

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


# ------------------------------------------------------------------------------------------- CIFAR-10

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


# ---------------------------------------------------------------------------------------- user tensors

_USER_SUFFIXES = (".npz", ".npy", ".pt")
_PREFERRED_KEYS = ("x", "images", "data")
_MAX_REASON = 200  # characters of a library's error message quoted in a DataError


def _reason(err: BaseException) -> str:
    """The first line of an exception's message, shortened: DataError messages are one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def _pick(keys: Sequence[str], path: Path) -> str:
    """The array to use: one of the preferred keys, else the only array; several others are ambiguous."""
    if not keys:
        raise DataError(f"{path} holds no arrays")
    preferred = next((k for k in _PREFERRED_KEYS if k in keys), None)
    if preferred is not None:
        return preferred
    if len(keys) > 1:
        raise DataError(
            f"{path} holds {len(keys)} arrays ({', '.join(sorted(keys))}) and none is named "
            f"{', '.join(_PREFERRED_KEYS)}; save the data under one of those names, or alone"
        )
    return keys[0]


def _from_numpy(array: np.ndarray, path: Path) -> torch.Tensor:
    """A numeric numpy array -> tensor; strings, records, dates and other non-numbers are a DataError."""
    if array.dtype.kind not in "biufc":
        raise DataError(
            f"{path} holds {array.dtype} values, which are not numbers; expected uint8 0..255 or floats in [0, 1]"
        )
    try:
        return torch.from_numpy(array)
    except TypeError as err:  # e.g. float128, which torch has no dtype for
        raise DataError(f"{path} holds {array.dtype} values, which torch cannot read: {_reason(err)}") from err


def _read_user_file(path: Path) -> torch.Tensor:
    """The array in a .npz (key x/images/data, else the only one), .npy or .pt (tensor or dict) file."""
    try:
        suffix = path.suffix.lower()
        if suffix == ".npy":
            return _from_numpy(np.load(path, allow_pickle=False), path)
        if suffix == ".npz":
            with path.open("rb") as f:
                is_npy = f.read(6) == b"\x93NUMPY"
            if is_npy:
                raise DataError(f"{path} is a single .npy array, not a .npz archive; name it .npy")
            if not zipfile.is_zipfile(path):
                raise DataError(f"cannot read {path}: not a .npz (zip) archive")
            with np.load(path, allow_pickle=False) as archive:
                return _from_numpy(archive[_pick(list(archive.files), path)], path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except DataError:
        raise
    except ValueError as err:
        if "allow_pickle" in str(err):  # numpy refuses object arrays, and pickles, without allow_pickle
            raise DataError(
                f"{path} is not a numeric array: numpy reads it as Python objects (an object array, or a "
                "pickle or other non-.npy bytes), which are not loaded; save a numeric array"
            ) from err
        raise DataError(f"cannot read {path}: {_reason(err)}") from err
    except pickle.UnpicklingError as err:
        raise DataError(
            f"{path} holds Python objects that torch.load(weights_only=True) does not load (or is not a "
            "file from torch.save); save only tensors, or a dict of tensors"
        ) from err
    except Exception as err:  # a corrupt or foreign file makes numpy / torch raise many kinds of errors
        hint = " (is it a file from torch.save?)" if path.suffix.lower() == ".pt" else ""
        raise DataError(f"cannot read {path}{hint}: {_reason(err)}") from err
    where = ""
    if isinstance(obj, dict) and any(k in obj for k in _PREFERRED_KEYS):
        key = next(k for k in _PREFERRED_KEYS if k in obj)
        obj, where = obj[key], f" under the key {key!r}"
    if not isinstance(obj, torch.Tensor):
        keys = f" with keys {sorted(map(str, obj))}" if isinstance(obj, dict) else ""
        raise DataError(
            f"{path} holds a {type(obj).__name__}{keys}{where}; expected a tensor, or a dict with one of the "
            f"keys {', '.join(_PREFERRED_KEYS)}"
        )
    if obj.layout != torch.strided:
        raise DataError(f"{path} holds a {obj.layout} tensor{where}; expected a dense tensor (use .to_dense())")
    return obj.detach()


def _user_layout(x: torch.Tensor, path: Path) -> torch.Tensor:
    """(N, D) and (N, C, H, W) stay; (N, H, W) gets a channel axis. No samples or no values is an error."""
    if x.ndim not in (2, 3, 4):
        raise DataError(
            f"{path} holds an array of shape {tuple(x.shape)}; expected (N, D), (N, H, W) or (N, C, H, W)"
        )
    if len(x) == 0:
        raise DataError(f"{path} holds no samples (shape {tuple(x.shape)})")
    if x[0].numel() == 0:
        raise DataError(f"{path} holds samples with no values (shape {tuple(x.shape)}); every dimension must be >= 1")
    return x.unsqueeze(1) if x.ndim == 3 else x


def _user_values(x: torch.Tensor, path: Path) -> torch.Tensor:
    """bool -> uint8 0/255; integers must lie in 0..255 (-> uint8); floats in [0, 1] (-> float32)."""
    if x.dtype == torch.bool:
        return x.to(torch.uint8) * 255
    if x.dtype == torch.uint8:
        return x
    if x.is_complex():
        raise DataError(f"{path} holds complex values ({x.dtype}); expected uint8 0..255 or floats in [0, 1]")
    if x.is_floating_point():
        finite = torch.isfinite(x)
        if not finite.all():
            nan = int(torch.isnan(x).sum())
            counts = [f"{n} {what}" for n, what in ((nan, "NaN"), (int((~finite).sum()) - nan, "infinite")) if n]
            raise DataError(
                f"{path} holds {' and '.join(counts)} values ({x.dtype}); float data must be finite, in [0, 1]"
            )
        lo, hi = x.min().item(), x.max().item()
        if not (0.0 <= lo and hi <= 1.0):
            raise DataError(
                f"{path} holds {x.dtype} values in [{lo:g}, {hi:g}]; float data must lie in [0, 1] "
                "(divide 0..255 pixels by 255, or store them as uint8)"
            )
        return x.to(torch.float32)
    wide = x if x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64) else x.to(torch.float64)
    lo, hi = wide.min().item(), wide.max().item()  # uint16/32/64 have no min/max kernels in torch
    if lo < 0 or hi > 255:
        raise DataError(
            f"{path} holds {x.dtype} values in [{lo:g}, {hi:g}]; integer data must lie in 0..255 "
            "(or store floats in [0, 1])"
        )
    return x.to(torch.uint8)


def _split_user(x: torch.Tensor, path: Path, seed: int, test_fraction: float) -> DataSplits:
    """Shuffle with `seed`; the last ceil(N * test_fraction) samples are the test split."""
    n = len(x)
    n_test = math.ceil(n * test_fraction - 1e-9)
    if n_test < 1 or n - n_test < 1:
        raise DataError(
            f"{path} has {n} samples: too few for a train and a test split with test_fraction={test_fraction}"
            f" ({n - n_test} train, {n_test} test); need at least 1 of each"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    x = x[order]
    return DataSplits(x[: n - n_test], x[n - n_test :], path.name)


def _load_user(path: Path, seed: int, test_fraction: float) -> DataSplits:
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    x = _user_values(_user_layout(_read_user_file(path), path), path)
    return _split_user(x, path, seed, test_fraction)


# ------------------------------------------------------------------------------------------ public API


def _take(split: torch.Tensor, n: int | None, what: str, name: str) -> torch.Tensor:
    """The first `n` samples of `split` (all when n is None); `what` names the argument, `name` the split."""
    if n is None:
        return split
    if not 1 <= n <= len(split):
        raise DataError(f"{what}={n} is out of range: the {name} split has {len(split)} samples")
    return split[:n]


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike = "data",
    download: bool = False,
    seed: int = 0,
    num_train: int | None = None,
    num_test: int | None = None,
    image_size: int = 28,
    test_fraction: float = 0.1,
) -> DataSplits:
    """Load a data set's train and test splits onto the CPU.

    name: 'sprites' (rendered here, no files; `num_train`/`num_test` default to 60000/10000, `image_size` is
    its side in pixels and `seed` picks the images, train and test from separate streams), 'mnist' or
    'fashion-mnist' (IDX files in `data_dir/MNIST/raw`, `data_dir/FashionMNIST/raw` or `data_dir`, gzipped or
    not; `download=True` fetches missing ones with torchvision), 'cifar10' (the python batches
    data_batch_1..5 and test_batch in `data_dir/cifar-10-batches-py` or `data_dir`, as torchvision unpacks
    them: 50000 train and 10000 test (3, 32, 32) images; `download=True` fetches them with torchvision), or
    a path ending .npz/.npy/.pt holding a user's (N, D), (N, H, W) or (N, C, H, W) array (in a .npz: the one
    named x, images or data, or the only one; in a .pt: a tensor or a dict with one of those keys), uint8
    0..255 (or other integers in that range, or bool) or finite floats in [0, 1], with N >= 2 and no empty
    dimension; after a shuffle seeded by `seed`, its last ceil(N * test_fraction) samples are the test split.
    `num_train`/`num_test` keep the first n samples of each split (for sprites: render n).
    `image_size` only applies to sprites; `test_fraction` only to a user's file.
    Returns images as (N, C, H, W) uint8, vectors as (N, D) uint8 or float32. Raises DataError.
    """
    if name == "sprites":
        return _load_sprites(
            seed,
            60_000 if num_train is None else num_train,
            10_000 if num_test is None else num_test,
            image_size,
        )
    if name in _TORCHVISION:
        splits = _load_idx(name, Path(data_dir), download)
    elif name == "cifar10":
        splits = _load_cifar10(Path(data_dir), download)
    elif name.lower().endswith(_USER_SUFFIXES):
        if not 0.0 < test_fraction < 1.0:
            raise DataError(f"test_fraction must be between 0 and 1, got {test_fraction}")
        splits = _load_user(Path(name), seed, test_fraction)
    else:
        raise DataError(
            f"unknown data set {name!r}: use one of {', '.join(DATASETS)}, or a path to a .npz/.npy/.pt file"
        )
    return DataSplits(
        _take(splits.train, num_train, "num_train", f"{splits.name} train"),
        _take(splits.test, num_test, "num_test", f"{splits.name} test"),
        splits.name,
    )


def to_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [0, 1] (divided by 255); a float tensor passes through as float32.

    The shape and device are kept. Raises TypeError for other dtypes.
    """
    if batch.dtype == torch.uint8:
        return batch.to(torch.float32).div_(255.0)
    if batch.is_floating_point():
        return batch.to(torch.float32)
    raise TypeError(f"to_float expects uint8 or floating-point data, got {batch.dtype}")


class DeviceBatches:
    """Shuffled mini-batches of one split that lives on the device as a single tensor.

    `data` is (N, ...) uint8 (kept as uint8 on the device) or float (stored as float32); it is flattened to
    (N, D) once. Each epoch draws a permutation on the device from a generator seeded by (seed, epoch) and
    yields float32 batches in [0, 1] of shape (batch_size, D) by slicing through it; with
    `drop_last=False` the last batch may be smaller.

    Exact resume: `position` is the number of batches of the current epoch handed out so far (set before
    each batch is yielded); after saving `(current_epoch, position)`, `epoch(current_epoch, start=position)`
    continues with the very next batch. `permutation(epoch)` gives the epoch's sample order.

    Data parallelism: with `world_size` W > 1 processes, `batch_size` is the *global* batch. Every rank holds
    the whole split and computes the same permutation; global batch i is perm[i*B : (i+1)*B] and rank `rank`
    takes its part of it: `torch.tensor_split(global_batch, W)[rank]`, so the ranks' parts, in rank order,
    make up the global batch. With `drop_last=True`, B must be a multiple of W (every rank gets B // W rows
    each step, as DDP needs); with `drop_last=False` the parts of the last batch differ by at most one row,
    and a rank whose part is empty skips that batch. `len` is the number of global batches (the same on every
    rank); `shard(epoch)` gives the rank's sample indices of an epoch in order.
    """

    def __init__(
        self,
        data: torch.Tensor,
        batch_size: int,
        *,
        device: torch.device,
        seed: int,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if data.dtype != torch.uint8 and not data.is_floating_point():
            raise TypeError(f"DeviceBatches needs uint8 or floating-point data, got {data.dtype}")
        if data.ndim < 2 or len(data) == 0:
            raise DataError(f"need a non-empty (N, ...) data tensor, got shape {tuple(data.shape)}")
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        if drop_last and batch_size > len(data):
            raise DataError(
                f"batch size {batch_size} is larger than the {len(data)} samples, so an epoch would have no "
                "batches; use a smaller batch size"
            )
        if seed < 0:
            raise DataError(f"seed must be non-negative, got {seed}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank {rank} and world size {world_size}")
        if drop_last and batch_size % world_size:
            raise DataError(
                f"the batch size {batch_size} is the global batch and must be a multiple of the {world_size} "
                f"processes (each takes batch size / {world_size} rows a step); use e.g. "
                f"{max(world_size, batch_size // world_size * world_size)}"
            )
        device = torch.device(device)
        dtype = torch.uint8 if data.dtype == torch.uint8 else torch.float32
        self.data = data.reshape(len(data), -1).to(device=device, dtype=dtype)
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.current_epoch = 0
        self.position = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The (N,) int64 sample order of `epoch`, on the device; a function of (seed, epoch) only."""
        if epoch < 0:
            raise DataError(f"epoch must be non-negative, got {epoch}")
        mixed = int(np.random.SeedSequence((self.seed, epoch)).generate_state(1, np.uint64)[0])
        generator = torch.Generator(device=self.device).manual_seed(mixed)
        return torch.randperm(len(self.data), generator=generator, device=self.device)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        """The batches of `epoch` from batch index `start` on, each float32 (batch, D) in [0, 1].

        Arguments are checked at the call; `current_epoch` and `position` follow the iteration.
        """
        return map(self.gather, self.index_batches(epoch, start))

    def bounds(self, i: int) -> tuple[int, int]:
        """[lo, hi): the positions in the permutation of this rank's part of global batch `i`."""
        start = i * self.batch_size
        rows, extra = divmod(min(self.batch_size, len(self.data) - start), self.world_size)
        lo = start + self.rank * rows + min(self.rank, extra)  # as torch.tensor_split: the first parts get +1
        return lo, lo + rows + (1 if self.rank < extra else 0)

    def shard(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices of `epoch`, in the order its batches hand them out, on the device."""
        perm = self.permutation(epoch)
        return torch.cat([perm[slice(*self.bounds(i))] for i in range(len(self))])

    def index_batches(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        """`epoch` as its batches' sample indices: int64 views of the permutation, on the device; `gather`
        makes each the batch that `epoch` yields. The same arguments, checks and position bookkeeping."""
        if not 0 <= start <= len(self):
            raise DataError(f"start batch {start} is out of range for an epoch of {len(self)} batches")
        return self._index_batches(epoch, self.permutation(epoch), start)

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """The float32 batch (len(indices), D) in [0, 1] of these samples."""
        return to_float(self.data[indices])

    def _index_batches(self, epoch: int, perm: torch.Tensor, start: int) -> Iterator[torch.Tensor]:
        self.current_epoch, self.position = epoch, start
        for i in range(start, len(self)):
            self.position = i + 1
            lo, hi = self.bounds(i)
            if hi > lo:
                yield perm[lo:hi]
