"""`--resume`: a run stopped at any step and resumed ends bitwise equal to one that never stopped."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from run_helpers import TINY, assert_same_state, metrics_rows

from fastvae import checkpoint, train

EPOCHS = ["--epochs", "3"]  # 24 steps
# The ops flag that a run started without one did not use: fused is the default on CUDA, the reference elsewhere.
OTHER_OPS = ((["--no-fused"], "--fused false differs from the run's true") if torch.cuda.is_available()
             else (["--fused"], "--fused true differs from the run's false"))  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train.main([*TINY, *EPOCHS, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(
    "stop_after",
    [
        5,  # mid-epoch, between two statistics readings (a window of 2 steps is pending)
        6,  # mid-epoch, right after a statistics reading
        8,  # the last step of epoch 1, before its evaluation
        17,  # the first step of epoch 3
    ],
)
def test_stop_and_resume_matches_the_uninterrupted_run(reference, tmp_path, capsys, stop_after):
    out = tmp_path / "run"
    assert train.main([*TINY, *EPOCHS, "--out", str(out), "--stop-after", str(stop_after)]) == 0
    printed = capsys.readouterr().out
    assert f"Resume with: python -m fastvae.train --resume {out}\n" in printed
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["step"] == stop_after
    assert (state["epoch"], state["position"]) == (divmod(stop_after, 8) if stop_after % 8 else (0, 8))
    assert train.main(["--resume", str(out)]) == 0
    assert metrics_rows(out) == metrics_rows(reference)
    assert_same_state(out, reference)
    assert f"python -m fastvae.evaluate {out}" in capsys.readouterr().out


def test_stopped_twice(reference, tmp_path):
    out = tmp_path / "run"
    assert train.main([*TINY, *EPOCHS, "--out", str(out), "--stop-after", "4"]) == 0
    assert train.main(["--resume", str(out), "--stop-after", "19"]) == 0
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 19
    assert train.main(["--resume", str(out)]) == 0
    assert metrics_rows(out) == metrics_rows(reference)
    assert_same_state(out, reference)
    assert [entry["step"] for entry in json.loads((out / "config.json").read_text())["resumed"]] == [4, 19]


def test_more_epochs_continue_a_finished_run(reference, tmp_path):
    out = tmp_path / "run"
    assert train.main([*TINY, "--epochs", "1", "--out", str(out)]) == 0
    assert train.main(["--resume", str(out), "--epochs", "3"]) == 0
    assert metrics_rows(out) == metrics_rows(reference)
    assert_same_state(out, reference)
    assert json.loads((out / "config.json").read_text())["epochs"] == 3


def test_resume_after_a_crash_from_a_periodic_checkpoint(reference, tmp_path, monkeypatch):
    """--checkpoint-every: the run dies after the step-10 checkpoint; metrics.jsonl has rows past it."""
    saved = []
    real_save = checkpoint.save

    def save(path, payload):
        real_save(path, payload)
        saved.append((payload["step"], payload["epoch"], payload["position"]))
        if payload["step"] == 10:
            shutil.copy(path, tmp_path / "step10.pt")

    monkeypatch.setattr(checkpoint, "save", save)
    out = tmp_path / "run"
    assert train.main([*TINY, "--epochs", "2", "--out", str(out), "--checkpoint-every", "5"]) == 0
    assert saved == [(5, 0, 5), (8, 1, 0), (10, 1, 2), (15, 1, 7), (16, 2, 0)]
    shutil.copy(tmp_path / "step10.pt", out / "checkpoint.pt")  # as if it had died after step 10 ...
    assert metrics_rows(out)[-1]["step"] == 16  # ... with rows after that checkpoint in metrics.jsonl
    assert train.main(["--resume", str(out), "--epochs", "3"]) == 0
    assert metrics_rows(out) == metrics_rows(reference)
    assert_same_state(out, reference)


def test_log_every_may_change_on_resume(reference, tmp_path):
    out = tmp_path / "run"
    assert train.main([*TINY, *EPOCHS, "--out", str(out), "--stop-after", "7"]) == 0
    assert train.main(["--resume", str(out), "--log-every", "4"]) == 0
    steps = [row["step"] for row in metrics_rows(out) if row["kind"] == "train"]
    assert steps == [3, 6, 8, 12, 16, 20, 24]  # every 3 steps up to the stop, then every 4 (and epoch ends)
    assert_same_state(out, reference)  # the parameters do not depend on when statistics are read


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--latent-dim", "8"], "--latent-dim 8 differs from the run's 3"),
        (["--seed", "1"], "--seed 1 differs from the run's 0"),
        (["--batch-size", "16"], "--batch-size 16 differs from the run's 32"),
        (["--likelihood", "bernoulli"], '--likelihood "bernoulli" differs from the run\'s "gaussian"'),
        (["--dataset", "mnist"], '--dataset "mnist" differs from the run\'s "sprites"'),
        (["--hidden", "64"], "--hidden [64] differs from the run's [32]"),
        (["--lr", "0.1"], "--lr 0.1 differs from the run's 0.003"),
        OTHER_OPS,
        (["--num-train", "128"], "--num-train 128 differs from the run's 256"),
        (["--eval-every", "4"], "--eval-every 4 differs from the run's 0"),
        (["--epochs", "2", "--stop-after", "2"], "--stop-after 2: the run is at step 8 already"),
    ],
)
def test_resume_refuses_changes_that_would_change_the_run(tmp_path_factory, capsys, args, message):
    out = tmp_path_factory.getbasetemp() / "one-epoch"
    if not out.exists():
        assert train.main([*TINY, "--epochs", "1", "--out", str(out)]) == 0
    before = (out / "checkpoint.pt").read_bytes(), (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert train.main(["--resume", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert message in err
    assert before == ((out / "checkpoint.pt").read_bytes(), (out / "metrics.jsonl").read_text())


def test_same_settings_given_again_are_accepted(tmp_path):
    out = tmp_path / "run"
    assert train.main([*TINY, "--epochs", "1", "--out", str(out)]) == 0
    assert train.main(["--resume", str(out), *TINY, "--epochs", "2"]) == 0
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 16


def test_the_ops_flag_given_again_with_the_value_the_run_used_is_accepted(tmp_path):
    """A run started without --fused/--no-fused used the reference ops on the CPU, the fused ones on CUDA: the
    flag that names those ops is no change."""
    out = tmp_path / "run"
    assert train.main([*TINY, "--epochs", "1", "--out", str(out)]) == 0
    used = "--fused" if torch.cuda.is_available() else "--no-fused"
    assert train.main(["--resume", str(out), used, "--epochs", "2"]) == 0


def test_resume_of_a_directory_without_checkpoint(tmp_path, capsys):
    assert train.main(["--resume", str(tmp_path)]) == 2
    assert f"{tmp_path / 'checkpoint.pt'} not found" in capsys.readouterr().err


def test_a_checkpoint_of_another_data_order_is_refused(tmp_path, capsys):
    """An epoch's order that this fastvae does not draw again (another torch's, or the GPU's that fastvae drew
    before the order was drawn on the CPU) is one error line: the run cannot continue exactly."""
    out = tmp_path / "run"
    assert train.main([*TINY, *EPOCHS, "--out", str(out), "--stop-after", "5"]) == 0
    state = checkpoint.load(out / "checkpoint.pt")
    checkpoint.save(out / "checkpoint.pt", {**state, "permutation": state["permutation"].flip(0)})
    capsys.readouterr()
    assert train.main(["--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {out / 'checkpoint.pt'}: the data order of epoch 0 differs from the checkpoint's")
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 5  # nothing was touched


@pytest.mark.gpu
@pytest.mark.parametrize("first, then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_run_resumes_on_another_kind_of_device(reference, tmp_path, first, then):
    """The data order of a seed is the same on every device, so a run stopped on one kind of device goes on
    on another (its values are not bitwise those of one that never moved: the devices' arithmetic differs)."""
    out = tmp_path / "run"
    assert train.main([*TINY, *EPOCHS, "--out", str(out), "--stop-after", "5", "--device", first]) == 0
    assert train.main(["--resume", str(out), "--device", then]) == 0
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["step"] == checkpoint.load(reference / "checkpoint.pt")["step"]
    assert [row["step"] for row in metrics_rows(out)] == [row["step"] for row in metrics_rows(reference)]
    assert state["config"]["device"] == then


def test_fused_sampler_resumes_exactly(tmp_path):
    """The Triton sampler's seed comes from torch's generator, whose state the checkpoint keeps."""
    args = ["--num-train", "96", "--num-test", "32", "--batch-size", "32", "--hidden", "16", "--latent-dim", "2"]
    args += ["--epochs", "2", "--fused", "--log-every", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train.main([*args, "--out", str(full)]) == 0
    assert train.main([*args, "--out", str(part), "--stop-after", "4"]) == 0
    assert train.main(["--resume", str(part)]) == 0
    assert metrics_rows(part) == metrics_rows(full)
    assert_same_state(part, full)
    assert torch.equal(checkpoint.load(part / "checkpoint.pt")["permutation"].sort().values, torch.arange(96))


def test_resume_needs_the_metrics_the_checkpoint_was_written_after(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([*TINY, *EPOCHS, "--out", str(out), "--stop-after", "7"]) == 0
    rows = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(rows[:1]) + "\n")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    del state["metrics_lines"], state["sha256"]  # a checkpoint without the copy of the rows
    torch.save(state, out / "checkpoint.pt")
    capsys.readouterr()
    assert train.main(["--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: {out / 'metrics.jsonl'} has 1 rows, fewer than the 2 the checkpoint was written after, and the "
        "checkpoint holds no copy of its rows"
    )
