"""A user's --dataset file that cannot be used: one DataError line naming the file and the problem.

Each bad file is written in tmp_path and loaded twice: through `load_dataset`, and through the CLI
in-process (`fastvae.train.main`), which must return 2 and print one `error: ...` line, no traceback.
"""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch

from fastvae import train
from fastvae.data import DataError, load_dataset


def _npy(array):
    def write(path):
        with path.open("wb") as f:  # np.save(path) would append .npy to array.npz
            np.save(f, array)

    return write


def _npz(**arrays):
    return lambda path: np.savez(path, **arrays)


def _pt(obj):
    return lambda path: torch.save(obj, path)


def _bytes(raw: bytes):
    return lambda path: path.write_bytes(raw)


def _truncated_npy(path):
    np.save(path, np.zeros((10, 3), np.float32))
    path.write_bytes(path.read_bytes()[:100])


class _Opaque:
    """A Python object that torch.load(weights_only=True) refuses to unpickle."""


BAD_FILES = [
    # shape
    ("flat.npy", _npy(np.zeros(10, np.uint8)), r"shape \(10,\); expected \(N, D\), \(N, H, W\) or \(N, C, H, W\)"),
    ("scalar.npy", _npy(np.array(0.5)), r"shape \(\); expected \(N, D\)"),
    ("empty.npy", _npy(np.zeros((0, 3), np.float32)), r"holds no samples \(shape \(0, 3\)\)"),
    ("empty.pt", _pt(torch.zeros(0, 1, 4, 4)), r"holds no samples \(shape \(0, 1, 4, 4\)\)"),
    ("novalues.npy", _npy(np.zeros((10, 0), np.float32)), r"samples with no values \(shape \(10, 0\)\)"),
    ("zeroside.npy", _npy(np.zeros((10, 1, 0, 4), np.uint8)), r"samples with no values \(shape \(10, 1, 0, 4\)\)"),
    # dtype
    ("negative.npy", _npy(np.full((10, 3), -1, np.int64)), r"int64 values in \[-1, -1\]; integer data must lie in 0"),
    ("large.npy", _npy(np.arange(30, dtype=np.int64).reshape(10, 3) * 20), r"int64 values in \[0, 580\]"),
    ("uint16.npy", _npy(np.full((10, 3), 1000, np.uint16)), r"uint16 values in \[1000, 1000\]"),
    ("uint64.npy", _npy(np.full((10, 3), 2**63 + 5, np.uint64)), r"uint64 values in \[9\.2\d*e\+18"),
    ("complex.npy", _npy(np.zeros((10, 3), np.complex64)), r"holds complex values \(torch.complex64\)"),
    ("complex.pt", _pt(torch.zeros(10, 3, dtype=torch.complex64)), r"holds complex values"),
    ("strings.npy", _npy(np.array([["a", "b"]] * 10)), r"holds <U1 values, which are not numbers"),
    ("records.npy", _npy(np.zeros(10, dtype=[("a", "f4"), ("b", "f4")])), r"values, which are not numbers"),
    ("dates.npy", _npy(np.zeros((10, 3), "datetime64[s]")), r"datetime64\[s\] values, which are not numbers"),
    ("objects.npy", _npy(np.array([[1, "a"]] * 10, dtype=object)), r"not a numeric array: .*Python objects"),
    ("objects.npz", _npz(x=np.array([[1, "a"]] * 10, dtype=object)), r"not a numeric array: .*Python objects"),
    # range
    ("above.npy", _npy(np.full((10, 3), 1.5, np.float32)), r"float32 values in \[1\.5, 1\.5\]; with --likelihood bern"),
    ("pixels.pt", _pt(torch.full((10, 3), 255.0)), r"float32 values in \[255, 255\]; .*divide 0\.\.255 pixels by 255"),
    ("bf16.pt", _pt(torch.full((10, 3), -2.0, dtype=torch.bfloat16)), r"bfloat16 values in \[-2, -2\]"),
    ("nan.npy", _npy(np.array([[0.5, np.nan]] * 10, np.float32)), r"holds 10 NaN values \(torch.float32\)"),
    ("inf.npy", _npy(np.array([[np.inf, -np.inf]] * 10)), r"holds 20 infinite values \(torch.float64\)"),
    ("naninf.npy", _npy(np.array([[np.nan, np.inf, 0.5]] * 10)), r"holds 10 NaN and 10 infinite values"),
    # unreadable, not an array, corrupt
    ("junk.npy", _bytes(b"this is not numpy"), r"not a numeric array"),
    ("junk.npz", _bytes(b"PK\x03\x04 not really a zip"), r"cannot read .*junk\.npz: not a \.npz \(zip\) archive"),
    ("junk.pt", _bytes(b"hello world"), r"cannot read .*junk\.pt \(is it a file from torch\.save\?\)"),
    ("notzip.npz", _bytes(b"hello world"), r"cannot read .*notzip\.npz: not a \.npz \(zip\) archive"),
    ("truncated.npy", _truncated_npy, r"cannot read .*truncated\.npy: ValueError: EOF"),
    ("array.npz", _npy(np.zeros((10, 3), np.float32)), r"is a single \.npy array, not a \.npz archive"),
    ("pickle.pt", lambda path: path.write_bytes(pickle.dumps(_Opaque())), r"holds Python objects that torch\.load"),
    ("list.pt", _pt([1, 2, 3]), r"holds a list; expected a tensor, or a dict"),
    ("dictlist.pt", _pt({"x": [1, 2]}), r"holds a list under the key 'x'; expected a tensor"),
    ("sparse.pt", _pt(torch.eye(10, 3).to_sparse()), r"holds a torch\.sparse_coo tensor; expected a dense tensor"),
    # no obvious array
    ("none.npz", _npz(), r"holds no arrays"),
    (
        "several.npz",
        _npz(train=np.zeros((10, 3), np.uint8), labels=np.zeros(10, np.int64)),
        r"holds 2 arrays \(labels, train\) and none is named x, images, data",
    ),
]


@pytest.mark.parametrize(("name", "write", "message"), BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_data_file_is_one_data_error_line(tmp_path, name, write, message):
    path = tmp_path / name
    write(path)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(str(path))
    text = str(info.value)
    assert str(path) in text, "the message names the file"
    assert "\n" not in text and len(text) < 400, "one short line"


@pytest.mark.parametrize(
    ("name", "write", "message"),
    [case for case in BAD_FILES if case[0] in ("flat.npy", "uint16.npy", "nan.npy", "junk.pt", "several.npz")],
    ids=["flat.npy", "uint16.npy", "nan.npy", "junk.pt", "several.npz"],
)
def test_bad_data_file_through_the_cli(tmp_path, capsys, name, write, message):
    path = tmp_path / name
    write(path)
    code = train.main(["--dataset", str(path), "--epochs", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], err
    assert "Traceback" not in err
    assert re.search(message, lines[0])


def test_good_files_still_load(tmp_path):
    """The checks above refuse only bad data: these all load."""
    np.save(tmp_path / "u16.npy", np.full((10, 3), 200, np.uint16))
    assert load_dataset(str(tmp_path / "u16.npy")).train.dtype == torch.uint8
    np.save(tmp_path / "f16.npy", np.full((10, 3), 0.5, np.float16))
    assert load_dataset(str(tmp_path / "f16.npy")).train.dtype == torch.float32
    np.savez(tmp_path / "named.npz", labels=np.zeros(10), data=np.ones((10, 2), np.uint8))
    assert load_dataset(str(tmp_path / "named.npz")).sample_shape == (2,)
    torch.save({"images": torch.zeros(10, 1, 2, 2, requires_grad=True)}, tmp_path / "grad.pt")
    assert not load_dataset(str(tmp_path / "grad.pt")).train.requires_grad
