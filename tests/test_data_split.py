"""The test split of a user's data: --test-fraction of the file, or --test-data, a file of its own."""

import hashlib
import json

import numpy as np
import pytest
import torch

from fastvae import train
from fastvae.data import DataError, load_dataset


def test_test_fraction_flag_sets_the_split(tmp_path, capsys):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((20, 4), np.uint8))
    args = ["--dataset", str(path), "--epochs", "1", "--batch-size", "4", "--hidden", "8", "--latent-dim", "2"]
    assert train.main([*args, "--test-fraction", "0.25", "--out", str(tmp_path / "r")]) == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (config["num_train"], config["num_test"]) == (15, 5)


def test_test_fraction_out_of_range_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((20, 4), np.uint8))
    assert train.main(["--dataset", str(path), "--test-fraction", "1.5", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "test" in err[0] and "1.5" in err[0], err


# ------------------------------------------------------------------------------------------- --test-data

SMALL = ["--epochs", "1", "--batch-size", "4", "--hidden", "8", "--latent-dim", "2"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_test_file_is_the_test_split_and_the_whole_dataset_file_trains(tmp_path):
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (12, 10, 10, 3), dtype=np.uint8)  # channel-last: moved to (3, 10, 10)
    test_x = rng.integers(0, 256, (5, 3, 10, 10), dtype=np.uint8)  # already (N, C, H, W)
    np.save(tmp_path / "train.npy", train_x)
    np.save(tmp_path / "test.npy", test_x)
    data = load_dataset(str(tmp_path / "train.npy"), test_data=tmp_path / "test.npy")
    assert torch.equal(data.train, torch.from_numpy(train_x).permute(0, 3, 1, 2))  # the file's order, all of it
    assert torch.equal(data.test, torch.from_numpy(test_x))
    assert len(data.notes) == 1 and "train.npy" in data.notes[0]


def test_the_likelihood_s_value_rule_applies_to_the_test_file(tmp_path):
    np.save(tmp_path / "train.npy", np.full((8, 4), 0.5, np.float32))
    np.save(tmp_path / "test.npy", np.full((3, 4), 2.0, np.float32))
    rule = r"test\.npy holds torch\.float32 values in \[2, 2\]; with --likelihood bernoulli"
    with pytest.raises(DataError, match=rule):
        load_dataset(str(tmp_path / "train.npy"), test_data=tmp_path / "test.npy", likelihood="bernoulli")
    data = load_dataset(str(tmp_path / "train.npy"), test_data=tmp_path / "test.npy", likelihood="gaussian")
    assert data.value_range == (0.5, 2.0)


@pytest.mark.parametrize(
    ("test_array", "message"),
    [
        (np.zeros((3, 5), np.uint8), r"test\.npy holds samples of shape \(5,\) and the training file .*train\.npy "
         r"samples of shape \(4,\)"),
        (np.zeros((3, 4), np.float32), r"test\.npy holds float values and the training file .*train\.npy integer"),
    ],
    ids=["shape", "storage"],
)
def test_a_test_file_unlike_the_training_file_is_refused(tmp_path, test_array, message):
    np.save(tmp_path / "train.npy", np.zeros((8, 4), np.uint8))
    np.save(tmp_path / "test.npy", test_array)
    with pytest.raises(DataError, match=message):
        load_dataset(str(tmp_path / "train.npy"), test_data=tmp_path / "test.npy")


def test_test_data_in_the_cli_and_its_fingerprint_in_config(tmp_path):
    np.save(tmp_path / "train.npy", np.zeros((12, 4), np.uint8))
    np.save(tmp_path / "test.npy", np.full((5, 4), 255, np.uint8))
    out = tmp_path / "r"
    assert train.main(["--dataset", str(tmp_path / "train.npy"), "--test-data", str(tmp_path / "test.npy"),
                       *SMALL, "--out", str(out)]) == 0  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert (config["num_train"], config["num_test"], config["test_fraction"]) == (12, 5, None)
    assert config["test_data"] == str(tmp_path / "test.npy")
    for name, key in (("train.npy", "dataset_sha256"), ("test.npy", "test_data_sha256")):
        assert config[key] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--test-fraction", "0.2"], "--test-fraction 0.2"),
        (["--dataset", "sprites"], "sprites has a test split of its own"),
    ],
    ids=["with-test-fraction", "with-a-named-set"],
)
def test_test_data_conflicts_are_one_error_line(tmp_path, capsys, extra, needle):
    np.save(tmp_path / "x.npy", np.zeros((12, 4), np.uint8))
    argv = ["--dataset", str(tmp_path / "x.npy"), "--test-data", str(tmp_path / "x.npy"), *SMALL, *extra]
    assert train.main([*argv, "--out", str(tmp_path / "r")]) == 2
    assert needle in _one_error_line(capsys)
    assert not (tmp_path / "r").exists()
