"""The benchmarks run end to end on tiny inputs and write the JSON that docs/benchmarks.md is made from.

These check that `bench/` works and that its design measurements say what docs/design.md claims; they
time nothing that is asserted.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from bench import elbo_head, report, train_throughput


@pytest.fixture(scope="module")
def throughput_json(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("bench") / "throughput.json"
    args = ["--num-train", "500", "--num-test", "256", "--batch", "64", "--epochs", "2",
            "--systems", "baseline", "reference", "--json", str(path)]
    train_throughput.main(args)
    return json.loads(path.read_text())


def test_train_throughput_reports_every_system(throughput_json):
    results = throughput_json["results"]
    assert [(r["system"], r["batch_size"]) for r in results] == [("baseline", 64), ("reference", 64)]
    for r in results:
        assert len(r["epoch_seconds"]) == 1  # 2 epochs, the first is the warm-up
        assert r["samples_per_s"] == pytest.approx(r["samples_per_epoch"] / r["median_epoch_s"])
        assert 0 < r["test_loss"] < 543.6  # below 784 * log 2: better than a coin per pixel
    baseline, reference = results
    assert baseline["samples_per_epoch"] == 500  # the DataLoader keeps the last partial batch
    assert reference["samples_per_epoch"] == 448  # the engine drops it: 7 full batches of 64
    assert throughput_json["environment"]["commit"]


def test_train_throughput_markdown(throughput_json):
    text = report.markdown(throughput_json)
    assert "| baseline | 64 | 1 |" in text and "| reference | 64 | 1 |" in text
    assert "×" in text.splitlines()[-1]  # the reference row has its speed-up against the baseline


def test_train_throughput_refuses_warmup_without_timed_epochs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_throughput.main(["--epochs", "1", "--warmup", "1"])
    assert exit_info.value.code == 2
    assert "--warmup must be in [0, --epochs), got 1 with --epochs 1" in capsys.readouterr().err


def test_elbo_head_design_measurements(tmp_path):
    """On tiny shapes, with the fused ops on the GPU (timed) or under the interpreter (not timed): the fused
    head saves less for backward, dispatches fewer ops and moves fewer bytes than the eager reference
    (docs/design.md's claims)."""
    path = tmp_path / "head.json"
    elbo_head.main(["--batch", "8", "--dim", "33", "--latent", "5", "--dtype", "fp32", "--dist", "bernoulli",
                    "--impl", "eager", "fused", "--reps", "2", "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["benchmark"] == "elbo_head"
    eager, fused = data["results"]
    assert (eager["impl"], fused["impl"]) == ("eager", "fused")
    assert math.isfinite(eager["fwd_bwd_ms"])
    if torch.cuda.is_available():
        assert math.isfinite(fused["fwd_bwd_ms"])
    else:
        assert fused["fwd_bwd_ms"] is None  # the interpreter is not timed
    assert fused["saved_bytes"] >= 8 * 33 * 4  # the loss's gradient stash, held on the graph, is counted
    assert fused["saved_bytes"] < eager["saved_bytes"]
    assert 0 < fused["ops_per_step"] < eager["ops_per_step"]
    assert 0 < fused["moved_bytes"] < eager["moved_bytes"]
    assert "| 8 | 33 | 5 | fp32 | bernoulli | fused |" in report.markdown(data)


def test_elbo_head_latent_diffusion_head(tmp_path, monkeypatch):
    """The --ldm head (feature-map latents, images, a per-channel log-scale), here at 1/8 of its sides so that
    the interpreter runs it quickly (`python -m bench.elbo_head --ldm` runs it at 4x64x64 and 3x512x512): the
    fused head takes the shaped inputs, its log-scale gets a gradient, and it is counted as the flat one is."""
    small = {"latent": (4, 8, 8), "data": (3, 64, 64), "log_scale": (3, 1, 1)}
    monkeypatch.setitem(elbo_head.HEADS, "ldm", small)
    path = tmp_path / "ldm.json"
    elbo_head.main(["--ldm", "--dtype", "bf16", "--impl", "eager", "fused", "--reps", "1", "--json", str(path)])
    data = json.loads(path.read_text())
    eager, fused = data["results"]
    (case,) = elbo_head.ldm_cases(["bf16"])
    assert eager["case"] == fused["case"] == asdict(case)
    assert (case.D, case.K, case.dist) == (math.prod(small["data"]), math.prod(small["latent"]), "gaussian")
    assert 0 < fused["ops_per_step"] < eager["ops_per_step"]
    assert 0 < fused["moved_bytes"] < eager["moved_bytes"]
    assert fused["saved_bytes"] < eager["saved_bytes"]
    t = elbo_head.make_inputs(case, torch.device("cpu"))
    grads = elbo_head.backward(t, *elbo_head.head("triton", "gaussian")(t))
    latent, data_shape = (case.B, *small["latent"]), (case.B, *small["data"])
    assert [g.shape for g in grads] == [latent, latent, data_shape, small["log_scale"]]
    assert f"| ldm | {case.B} | {case.D} | {case.K} | bf16 | gaussian | fused |" in report.markdown(data)


@pytest.mark.slow
def test_ddp_stress_counts_clean_exits(tmp_path, capsys):
    """One finished torchrun job, one Ctrl-C and one scheduler SIGTERM: each clean, with its exit codes."""
    from bench import ddp_stress

    path = tmp_path / "stress.json"
    assert ddp_stress.main(["--runs", "1", "--json", str(path)]) == 0
    jobs = json.loads(path.read_text())
    assert [(j["case"], j["clean"], j["rank_codes"]) for j in jobs] == [
        ("finished", True, [0, 0]),
        ("SIGINT", True, [130, 130]),
        ("SIGTERM", True, [143, 143]),
    ]
    assert "finished: 1 of 1 exited cleanly" in capsys.readouterr().out


@pytest.mark.slow
def test_host_overhead_counts_the_launches(tmp_path):
    """The host-overhead benchmark runs end to end (kernels compiled for sm_90a by the compile-only driver,
    launches no-ops) and counts what docs/design.md claims: the fused head is at most 5 launches per
    forward+backward, every one a Triton kernel, against tens of ops for the eager reference. Any GPU is
    hidden: with one, the benchmark would time real launches (bench.gpu_check's host_overhead step)."""
    path = tmp_path / "host.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, "-m", "bench.host_overhead", "--reps", "20", "--impls", "fused", "eager", "floor",
               "shaped", "--breakdown", "--json", str(path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(path.read_text())
    rows = {(r["name"], r["impl"]): r for r in data["results"]}
    assert set(rows) == {
        ("head", "fused"), ("head", "eager"), ("head", "floor"), ("head", "shaped"), ("head", "functions"),
        ("head", "no launches"),
        ("engine", "engine"), ("engine", "bare loop"),
    }  # fmt: skip
    # The breakdown: the Functions called directly launch the same 5 kernels; with launches skipped, none.
    assert rows["head", "functions"]["triton_launches"] == 5 and rows["head", "no launches"]["launches"] == 0
    fused, eager = rows["head", "fused"], rows["head", "eager"]
    assert fused["launches"] == fused["triton_launches"] == 5  # fwd: latent, likelihood, loss; bwd: 2
    shaped = rows["head", "shaped"]  # feature-map latents and images: views, so the same 5 and nothing else
    assert shaped["launches"] == shaped["triton_launches"] == 5
    assert eager["triton_launches"] == 0 and eager["launches"] > 10 * fused["launches"]
    assert rows["head", "floor"]["launches"] == 0  # allocations and a view only
    assert all(math.isfinite(r["host_us"]) and r["step_us"] > 0 for r in rows.values())
    assert rows["engine", "engine"]["triton_launches"] == rows["engine", "bare loop"]["triton_launches"] == 5
    assert data["environment"]["launches"].startswith("compile-only driver (sm_90a)")


def test_host_overhead_refuses_the_interpreter(monkeypatch):
    """Under the interpreter the kernels would run, not compile-and-skip: a clear refusal."""
    from bench import host_overhead

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit) as exit_info:
        host_overhead.main(["--reps", "1"])
    assert exit_info.value.code == 2


def test_other_benchmarks_render_as_one_column_per_key():
    """A results file without its own renderer (e.g. bench.host_overhead's) still renders as a table."""
    env = {"device": "cpu", "torch": "t", "triton": "tr", "commit": "c", "date": "d", "triton_interpret": "0"}
    data = {"benchmark": "host_overhead", "environment": env,
            "results": [{"step": "fused", "host_us": 12.345, "note": "a|b"}, {"step": "eager", "launches": 7}]}
    lines = report.markdown(data).splitlines()
    assert lines[0].startswith("Device: cpu;")
    assert lines[2:] == [
        "| step | host_us | note | launches |",
        "|---|---|---|---|",
        "| fused | 12.35 | a\\|b | – |",
        "| eager | – | – | 7 |",
    ]
