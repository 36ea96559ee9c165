"""The value rule of a user's float data follows the likelihood: Bernoulli needs [0, 1], Gaussian any finite floats."""

import json

import numpy as np
import pytest
import torch

from fastvae.data import DataError, load_dataset


def _signed(tmp_path):
    path = tmp_path / "signed.npy"
    np.save(path, np.linspace(-3.5, 4.5, 40, dtype=np.float32).reshape(10, 4))
    return str(path)


def test_gaussian_takes_standardised_floats(tmp_path):
    data = load_dataset(_signed(tmp_path), likelihood="gaussian")
    values = torch.cat([data.train, data.test])
    assert values.dtype == torch.float32
    assert values.min().item() == -3.5 and values.max().item() == 4.5  # kept as they are, not rescaled


def test_bernoulli_refuses_values_outside_0_1_and_says_why(tmp_path):
    rule = r"in \[-3\.5, 4\.5\]; with --likelihood bernoulli.*in \[0, 1\].*--likelihood gaussian"
    with pytest.raises(DataError, match=rule):
        load_dataset(_signed(tmp_path), likelihood="bernoulli")


def test_gaussian_still_refuses_non_finite_values(tmp_path):
    path = tmp_path / "nan.npy"
    np.save(path, np.array([[0.5, np.nan], [2.0, 3.0], [1.0, 1.0]], dtype=np.float32))
    with pytest.raises(DataError, match=r"1 NaN.*must be finite \(any finite value fits --likelihood gaussian\)$"):
        load_dataset(str(path), likelihood="gaussian")
    with pytest.raises(DataError, match=r"1 NaN.*must be finite, in \[0, 1\] for --likelihood bernoulli$"):
        load_dataset(str(path), likelihood="bernoulli")


def test_a_complex_file_names_the_rule_of_its_likelihood(tmp_path):
    path = tmp_path / "complex.npy"
    np.save(path, np.ones((4, 2), np.complex64))
    with pytest.raises(DataError, match=r"complex values .*; expected uint8 0\.\.255 or finite floats$"):
        load_dataset(str(path), likelihood="gaussian")
    with pytest.raises(DataError, match=r"complex values .*; expected uint8 0\.\.255 or floats in \[0, 1\]$"):
        load_dataset(str(path), likelihood="bernoulli")


def test_gaussian_run_trains_on_signed_data_and_records_its_range(tmp_path):
    from fastvae import train

    path = _signed(tmp_path)
    out = tmp_path / "runs"
    args = ["--dataset", path, "--epochs", "1", "--batch-size", "4", "--hidden", "8", "--latent-dim", "2"]
    assert train.main([*args, "--out", str(out)]) == 0
    (config_path,) = out.rglob("config.json")
    config = json.loads(config_path.read_text())
    assert config["likelihood"] == "gaussian"
    assert config["data_range"] == [-3.5, 4.5]
