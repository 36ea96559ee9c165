"""A user's own data: one array in a .npz, .npy or .pt file, checked and split into train and test."""

from __future__ import annotations

import math
import os
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fastvae.data.splits import DataError, DataSplits, _reason

_USER_SUFFIXES = (".npz", ".npy", ".pt")
_PREFERRED_KEYS = ("x", "images", "data")
TEST_FRACTION = 0.1
"""The share of a single file held out as its test split when no other is given (--test-fraction)."""


def is_data_file(name: str | os.PathLike | None) -> bool:
    """Whether a --dataset / --test-data value names a user's file (.npz, .npy or .pt), not a named data set."""
    return name is not None and str(name).lower().endswith(_USER_SUFFIXES)


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
            f"{path} holds {array.dtype} values, which are not numbers; expected uint8 0..255 or floats"
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
    return _as_tensor(obj, path, where, f"a tensor, or a dict with one of the keys {', '.join(_PREFERRED_KEYS)}")


def _as_tensor(obj: object, path: Path, where: str = "", expected: str = "a tensor") -> torch.Tensor:
    """A numpy array or dense tensor -> a CPU tensor, detached; anything else is a DataError naming `path`
    (`where` in it, `expected` what was wanted)."""
    if isinstance(obj, np.ndarray):
        return _from_numpy(obj, path)
    if not isinstance(obj, torch.Tensor):
        keys = f" with keys {sorted(map(str, obj))}" if isinstance(obj, dict) else ""
        raise DataError(f"{path} holds a {type(obj).__name__}{keys}{where}; expected {expected}")
    if obj.layout != torch.strided:
        raise DataError(f"{path} holds a {obj.layout} tensor{where}; expected a dense tensor (use .to_dense())")
    return obj.detach().cpu()


LAYOUTS = ("auto", "nchw", "nhwc")
"""--layout: how a 4-d array's axes are read; auto takes (N, H, W, C) when it looks like channel-last images."""
_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA


def _looks_channel_last(shape: tuple[int, ...]) -> bool:
    """(N, H, W, C) with C in 1/3/4 and H, W > 4, whose axis 1 cannot be channels."""
    return len(shape) == 4 and shape[3] in _CHANNELS and shape[1] > 4 and shape[2] > 4 and shape[1] not in _CHANNELS


def _user_layout(x: torch.Tensor, path: Path, layout: str = "auto") -> tuple[torch.Tensor, tuple[str, ...]]:
    """(N, D) and (N, C, H, W) stay; (N, H, W) gets a channel axis; (N, H, W, C) (guessed under `layout`
    'auto', or forced by 'nhwc') becomes (N, C, H, W), with a note saying so. Returns (x, notes).
    No samples, no values, or 'nhwc' on an array that is not 4-d, is an error."""
    if x.ndim not in (2, 3, 4):
        raise DataError(
            f"{path} holds an array of shape {tuple(x.shape)}; expected (N, D), (N, H, W) or (N, C, H, W)"
        )
    if len(x) == 0:
        raise DataError(f"{path} holds no samples (shape {tuple(x.shape)})")
    if x[0].numel() == 0:
        raise DataError(f"{path} holds samples with no values (shape {tuple(x.shape)}); every dimension must be >= 1")
    if layout == "nhwc" and x.ndim != 4:
        raise DataError(f"--layout nhwc needs an (N, H, W, C) array, but {path} holds shape {tuple(x.shape)}")
    if layout == "nhwc" or (layout == "auto" and _looks_channel_last(tuple(x.shape))):
        note = (
            f"{path.name}: read {tuple(x.shape)} as channel-last (N, H, W, C) images and moved it to (N, C, H, W) "
            f"{(x.shape[0], x.shape[3], x.shape[1], x.shape[2])}"
            + ("; pass --layout nchw to read it as it is" if layout == "auto" else "")
        )
        return x.permute(0, 3, 1, 2).contiguous(), (note,)
    return (x.unsqueeze(1) if x.ndim == 3 else x), ()


def _user_values(x: torch.Tensor, path: Path, likelihood: str) -> torch.Tensor:
    """bool -> uint8 0/255; integers must lie in 0..255 (-> uint8); floats (-> float32) must be finite, and for
    a Bernoulli likelihood, whose values are probabilities, lie in [0, 1]."""
    if x.dtype == torch.bool:
        return x.to(torch.uint8) * 255
    if x.dtype == torch.uint8:
        return x
    if x.is_complex():
        floats = "floats in [0, 1]" if likelihood == "bernoulli" else "finite floats"
        raise DataError(f"{path} holds complex values ({x.dtype}); expected uint8 0..255 or {floats}")
    if x.is_floating_point():
        finite = torch.isfinite(x)
        if not finite.all():
            nan = int(torch.isnan(x).sum())
            counts = [f"{n} {what}" for n, what in ((nan, "NaN"), (int((~finite).sum()) - nan, "infinite")) if n]
            rule = (", in [0, 1] for --likelihood bernoulli" if likelihood == "bernoulli"
                    else " (any finite value fits --likelihood gaussian)")  # fmt: skip
            raise DataError(f"{path} holds {' and '.join(counts)} values ({x.dtype}); float data must be finite{rule}")
        lo, hi = x.min().item(), x.max().item()
        if likelihood == "bernoulli" and not (0.0 <= lo and hi <= 1.0):
            raise DataError(
                f"{path} holds {x.dtype} values in [{lo:g}, {hi:g}]; with --likelihood bernoulli each value is a "
                "probability, so float data must lie in [0, 1] (divide 0..255 pixels by 255, or store them as "
                "uint8); real-valued data (standardised, features, audio) fit --likelihood gaussian"
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


def _split_user(
    x: torch.Tensor, path: Path, seed: int, test_fraction: float, notes: tuple[str, ...] = ()
) -> DataSplits:
    """Shuffle with `seed`; the last ceil(N * test_fraction) samples are the test split."""
    n = len(x)
    n_test = math.ceil(n * test_fraction - 1e-9)
    if n_test < 1 or n - n_test < 1:
        raise DataError(
            f"{path} has {n} samples: too few for a train and a test split with --test-fraction {test_fraction}"
            f" ({n - n_test} train, {n_test} test); need at least 1 of each"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    x = x[order]
    return DataSplits(x[: n - n_test], x[n - n_test :], path.name, notes)


def _read_checked(path: Path, likelihood: str, layout: str) -> tuple[torch.Tensor, tuple[str, ...]]:
    """A user's file, its layout read (`_user_layout`) and its values checked (`_user_values`): (x, notes)."""
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    return _checked(_read_user_file(path), path, likelihood, layout)


def _checked(x: torch.Tensor, path: Path, likelihood: str, layout: str) -> tuple[torch.Tensor, tuple[str, ...]]:
    """A user's array `x` (read from `path`, which the messages name), its layout read and values checked."""
    x, notes = _user_layout(x, path, layout)
    return _user_values(x, path, likelihood), notes


def _split_by_fraction(
    x: torch.Tensor, path: Path, seed: int, test_fraction: float | None, notes: tuple[str, ...]
) -> DataSplits:
    """`x` split into train and test by `test_fraction` (None: TEST_FRACTION), shuffled with `seed`."""
    test_fraction = TEST_FRACTION if test_fraction is None else test_fraction
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"the test fraction (--test-fraction) must be between 0 and 1, got {test_fraction}")
    return _split_user(x, path, seed, test_fraction, notes)


def _load_user(
    path: Path, seed: int, test_fraction: float | None, likelihood: str, layout: str, test_path: Path | None = None
) -> DataSplits:
    """One file split by `test_fraction` (None: TEST_FRACTION), or, with `test_path`, the whole of `path` as the
    training split and the whole of `test_path` as the test split, in their files' order. Both files follow
    the same layout and value rules, and must hold samples of one shape stored alike (uint8 or float)."""
    x, notes = _read_checked(path, likelihood, layout)
    if test_path is None:
        return _split_by_fraction(x, path, seed, test_fraction, notes)
    if test_fraction is not None:
        raise DataError(
            f"a test fraction (--test-fraction {test_fraction}) splits one file, and a test file (--test-data "
            f"{test_path}) is the test split itself, with all of {path} for training: give one of them"
        )
    test, test_notes = _read_checked(test_path, likelihood, layout)
    if x.shape[1:] != test.shape[1:]:
        how = "".join(f"; {note}" for note in (*notes, *test_notes))
        raise DataError(
            f"the test file {test_path} holds samples of shape {tuple(test.shape[1:])} and the training file "
            f"{path} samples of shape {tuple(x.shape[1:])}; both files must hold samples of one shape{how}"
        )
    if x.dtype != test.dtype:
        kind = {torch.uint8: "integer (0..255)", torch.float32: "float"}
        raise DataError(
            f"the test file {test_path} holds {kind[test.dtype]} values and the training file {path} "
            f"{kind[x.dtype]} values; store both as uint8 0..255, or both as floats"
        )
    return DataSplits(x, test, path.name, notes + test_notes)


# ------------------------------------------------------------------------------------------ public API

