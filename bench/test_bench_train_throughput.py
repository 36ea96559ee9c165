"""One training epoch of each system of `bench.train_throughput` through pytest-benchmark.

    pytest bench/ --benchmark-only

Small data on the CPU (2048 sprites), the full 60k on a GPU; batch 128.
"""

from __future__ import annotations

import pytest
import torch

from bench import baseline_vae_example as example
from bench.train_throughput import CPU_SYSTEMS, CUDA_SYSTEMS, baseline, engine, engine_epoch
from fastvae.data import load_dataset
from fastvae.engine import synchronize

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SPLITS = load_dataset("sprites", num_train=60_000 if CUDA else 2048, num_test=1000)
BATCH = 128


@pytest.mark.parametrize("system", CUDA_SYSTEMS if CUDA else CPU_SYSTEMS)
def test_training_epoch(benchmark, system):
    if system == "baseline":
        model, optimizer, data = baseline(SPLITS, BATCH, DEVICE)
    else:
        trainer = engine(system, SPLITS, BATCH, DEVICE)

    def synchronized_epoch():
        if system == "baseline":
            example.train_epoch(model, data, optimizer, DEVICE)
        else:
            engine_epoch(trainer, 0)
        synchronize(DEVICE)

    benchmark.pedantic(synchronized_epoch, rounds=3, warmup_rounds=1)
    if system != "baseline":
        assert trainer.history and all(torch.isfinite(torch.tensor(r["loss"])) for r in trainer.history)
