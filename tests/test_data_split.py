"""--test-fraction sets the share of a user's file held out as the test split."""

import json

import numpy as np

from fastvae import train


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
