"""CIFAR-10 from its python batches in torchvision's layout, on tiny files written here (never a download)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastvae import pictures, train
from fastvae.data import CIFAR10_FOLDER, DataError, load_dataset
from fastvae.images import DPI, MIN_SIDE

PER_BATCH, TEST = 4, 6  # images per training batch file (5 files) and in test_batch


def write_batch(path: Path, data: np.ndarray, protocol: int = pickle.HIGHEST_PROTOCOL, key: object = b"data") -> None:
    """One batch file as the CIFAR-10 python version has it: a pickled dict of the (N, 3072) uint8 rows."""
    labels = [int(i % 10) for i in range(len(data))]
    batch = {b"batch_label": b"a tiny batch", b"labels": labels, key: data, b"filenames": [b"x.png"] * len(data)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(batch, protocol=protocol))


def write_cifar10(folder: Path, seed: int = 0, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """data_batch_1..5 and test_batch of random images in `folder`; returns the train and test rows."""
    rng = np.random.default_rng(seed)
    train_rows = rng.integers(0, 256, (5 * PER_BATCH, 3072), dtype=np.uint8)
    test_rows = rng.integers(0, 256, (TEST, 3072), dtype=np.uint8)
    for i in range(5):
        write_batch(folder / f"data_batch_{i + 1}", train_rows[i * PER_BATCH : (i + 1) * PER_BATCH], **kwargs)
    write_batch(folder / "test_batch", test_rows, **kwargs)
    return train_rows, test_rows


@pytest.mark.parametrize("sub", [CIFAR10_FOLDER, "."])
def test_reads_the_batches_in_order_as_rgb_images(tmp_path, sub):
    train_rows, test_rows = write_cifar10(tmp_path / sub)
    data = load_dataset("cifar10", data_dir=tmp_path)
    assert data.name == "cifar10" and data.sample_shape == (3, 32, 32) and data.dim == 3072
    assert data.train.dtype == torch.uint8 and data.train.shape == (5 * PER_BATCH, 3, 32, 32)
    # A row is 1024 red values, then green, then blue, each row-major over the 32 x 32 pixels.
    assert data.train[5, 0, 0, 1] == train_rows[5, 1] and data.train[5, 1, 2, 3] == train_rows[5, 1024 + 2 * 32 + 3]
    assert data.test[TEST - 1, 2, 31, 31] == test_rows[TEST - 1, 3071]
    assert torch.equal(data.train.flatten(1), torch.from_numpy(train_rows))  # data_batch_1 first, then 2 ...
    assert torch.equal(data.test.flatten(1), torch.from_numpy(test_rows))
    small = load_dataset("cifar10", data_dir=tmp_path, num_train=7, num_test=2)
    assert torch.equal(small.train, data.train[:7]) and torch.equal(small.test, data.test[:2])


@pytest.mark.parametrize(("protocol", "key"), [(2, b"data"), (2, "data"), (pickle.HIGHEST_PROTOCOL, "data")])
def test_reads_python2_style_pickles(tmp_path, protocol, key):
    """The published files are Python 2 pickles (protocol 2, read with latin1): their keys come out as str."""
    _, test_rows = write_cifar10(tmp_path, protocol=protocol, key=key)
    assert torch.equal(load_dataset("cifar10", data_dir=tmp_path).test.flatten(1), torch.from_numpy(test_rows))


def test_missing_batches_name_the_paths_tried(tmp_path):
    write_cifar10(tmp_path / CIFAR10_FOLDER)
    (tmp_path / CIFAR10_FOLDER / "data_batch_3").unlink()
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(info.value)
    assert f"{tmp_path / CIFAR10_FOLDER}, which lacks data_batch_3\n" in message
    assert f"{tmp_path}, which lacks data_batch_1, data_batch_2" in message
    assert "--download" in message


def test_missing_batches_through_the_cli(tmp_path, capsys):
    code = train.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cifar10 batches not found") and "Traceback" not in err
    assert str(tmp_path / CIFAR10_FOLDER) in err and "--download" in err
    assert not (tmp_path / "run").exists()


class _Opaque:
    def __reduce__(self):
        return (os.getcwd, ())  # what a malicious pickle would do: call something on load


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda rows: pickle.dumps({b"data": rows})[:-20], r"cannot read .*data_batch_2 as a CIFAR-10 batch"),
        (lambda rows: pickle.dumps({b"data": _Opaque()}), r"holds posix\.getcwd, which a CIFAR-10 batch does not"),
        (lambda rows: pickle.dumps({b"data": rows[:, :100]}), r"uint8 array \(N, 3072\), got uint8 array of shape"),
        (lambda rows: pickle.dumps({b"data": rows.astype(np.float32)}), r"got float32 array of shape \(4, 3072\)"),
        (lambda rows: pickle.dumps([rows]), r"a uint8 array \(N, 3072\), got NoneType"),
    ],
    ids=["truncated", "foreign object", "wrong width", "floats", "not a dict"],
)
def test_a_bad_batch_file_is_a_data_error(tmp_path, content, message):
    train_rows, _ = write_cifar10(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(content(train_rows[:PER_BATCH]))
    with pytest.raises(DataError, match=message) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(tmp_path / "data_batch_2") in str(info.value) and "\n" not in str(info.value)


def test_download_goes_through_torchvision_into_its_layout(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeCIFAR10:
        def __init__(self, root: str, train: bool, download: bool):
            calls.append((root, train, download))
            write_cifar10(Path(root) / CIFAR10_FOLDER, seed=3)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    data = load_dataset("cifar10", data_dir=tmp_path, download=True)
    assert calls == [(str(tmp_path), True, True)] and len(data.test) == TEST
    load_dataset("cifar10", data_dir=tmp_path, download=True)  # the files are there: no second download
    assert len(calls) == 1


def test_a_conv_run_with_a_learned_scale(tmp_path, capsys, monkeypatch):
    """--dataset cifar10 --arch conv --sigma learned trains (D = 3072) and draws colour pictures."""
    drawn = {}
    real_save_grid = pictures.save_grid

    def recording_save_grid(images, path, nrow=8, **labels):
        drawn[Path(path).name] = (tuple(images.shape), nrow)
        real_save_grid(images, path, nrow, **labels)

    monkeypatch.setattr(pictures, "save_grid", recording_save_grid)
    write_cifar10(tmp_path / "data" / CIFAR10_FOLDER)
    out = tmp_path / "run"
    args = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--arch", "conv", "--sigma", "learned"]
    args += ["--batch-size", "10", "--hidden", "16", "--latent-dim", "4", "--epochs", "2", "--out", str(out)]
    assert train.main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["data_shape"] == [3, 32, 32] and config["num_train"] == 5 * PER_BATCH
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(rows[-1]["test_elbo"])
    assert drawn["samples.png"] == ((64, 3, 32, 32), 8)  # colour images, 8 per row
    assert drawn["interpolations.png"] == ((3 * 10, 3, 32, 32), 10)  # the 6 test images make 3 pairs
    for name in ("samples.png", "interpolations.png"):
        with Image.open(out / name) as picture:  # enlarged (nearest) to at least images.MIN_SIDE inches
            assert picture.mode in ("RGB", "RGBA") and max(picture.size) >= MIN_SIDE * DPI
    assert not (out / "manifold.png").exists()  # latent dim 4
