"""`--cuda-graphs`: each training step one replay of a captured CUDA graph (fastvae/graphs.py).

Without CUDA these check the refusals and the seed source that graphed runs draw from. The `gpu` tests (the
GPU kit runs them) check that a graphed run is the eager run that draws the same seeds, that it resumes
exactly, that a non-finite step is caught and diagnosed, and that KL warm-up reaches the replays.
"""

from __future__ import annotations

import graph_standin
import pytest
import torch
from run_helpers import TINY, assert_same_state, build_trainer, metrics_rows

import fastvae
from fastvae import functional, graphs, train
from fastvae.engine import Trainer
from fastvae.graphs import noise_base
from fastvae.ops import SampleLatent
from fastvae.options import ConfigError, build_parser, check_cuda_graphs

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


# ------------------------------------------- the engine's graphs on the CPU, captured and replayed by a stand-in

# The stand-in runs the fused kernels under the interpreter on CPU tensors; where there is CUDA the `gpu` tests
# below run the same runs with real graphs.
on_the_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU stand-in; the gpu tests run on CUDA")


@pytest.fixture
def standin(monkeypatch) -> graph_standin.StandIn:
    """--cuda-graphs on the CPU (the fused kernels under the interpreter), with `torch.cuda.CUDAGraph` the
    stand-in of tests/graph_standin.py: a capture runs the step's Python once and records its device work, a
    replay re-runs only that work on the same tensors."""
    monkeypatch.setattr(train, "check_cuda_graphs", lambda *args: None)
    return graph_standin.install(monkeypatch)


CPU_RUN = [*TINY, "--likelihood", "bernoulli", "--epochs", "2", "--fused", "--device", "cpu", "--log-every", "2"]


@on_the_cpu_only
def test_the_standin_replays_device_work_and_no_python(standin):
    """The stand-in itself: a capture runs the body's Python once and leaves memory as it was (its own
    outputs unwritten); a replay
    repeats the recorded ops on the same tensors (an allocated output gets the new value, in-place ops mutate
    again) and none of the Python; a host synchronisation inside a capture is refused."""
    a, calls = torch.ones(3), []

    def body():
        calls.append(1)
        b = a * 2  # allocated at capture: each replay writes into this same tensor
        a.add_(b)

    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    b = g.work[0].out
    assert calls == [1] and a.tolist() == [1.0] * 3  # captured, not run
    assert b.isnan().all()  # a capture's outputs are unwritten until a replay
    g.replay()
    g.replay()
    assert calls == [1] and b.tolist() == [6.0] * 3 and a.tolist() == [9.0] * 3
    with pytest.raises(graph_standin.CaptureError, match="host synchronisation"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            float(a.sum())


@on_the_cpu_only
def test_adam_state_exists_before_the_capture(standin, tmp_path):
    """The captured step must find Adam's state, with the values the eager run has at that step: Adam's lazy
    initialisation, captured, zeroes the moments and the step count on every replay (each update about
    lr * sign(g)). A fresh run (step 0) and a resumed one (step 5) alike."""
    seen = []
    real_capture = graphs.capture

    def capture(body, device):
        optimizer = trainer.optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        states = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in params]
        seen.append({"step": trainer.step, "states": states})
        return real_capture(body, device)

    graphs.capture = capture
    try:
        trainer = build_trainer([*CPU_RUN, "--cuda-graphs"])
        _steps(trainer, graphed=True, epochs=1)
        trainer.restore(trainer.capture(0, 5))  # a resume: the next step captures again, at step 8
        _steps(trainer, graphed=True, epochs=1)
    finally:
        graphs.capture = real_capture
    assert [s["step"] for s in seen] == [0, 8]
    for capture_ in seen:
        assert all(state for state in capture_["states"])  # every parameter has its state
        for state in capture_["states"]:
            assert state["step"].item() == capture_["step"] and state["step"].device == torch.device("cpu")
    assert all(not s["exp_avg"].any() and not s["exp_avg_sq"].any() for s in seen[0]["states"])
    assert all(s["exp_avg_sq"].any() for s in seen[1]["states"])


# Adam's settings: the default, amsgrad, and on CUDA the engine's (fused, capturable: `step` on the device).
ADAM_SETTINGS = [{}, {"amsgrad": True}] + ([{"fused": True, "capturable": True}] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("settings", ADAM_SETTINGS, ids=lambda settings: "-".join(settings) or "default")
def test_init_adam_state_is_what_a_first_step_makes(settings, kernel_device):
    """`graphs.init_adam_state` before the steps gives the lazily initialised run's state and parameters,
    bitwise, with the same dtypes and devices."""

    def run(init: bool) -> tuple[torch.nn.Module, torch.optim.Adam]:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3).to(kernel_device)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1, **settings)
        if init:
            graphs.init_adam_state(optimizer)
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.ones(2, 4, device=kernel_device)).square().sum().backward()
            optimizer.step()
        return model, optimizer

    (lazy_model, lazy), (model, explicit) = run(False), run(True)
    for want_p, got_p in zip(lazy_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got_p, want_p, rtol=0, atol=0)
        want, got = lazy.state[want_p], explicit.state[got_p]
        assert got.keys() == want.keys()
        for key in want:
            assert (got[key].dtype, got[key].device) == (want[key].dtype, want[key].device)
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


@on_the_cpu_only
@pytest.mark.parametrize("flags", [[], ["--kl-warmup", "5"], ["--iw-samples", "3"]], ids=["plain", "warmup", "iwae"])
def test_replayed_steps_are_the_eager_steps_with_the_same_seeds(standin, flags):
    """Every step a replay of the one captured step (the warm-up undone), seed base + step, beta refilled
    while it warms up: the run equals an eager run that draws those seeds, bitwise."""
    graphed = build_trainer([*CPU_RUN, "--cuda-graphs", *flags])
    eager = build_trainer([*CPU_RUN, "--cuda-graphs", *flags])
    eager.graphed = None
    want, got = _steps(eager, graphed=False), _steps(graphed, graphed=True)
    assert len(standin.graphs) == 1 and standin.graphs[0].replays == graphed.step == 16
    launches = standin.graphs[0].launches()  # the fused sampler's forward and backward around the loss's
    assert launches[0] == "_latent_fwd_kernel" and launches[-1] == "_latent_bwd_kernel" and len(launches) >= 4
    assert got == want
    for a, b in zip(graphed.model.parameters(), eager.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@on_the_cpu_only
def test_a_replayed_run_resumes_exactly(standin, tmp_path):
    """Stopped mid-epoch and resumed: the resumed process captures anew (its warm-up undone) and ends where
    the uninterrupted run does, bitwise."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main([*CPU_RUN, "--cuda-graphs", "--kl-warmup", "6", "--out", str(whole)]) == 0
    assert train.main([*CPU_RUN, "--cuda-graphs", "--kl-warmup", "6", "--out", str(parts), "--stop-after", "5"]) == 0
    assert train.main(["--resume", str(parts)]) == 0
    assert len(standin.graphs) == 3  # one capture per process
    assert metrics_rows(parts) == metrics_rows(whole)
    assert_same_state(parts, whole)


@on_the_cpu_only
def test_the_flag_cannot_change_on_resume(standin, tmp_path, capsys):
    """A graphed run draws its noise from other seeds than an eager one: switching is a different run."""
    out = tmp_path / "run"
    assert train.main([*CPU_RUN, "--out", str(out), "--stop-after", "3"]) == 0
    assert train.main(["--resume", str(out), "--cuda-graphs"]) == 2
    assert "--cuda-graphs true differs from the run's false" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ on a GPU

GPU_RUN = [*TINY, "--likelihood", "bernoulli", "--epochs", "2", "--fused"]


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
    eager, graphed = (build_trainer([*GPU_RUN, "--cuda-graphs", *flags]) for _ in range(2))
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
