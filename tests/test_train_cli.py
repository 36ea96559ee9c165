"""`python -m fastvae.train` and `python -m fastvae.evaluate` end to end, on tiny data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastvae import evaluate, options, train

TINY = ["--num-train", "512", "--num-test", "128", "--batch-size", "32", "--hidden", "64", "--latent-dim", "4"]
STATS = ("loss", "elbo", "kl", "log_px")


def run_module(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One CLI training run on tiny sprites: 3 epochs of 16 steps, statistics every 4 steps."""
    out = tmp_path_factory.mktemp("run") / "sprites-tiny"
    args = [*TINY, "--likelihood", "bernoulli", "--epochs", "3", "--log-every", "4", "--lr", "3e-3", "--out", str(out)]
    result = run_module("fastvae.train", *args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"python -m fastvae.evaluate {out}" in result.stdout  # unbroken, to copy and paste
    return out


def test_run_writes_every_artefact(run_dir):
    pictures = ("samples.png", "reconstructions.png", "interpolations.png", "loss.png")
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", *pictures):
        assert (run_dir / name).stat().st_size > 0, name
    assert not (run_dir / "manifold.png").exists()  # latent dim 4, not 2
    for name in pictures:  # 28 x 28 sprites, enlarged to a readable size (tests/test_pictures.py)
        with Image.open(run_dir / name) as image:
            assert min(image.size) >= 200 and max(image.size) >= 400, name
    with Image.open(run_dir / "loss.png") as image:
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 2  # drawn, not blank


def test_config_records_every_setting_and_the_versions(run_dir):
    config = json.loads((run_dir / "config.json").read_text())
    parser_settings = {action.dest for action in options.build_parser()._actions if action.dest != "help"}
    assert parser_settings <= set(config)
    assert config["likelihood"] == "bernoulli" and config["hidden"] == [64] and config["num_train"] == 512
    assert config["data_shape"] == [1, 28, 28]
    assert set(config["versions"]) == {"torch", "triton", "fastvae"}
    assert config["versions"]["torch"] == torch.__version__


def test_metrics_rows_and_the_loss_goes_down(run_dir):
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if r["kind"] == "train"]
    eval_rows = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train_rows] == list(range(4, 49, 4))  # every --log-every steps
    assert [(r["step"], r["epoch"]) for r in eval_rows] == [(16, 0), (32, 1), (48, 2)]  # each epoch end
    for row in train_rows:
        assert all(np.isfinite(row[key]) for key in (*STATS, "samples_per_s", "wall_time_s"))
        assert row["samples_per_s"] > 0
        assert row["loss"] == pytest.approx(-row["elbo"], rel=1e-6)  # beta = 1, one sample
        assert row["elbo"] == pytest.approx(row["log_px"] - row["kl"], rel=1e-6)
    for row in eval_rows:
        assert row["test_elbo"] == pytest.approx(row["test_log_px"] - row["test_kl"], rel=1e-6)
    assert train_rows[-1]["loss"] < 0.8 * train_rows[0]["loss"]
    assert eval_rows[-1]["test_elbo"] > eval_rows[0]["test_elbo"]
    times = [r["wall_time_s"] for r in rows]
    assert times == sorted(times)


def test_checkpoint_holds_the_trained_model(run_dir):
    checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    config = json.loads((run_dir / "config.json").read_text())
    model = options.build_model(config)
    model.load_state_dict(checkpoint["model"])
    assert checkpoint["step"] == 48


def test_evaluate_reports_elbo_and_iwae_bound(run_dir, capsys):
    code = evaluate.main([str(run_dir), "--iw-samples", "50", "--num-test", "64", "--chunk", "25"])
    assert code == 0
    results = json.loads((run_dir / "eval.json").read_text())
    assert results["num_test"] == 64 and results["iw_samples"] == 50 and results["units"] == "nats per sample"
    elbo, iwae = results["test_elbo"], results["iwae"]
    assert elbo["se"] > 0 and iwae["se"] > 0
    assert iwae["mean"] > elbo["mean"] - 3 * elbo["se"]  # IWAE_50 >= ELBO, in expectation
    assert iwae["mean"] < 0  # log p(x) of Bernoulli data
    last_eval = [r for r in read_metrics(run_dir) if r["kind"] == "eval"][-1]
    assert elbo["mean"] == pytest.approx(last_eval["test_elbo"], abs=6 * elbo["se"] + 1.0)
    out = capsys.readouterr().out
    assert "IWAE_50" in out and "eval.json" in out


def test_evaluate_on_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert evaluate.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    expected = f"error: {tmp_path / 'checkpoint.pt'} not found: {tmp_path} is not a fastvae run directory"
    assert err.startswith(expected) and err.count("\n") == 1


def test_missing_mnist_files_give_one_clear_line(tmp_path):
    args = ["--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")]
    result = run_module("fastvae.train", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ")
    assert str(tmp_path / "MNIST" / "raw") in result.stderr and "--download" in result.stderr


def test_fused_without_cuda_or_interpreter_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    result = run_module("fastvae.train", "--fused", "--out", str(tmp_path / "r"), env={"TRITON_INTERPRET": "0"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--fused needs a CUDA device" in result.stderr and "TRITON_INTERPRET=1" in result.stderr


def test_user_vectors_train_and_skip_the_image_pictures(tmp_path, capsys):
    """A .npy of float vectors: trains, draws loss.png, and says why there are no image grids."""
    rng = np.random.default_rng(0)
    path = tmp_path / "vectors.npy"
    np.save(path, rng.uniform(size=(300, 10)).astype(np.float32))
    out = tmp_path / "run"
    args = ["--dataset", str(path), "--batch-size", "50", "--epochs", "2", "--hidden", "16", "--latent-dim", "2"]
    assert train.main([*args, "--sigma", "learned", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["data_shape"] == [10] and config["num_train"] + config["num_test"] == 300
    assert (out / "loss.png").exists() and not (out / "samples.png").exists()
    assert "not images" in capsys.readouterr().out


def test_fused_cli_run_under_the_interpreter(tmp_path):
    """--fused trains through the Triton kernels (TRITON_INTERPRET=1 here when there is no GPU)."""
    out = tmp_path / "fused"
    args = ["--num-train", "64", "--num-test", "32", "--batch-size", "32", "--hidden", "16", "--latent-dim", "4"]
    assert train.main([*args, "--epochs", "1", "--fused", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["fused"] and config["impl"] == "triton"
    rows = read_metrics(out)
    assert rows[-1]["kind"] == "eval" and np.isfinite(rows[-1]["test_elbo"])
