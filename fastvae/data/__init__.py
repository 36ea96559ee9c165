"""Training data: embedded sprites, MNIST / Fashion-MNIST from IDX files, CIFAR-10 from its python batches,
and a user's own tensors.

`load_dataset` returns a `DataSplits` of CPU tensors: images as (N, C, H, W) uint8 in 0..255, vectors as
(N, D) uint8 or float32 in [0, 1]. `DeviceBatches` puts one split on the device and yields shuffled
float32 batches in [0, 1], flattened to (batch, D), with an exactly resumable order.

Every problem with the data itself raises `DataError`, whose message is meant for the user as is.

The modules: `splits` (DataSplits, DataError), `sprites`, `idx` (MNIST / Fashion-MNIST), `cifar10`,
`user_files` (a user's .npz/.npy/.pt), `load` (load_dataset) and `batches` (DeviceBatches, to_float).
"""

from fastvae.data.batches import DeviceBatches, to_float
from fastvae.data.cifar10 import CIFAR10_BATCHES, CIFAR10_FOLDER
from fastvae.data.idx import read_idx
from fastvae.data.load import ARRAY, DATASETS, load_dataset, split_array
from fastvae.data.splits import DataError, DataSplits
from fastvae.data.sprites import SHAPES, render_sprites
from fastvae.data.user_files import LAYOUTS, TEST_FRACTION, is_data_file

__all__ = [
    "ARRAY",
    "CIFAR10_BATCHES",
    "CIFAR10_FOLDER",
    "DATASETS",
    "DataError",
    "DataSplits",
    "DeviceBatches",
    "LAYOUTS",
    "SHAPES",
    "TEST_FRACTION",
    "is_data_file",
    "load_dataset",
    "read_idx",
    "render_sprites",
    "split_array",
    "to_float",
]

