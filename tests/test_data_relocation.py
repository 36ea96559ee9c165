"""A run's data file that moved: `--resume RUN --dataset NEWPATH` and `fastvae.evaluate RUN --dataset NEWPATH`
(and `--test-data NEWPATH`) read the new path when its SHA-256 is the one the run recorded, and refuse
another file naming both digests."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from fastvae import evaluate, rundir, train
from fastvae.options import ConfigError

SMALL = ["--batch-size", "4", "--hidden", "8", "--latent-dim", "2", "--log-every", "2"]
EVAL = ["--iw-samples", "2", "--chunk", "2"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def stopped_run(tmp_path):
    """A run on data/train.npy with its test split in data/test.npy, stopped after 2 of its 6 steps; then
    the data folder moved to moved/, and other.npy, a file of the same shape with other values."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "train.npy", rng.integers(0, 256, (12, 4), dtype=np.uint8))
    np.save(data / "test.npy", rng.integers(0, 256, (5, 4), dtype=np.uint8))
    np.save(tmp_path / "other.npy", rng.integers(0, 256, (12, 4), dtype=np.uint8))
    out = tmp_path / "run"
    argv = ["--dataset", str(data / "train.npy"), "--test-data", str(data / "test.npy"), *SMALL, "--epochs", "2"]
    assert train.main([*argv, "--out", str(out), "--stop-after", "2"]) == 0
    shutil.move(data, tmp_path / "moved")
    return out


def test_resume_reads_a_moved_data_file_and_records_its_path(stopped_run, capsys):
    moved = stopped_run.parent / "moved"
    assert train.main(["--resume", str(stopped_run)]) == 2
    assert "the run's --dataset file" in (line := _one_error_line(capsys)) and "give its new path" in line
    relocated = ["--dataset", str(moved / "train.npy"), "--test-data", str(moved / "test.npy")]
    assert train.main(["--resume", str(stopped_run), *relocated]) == 0
    config = json.loads((stopped_run / "config.json").read_text())
    assert (config["dataset"], config["test_data"]) == (str(moved / "train.npy"), str(moved / "test.npy"))
    assert config["dataset_sha256"] == hashlib.sha256((moved / "train.npy").read_bytes()).hexdigest()
    assert evaluate.main([str(stopped_run), *EVAL]) == 0  # the run now names the new place


@pytest.mark.parametrize("flag", ["--dataset", "--test-data"])
def test_resume_refuses_another_file_naming_both_digests(stopped_run, capsys, flag):
    moved, other = stopped_run.parent / "moved", stopped_run.parent / "other.npy"
    paths = {"--dataset": moved / "train.npy", "--test-data": moved / "test.npy"}
    recorded = hashlib.sha256(paths[flag].read_bytes()).hexdigest()
    paths[flag] = other
    argv = [arg for flag_, path in paths.items() for arg in (flag_, str(path))]
    assert train.main(["--resume", str(stopped_run), *argv]) == 2
    line = _one_error_line(capsys)
    assert f"{flag} {other} has SHA-256 {hashlib.sha256(other.read_bytes()).hexdigest()}" in line
    assert f"had {recorded}" in line


def test_evaluate_reads_a_moved_data_file_and_refuses_another(stopped_run, capsys):
    moved, other = stopped_run.parent / "moved", stopped_run.parent / "other.npy"
    assert evaluate.main([str(stopped_run), *EVAL]) == 2
    assert "if it moved, give its new path with --dataset PATH" in _one_error_line(capsys)
    relocated = ["--dataset", str(moved / "train.npy"), "--test-data", str(moved / "test.npy")]
    assert evaluate.main([str(stopped_run), *relocated, *EVAL]) == 0
    results = json.loads((stopped_run / "eval.json").read_text())
    assert (results["dataset"], results["num_test"]) == (str(moved / "train.npy"), 5)
    assert evaluate.main([str(stopped_run), "--dataset", str(other), "--test-data", str(moved / "test.npy")]) == 2
    assert hashlib.sha256(other.read_bytes()).hexdigest() in _one_error_line(capsys)


def test_a_named_data_set_is_not_renamed_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--num-train", "16", "--num-test", "4", "--image-size", "8", *SMALL, "--epochs", "1"]
    assert train.main([*argv, "--out", str(out), "--stop-after", "1"]) == 0
    np.save(tmp_path / "x.npy", np.zeros((20, 64), np.uint8))
    assert train.main(["--resume", str(out), "--dataset", str(tmp_path / "x.npy")]) == 2
    assert f'--dataset "{tmp_path / "x.npy"}" differs from the run\'s "sprites"' in _one_error_line(capsys)


def test_data_files_refuses_what_it_cannot_check(tmp_path):
    """A new path for a run that recorded no SHA-256 (an older run), and a new path with no file there."""
    np.save(tmp_path / "x.npy", np.zeros((4, 2), np.uint8))
    old_run = {"dataset": str(tmp_path / "gone.npy"), "test_data": None}
    with pytest.raises(ConfigError, match=r"recorded no SHA-256 of its --dataset file .*gone\.npy"):
        rundir.data_files(old_run, {"dataset": str(tmp_path / "x.npy")}, "runs/a")
    run = {**old_run, "dataset_sha256": rundir.file_sha256(tmp_path / "x.npy")}
    with pytest.raises(ConfigError, match=r"^runs/a: --dataset .*nope\.npy: no such file$"):
        rundir.data_files(run, {"dataset": str(tmp_path / "nope.npy")}, "runs/a")
    assert rundir.data_files(run, {"dataset": str(tmp_path / "x.npy")}, "runs/a") == {
        "dataset": str(tmp_path / "x.npy"), "test_data": None
    }
