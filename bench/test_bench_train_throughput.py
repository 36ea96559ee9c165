"""One training epoch of each system of `bench.train_throughput` through pytest-benchmark.

    pytest bench/ --benchmark-only

Small data on the CPU (2048 sprites), the full 60k on a GPU; batch 128.
"""

from __future__ import annotations

import pytest
import torch

from bench import baseline_vae_example as example
from bench.train_throughput import CPU_SYSTEMS, CUDA_SYSTEMS, engine
from fastvae.data import load_dataset

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SPLITS = load_dataset("sprites", num_train=60_000 if CUDA else 2048, num_test=1000)
BATCH = 128


def _synchronized(fn):
    def run():
        fn()
        if CUDA:
            torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("system", CUDA_SYSTEMS if CUDA else CPU_SYSTEMS)
def test_training_epoch(benchmark, system):
    if system == "baseline":
        torch.manual_seed(0)
        model = example.ExampleVAE().to(DEVICE)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        data = example.loader(SPLITS.train, BATCH, device=DEVICE, shuffle=True)
        epoch = _synchronized(lambda: example.train_epoch(model, data, optimizer, DEVICE))
    else:
        if "compile" in system:
            torch._dynamo.reset()
        trainer = engine(system, SPLITS, BATCH, DEVICE)

        def run_epoch():
            for x in trainer.train.epoch(0):
                trainer.train_step(x)
            trainer.log_train(0)

        epoch = _synchronized(run_epoch)
    benchmark.pedantic(epoch, rounds=3, warmup_rounds=1)
    if system != "baseline":
        assert trainer.history and all(torch.isfinite(torch.tensor(r["loss"])) for r in trainer.history)
