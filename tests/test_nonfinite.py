"""The non-finite guard: a device-side flag read at each statistics reading, then a diagnosis by re-running."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from run_helpers import TINY, metrics_rows

from fastvae import checkpoint, engine, functional, train


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: training diverged at step ") and "Traceback" not in err
    return err


def test_a_huge_learning_rate_stops_with_a_diagnosis(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([*TINY, "--lr", "1e6", "--epochs", "2", "--out", str(out)]) == train.EXIT_NONFINITE
    err = error_line(capsys)
    assert "log-likelihood went non-finite" in err
    assert "non-finite gradients of decoder.0" in err and "encoder.0" in err
    logvar = float(err.split("Largest |logvar| ")[1].split(",")[0])
    assert logvar > 1e6  # the encoder's log-variance blew up
    assert "learning rate 1e+06" in err and "Try a lower --lr (now 1e+06)." in err
    assert "No checkpoint was written." in err
    assert not (out / "checkpoint.pt").exists()
    assert metrics_rows(out) == []  # the first reading (step 3) already saw the flag


class InfGrad(torch.autograd.Function):
    """The identity, whose gradient is NaN (0 * inf): poisons the gradients of one tensor only."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def poison_step(monkeypatch, bad_step: int, what: str) -> None:
    """Make optimizer step `bad_step` (1-based) produce a non-finite KL or decoder gradient, also when re-run."""
    make = engine.Trainer._make_loss_step

    def make_poisoned(self):
        loss_step = make(self)

        def poisoned(x, beta):
            out = loss_step(x, beta)
            if self.step + 1 != bad_step:
                return out
            if what == "kl":
                kl = out.kl * math.inf
                return out._replace(kl=kl, loss=out.loss + kl)
            bias = self.model.decoder[-1].bias
            return out._replace(loss=out.loss + 0 * InfGrad.apply(bias).sum())

        return poisoned

    monkeypatch.setattr(engine.Trainer, "_make_loss_step", make_poisoned)


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("kl", "at step 13: the KL went non-finite. Largest |logvar|"),
        ("grad", "at step 13: non-finite gradients of decoder.2. Largest |logvar|"),
    ],
)
def test_the_step_and_the_term_are_found_and_no_bad_checkpoint_is_written(
    tmp_path, capsys, monkeypatch, what, message
):
    """Step 13 goes bad; the flag is read at step 15; steps 13..15 are re-run from the state at step 12."""
    poison_step(monkeypatch, 13, what)
    out = tmp_path / "run"
    args = [*TINY, "--epochs", "3", "--out", str(out), "--amp", "bf16", "--checkpoint-every", "4"]
    assert train.main(args) == train.EXIT_NONFINITE
    err = error_line(capsys)
    assert err.startswith("error: training diverged at step 13: ") and message in err
    assert "learning rate 0.003" in err
    assert f"The last good checkpoint is {out / 'checkpoint.pt'} (step 12)." in err
    assert "Try a lower --lr (now 0.003) or --amp off." in err
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["step"] == 12 and all(v.isfinite().all() for v in state["model"].values())
    assert [row["step"] for row in metrics_rows(out) if row["kind"] == "train"] == [3, 6, 8, 9, 12]


def test_a_non_finite_state_is_never_checkpointed(tmp_path, capsys, monkeypatch):
    """A flag raised since the last reading stops a checkpoint (here at --stop-after) too."""
    poison_step(monkeypatch, 5, "kl")
    out = tmp_path / "run"
    assert train.main([*TINY, "--epochs", "1", "--out", str(out), "--stop-after", "5"]) == train.EXIT_NONFINITE
    assert "at step 5: the KL went non-finite" in error_line(capsys)
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("ops", ["--no-fused", "--fused"])
def test_the_guard_costs_no_host_sync_in_the_step(tmp_path, monkeypatch, ops):
    """fastvae's code never reads a tensor's value on the host (item, tolist, bool, ...) inside a step, but
    for the fused sampler's seed: an int drawn from torch's CPU generator (`functional._draw_seed`), host
    work on any machine, which waits for no device.

    (Adam's CPU path reads its step counter, a CPU tensor, which is not a device sync.)"""
    in_step, reads = [False], []
    real_step = engine.Trainer.train_step
    seed_draw = functional._draw_seed.__code__

    def step(self, x):
        in_step[0] = True
        try:
            real_step(self, x)
        finally:
            in_step[0] = False

    def spy(name):
        real = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if in_step[0] and f"fastvae{os.sep}" in caller.co_filename and caller is not seed_draw:
                reads.append((name, caller.co_filename, caller.co_name))
            return real(self, *args, **kwargs)

        return method

    for name in ("item", "tolist", "__bool__", "__float__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    monkeypatch.setattr(engine.Trainer, "train_step", step)
    assert train.main([*TINY, "--epochs", "1", ops, "--out", str(tmp_path / "r")]) == 0
    assert reads == []
