"""Shared by the reliability tests: tiny training runs and comparisons of their results."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from fastvae import checkpoint
from fastvae.data import DeviceBatches, load_dataset
from fastvae.engine import EVAL_BATCH, Trainer
from fastvae.options import build_model, build_parser, make_config

# 256 training sprites of 8x8 pixels in batches of 32: 8 steps per epoch; statistics every 3 steps (so not
# on epoch ends).
TINY = [
    "--num-train", "256", "--num-test", "64", "--image-size", "8", "--batch-size", "32", "--hidden", "32",
    "--latent-dim", "3", "--log-every", "3", "--lr", "3e-3",
]  # fmt: skip
TIMING = ("wall_time_s", "samples_per_s")


def metrics_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing fields."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def assert_same_state(a: Path, b: Path) -> None:
    """Two runs' checkpoints hold bitwise-equal parameters and optimizer moments, at the same step."""
    first, second = checkpoint.load(a / "checkpoint.pt"), checkpoint.load(b / "checkpoint.pt")
    assert first["step"] == second["step"]
    assert first["model"].keys() == second["model"].keys()
    for name, value in first["model"].items():
        assert torch.equal(value, second["model"][name]), name
    for index, moments in first["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, second["optimizer"]["state"][index][key]), (index, key)
    assert torch.equal(first["rng"]["torch"], second["rng"]["torch"])


def build_trainer(argv: list[str]) -> Trainer:
    """The engine as `python -m fastvae.train ARGV` builds it (TINY data), writing statistics nowhere."""
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or "cuda")
    splits = load_dataset("sprites", num_train=256, num_test=64, image_size=8)
    config = make_config(args, device, splits)
    torch.manual_seed(config["seed"])
    model = build_model(config).to(device)
    train_batches = DeviceBatches(splits.train, config["batch_size"], device=device, seed=config["seed"])
    test_batches = DeviceBatches(splits.test, EVAL_BATCH, device=device, seed=0, drop_last=False)
    return Trainer(config, model, train_batches, test_batches, io.StringIO(), device)
