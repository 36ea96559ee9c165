"""`--cuda-graphs`: each training step one replay of a captured CUDA graph (fastvae/graphs.py).

Without CUDA these check the refusals and the seed source that graphed runs draw from. The `gpu` tests (the
GPU kit runs them) check that a graphed run is the eager run that draws the same seeds, that it resumes
exactly, that a non-finite step is caught and diagnosed, and that KL warm-up reaches the replays.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from run_helpers import TINY, assert_same_state, metrics_rows

import fastvae
from fastvae import functional, graphs, train
from fastvae.data import DeviceBatches, load_dataset
from fastvae.engine import EVAL_BATCH, Trainer
from fastvae.graphs import noise_base
from fastvae.ops import SampleLatent
from fastvae.options import ConfigError, build_model, build_parser, check_cuda_graphs, make_config

# ----------------------------------------------------------------------------------------- refusals


def test_cuda_graphs_without_cuda_is_one_error_line(tmp_path, capsys):
    code = train.main([*TINY, "--epochs", "1", "--cuda-graphs", "--device", "cpu", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err == "error: --cuda-graphs needs a CUDA device, and the device is cpu; leave it out on this machine\n"
    assert not (tmp_path / "r").exists()


def test_cuda_graphs_with_compile_is_refused(tmp_path, capsys):
    assert train.main([*TINY, "--cuda-graphs", "--compile", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith("error: --cuda-graphs and --compile exclude each other")


def test_cuda_graphs_under_torchrun_is_refused():
    args = build_parser().parse_args(["--cuda-graphs"])
    with pytest.raises(ConfigError, match="--cuda-graphs runs in one process, and torchrun started 2"):
        check_cuda_graphs(args, torch.device("cuda"), world_size=2)
    check_cuda_graphs(args, torch.device("cuda"), world_size=1)  # one process on CUDA: fine


# ----------------------------------------------------------------------------------- device seeds


def test_device_seeds_count_on_the_device_and_restart():
    seeds = functional.DeviceSeeds(torch.device("cpu"), 2**40)
    assert [int(seeds.draw()) for _ in range(3)] == [2**40, 2**40 + 1, 2**40 + 2]
    seeds.reset(7)
    assert int(seeds.draw()) == 2**40 + 7
    with pytest.raises(ValueError, match=r"`base` must be in \[2\^31, 2\^61\)"):
        functional.DeviceSeeds(torch.device("cpu"), 5)
    bases = {noise_base(seed, rank) for seed in range(3) for rank in range(3)}
    assert len(bases) == 9 and all(2**31 <= b < 2**61 for b in bases)


def test_a_seed_in_device_memory_draws_the_seed_passed_by_value(kernel_device):
    """The kernel reading its seed from memory (a graph replay) draws the noise of that seed passed by value,
    forward and backward."""
    g = torch.Generator().manual_seed(0)
    mu, logvar = (torch.randn(6, 5, generator=g).to(kernel_device).requires_grad_() for _ in range(2))
    results = []
    for seed in (2**40 + 3, torch.tensor([2**40 + 3], device=kernel_device)):
        z, kl = SampleLatent.apply(mu, logvar, seed, 1, False)
        results.append((z, kl, *torch.autograd.grad(z.sum() + kl.sum(), (mu, logvar))))
    for by_value, in_memory in zip(*results, strict=True):
        torch.testing.assert_close(in_memory, by_value, rtol=0, atol=0)


def test_within_device_seeds_the_sampler_draws_them_in_order(kernel_device):
    mu = torch.zeros(4, 3, device=kernel_device)
    seeds = functional.DeviceSeeds(kernel_device, 2**33)
    with functional.device_seeds(seeds):
        first, second = (fastvae.sample_latent(mu, mu, impl="triton")[0] for _ in range(2))
        seeds.reset(0)
        again = fastvae.sample_latent(mu, mu, impl="triton")[0]
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert not torch.equal(first, second)
    by_value = SampleLatent.apply(mu, mu, 2**33 + 1, 1, False)[0]
    torch.testing.assert_close(second, by_value, rtol=0, atol=0)
    assert int(seeds.counter) == 2**33 + 1  # the block is over: draws come from torch's generator again
    fastvae.sample_latent(mu, mu, impl="triton")
    assert int(seeds.counter) == 2**33 + 1


# ------------------------------------------------------- the engine's logic, with graphs replayed in Python


class PythonGraph:
    """A stand-in for a captured CUDA graph on a machine without CUDA: `replay()` runs the captured body."""

    def __init__(self, body) -> None:
        self.body, self.replays = body, 0

    def replay(self) -> None:
        self.replays += 1
        self.body()


@pytest.fixture
def python_graphs(monkeypatch) -> list[PythonGraph]:
    """--cuda-graphs on the CPU (the fused kernels under the interpreter), each capture a PythonGraph: the
    engine's side of the graphs (warm-up undone, seeds counted per step, beta refilled, the index buffer,
    the bookkeeping, re-capture after a restore) runs as it would on a GPU."""
    captured: list[PythonGraph] = []

    def capture(body, device):
        captured.append(PythonGraph(body))
        return captured[-1]

    monkeypatch.setattr(graphs, "capture", capture)
    monkeypatch.setattr(graphs, "side_stream", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(train, "check_cuda_graphs", lambda *args: None)
    return captured


CPU_RUN = [*TINY, "--likelihood", "bernoulli", "--epochs", "2", "--fused", "--device", "cpu", "--log-every", "2"]


@pytest.mark.parametrize("flags", [[], ["--kl-warmup", "5"], ["--iw-samples", "3"]], ids=["plain", "warmup", "iwae"])
def test_replayed_steps_are_the_eager_steps_with_the_same_seeds(python_graphs, tmp_path, flags):
    """Every step a replay (the warm-up undone), seed base + step, beta refilled while it warms up: the run
    equals an eager run that draws those seeds, bitwise."""
    graphed = _trainer([*CPU_RUN, "--cuda-graphs", *flags])
    eager = _trainer([*CPU_RUN, "--cuda-graphs", *flags])
    eager.graphed = None
    want, got = _steps(eager, graphed=False), _steps(graphed, graphed=True)
    assert len(python_graphs) == 1 and python_graphs[0].replays == graphed.step == 16
    assert got == want
    for a, b in zip(graphed.model.parameters(), eager.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_replayed_run_resumes_exactly(python_graphs, tmp_path):
    """Stopped mid-epoch and resumed: the resumed process captures anew (its warm-up undone) and ends where
    the uninterrupted run does, bitwise."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main([*CPU_RUN, "--cuda-graphs", "--kl-warmup", "6", "--out", str(whole)]) == 0
    assert train.main([*CPU_RUN, "--cuda-graphs", "--kl-warmup", "6", "--out", str(parts), "--stop-after", "5"]) == 0
    assert train.main(["--resume", str(parts)]) == 0
    assert len(python_graphs) == 3  # one capture per process
    assert metrics_rows(parts) == metrics_rows(whole)
    assert_same_state(parts, whole)


def test_the_flag_cannot_change_on_resume(python_graphs, tmp_path, capsys):
    """A graphed run draws its noise from other seeds than an eager one: switching is a different run."""
    out = tmp_path / "run"
    assert train.main([*CPU_RUN, "--out", str(out), "--stop-after", "3"]) == 0
    assert train.main(["--resume", str(out), "--cuda-graphs"]) == 2
    assert "--cuda-graphs true differs from the run's false" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ on a GPU

GPU_RUN = [*TINY, "--likelihood", "bernoulli", "--epochs", "2", "--fused"]


def _trainer(argv: list[str]) -> Trainer:
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


def _steps(trainer: Trainer, graphed: bool, epochs: int = 2) -> list[float]:
    """Train `epochs`; an eager trainer draws the graphed run's seeds (base + step, as GraphedSteps does).
    Returns each reading's mean loss."""
    seeds = functional.DeviceSeeds(trainer.device, noise_base(trainer.config["seed"], 0))
    losses = []
    for epoch in range(epochs):
        for indices in trainer.train.index_batches(epoch):
            if graphed:
                trainer.step_on(indices)
            else:
                seeds.reset(trainer.step)
                with functional.device_seeds(seeds):
                    trainer.train_step(trainer.train.gather(indices))
            if trainer.step % 4 == 0:
                losses.append(trainer.running.read(list(trainer.model.parameters()))["loss"])
    return losses


@pytest.mark.gpu
@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["--kl-warmup", "10"],
        ["--iw-samples", "3"],
        ["--amp", "bf16"],
        ["--likelihood", "gaussian", "--sigma", "learned"],
    ],
    ids=["plain", "kl-warmup", "iwae", "bf16", "learned-scale"],
)
def test_a_graphed_run_is_the_eager_run_that_draws_its_seeds(flags):
    """Same seeds, same batches, same kernels: the replays give the eager steps' statistics and parameters,
    to float tolerance (cuBLAS may choose other algorithms in a capture). KL warm-up changes beta across
    replays, or the runs would part."""
    eager, graphed = _trainer([*GPU_RUN, "--cuda-graphs", *flags]), _trainer([*GPU_RUN, "--cuda-graphs", *flags])
    eager.graphed = None  # the same optimizer settings, stepped eagerly
    want, got = _steps(eager, graphed=False), _steps(graphed, graphed=True)
    assert graphed.graphed is not None and graphed.graphed.graph is not None  # it did replay
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    for a, b in zip(graphed.model.parameters(), eager.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_a_graphed_run_resumes_exactly(tmp_path):
    """Stopped mid-epoch and resumed (a fresh capture after the resume, whose warm-up steps are undone), a
    graphed run ends where an uninterrupted one does: every step is a replay, and its seed is base + step."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main([*GPU_RUN, "--cuda-graphs", "--out", str(whole)]) == 0
    assert train.main([*GPU_RUN, "--cuda-graphs", "--out", str(parts), "--stop-after", "7"]) == 0
    assert train.main(["--resume", str(parts)]) == 0
    assert metrics_rows(parts) == metrics_rows(whole)
    assert_same_state(parts, whole)


@pytest.mark.gpu
def test_a_non_finite_graphed_step_is_caught_and_diagnosed(tmp_path, capsys):
    """A learning rate that blows the model up: the readings between replays see it, and the diagnosis
    re-runs the steps eagerly with the seeds they drew."""
    out = tmp_path / "run"
    assert train.main([*GPU_RUN, "--cuda-graphs", "--lr", "1e6", "--out", str(out)]) == train.EXIT_NONFINITE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: training diverged at step ")
    assert "went non-finite" in err or "non-finite gradients of" in err
