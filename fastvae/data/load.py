"""`load_dataset`: a data set's train and test splits by name or path."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fastvae.data.cifar10 import _load_cifar10
from fastvae.data.idx import _TORCHVISION, _load_idx
from fastvae.data.splits import DataError, DataSplits
from fastvae.data.sprites import _load_sprites
from fastvae.data.user_files import _as_tensor, _checked, _load_user, _split_by_fraction, is_data_file

DATASETS = ("sprites", "mnist", "fashion-mnist", "cifar10")
"""The named data sets; any other name must be a .npz/.npy/.pt path."""



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
    test_fraction: float | None = None,
    likelihood: str = "bernoulli",
    layout: str = "auto",
    test_data: str | os.PathLike | None = None,
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
    dimension; after a shuffle seeded by `seed`, its last ceil(N * test_fraction) samples are the test split
    (`test_fraction` None: TEST_FRACTION, 0.1). With `test_data`, a second such file (only with a user's file,
    and not with `test_fraction`), the whole of `name` is the training split and the whole of `test_data` the
    test split, in the files' order; both must hold samples of one shape, both uint8 or both floats.
    `num_train`/`num_test` keep the first n samples of each split (for sprites: render n).
    `image_size` only applies to sprites; `test_fraction` and `likelihood` only to a user's file: for
    'gaussian' its floats may take any finite values, for 'bernoulli' (probabilities) they must lie in [0, 1].
    `layout` ('auto', 'nchw', 'nhwc') reads a user's 4-d array's axes: 'auto' takes (N, H, W, C) with C in
    1/3/4 and H, W > 4 as channel-last images, and says so in the result's `notes`.
    Returns images as (N, C, H, W) uint8, vectors as (N, D) uint8 or float32. Raises DataError.
    """
    if test_data is not None and not is_data_file(name):
        raise DataError(
            f"a test file (--test-data {test_data}) goes with a .npz/.npy/.pt --dataset file; {name} has a test "
            "split of its own"
        )
    if test_data is not None and not is_data_file(test_data):
        raise DataError(f"the test file (--test-data) must be a .npz/.npy/.pt file, got {test_data}")
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
    elif is_data_file(name):
        splits = _load_user(
            Path(name), seed, test_fraction, likelihood, layout, None if test_data is None else Path(test_data)
        )
    else:
        raise DataError(
            f"unknown data set {name!r}: use one of {', '.join(DATASETS)}, or a path to a .npz/.npy/.pt file"
        )
    return _first(splits, num_train, num_test)


def _first(splits: DataSplits, num_train: int | None, num_test: int | None) -> DataSplits:
    """The first `num_train` and `num_test` samples of the splits (all for None)."""
    return DataSplits(
        _take(splits.train, num_train, "num_train", f"{splits.name} train"),
        _take(splits.test, num_test, "num_test", f"{splits.name} test"),
        splits.name,
        splits.notes,
    )


ARRAY = "array"
"""The name of a data set given as an array (`split_array`, `fastvae.fit`): config.json's "dataset"."""


def split_array(
    x: object,
    *,
    seed: int = 0,
    num_train: int | None = None,
    num_test: int | None = None,
    test_fraction: float | None = None,
    likelihood: str = "bernoulli",
    layout: str = "auto",
) -> DataSplits:
    """The train and test splits of an array given in memory, exactly as `load_dataset` makes them of a user's
    file holding it: `x` a numpy array or tensor (N, D), (N, H, W) or (N, C, H, W), with the same value rules,
    layout, seeded shuffle and test fraction, and the first `num_train`/`num_test` samples kept. The splits
    are named ARRAY. Raises DataError."""
    path = Path(ARRAY)
    x, notes = _checked(_as_tensor(x, path), path, likelihood, layout)
    return _first(_split_by_fraction(x, path, seed, test_fraction, notes), num_train, num_test)

