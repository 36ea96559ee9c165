"""SIGINT / SIGTERM: finish the step, checkpoint, print the resume command, exit 130 / 143; resuming then
ends exactly where an uninterrupted run ends. A second signal leaves at once, the last checkpoint intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from run_helpers import TINY, assert_same_state, metrics_rows

from fastvae import checkpoint, engine, train

ARGS = [*TINY, "--epochs", "8", "--log-every", "1"]  # 64 steps, a row each


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train.main([*ARGS, "--out", str(out)]) == 0
    return out


def wait_for_rows(proc: subprocess.Popen, path, rows: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if path.exists() and len(path.read_text().splitlines()) >= rows:
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail("training did not start")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_checkpoints_and_resume_finishes_the_same_run(reference, tmp_path, capsys, signum, code):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastvae.train", *ARGS, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "60"},  # narrow: the resume command must still come out whole
    )
    wait_for_rows(proc, out / "metrics.jsonl", 5)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    step = checkpoint.load(out / "checkpoint.pt")["step"]
    assert 5 <= step < 64
    name = signal.Signals(signum).name
    assert f"Interrupted by {name} after step {step}; checkpoint written to {out / 'checkpoint.pt'}." in stdout
    assert f"Resume with: python -m fastvae.train --resume {out}\n" in stdout
    assert metrics_rows(out)[-1]["step"] == step  # metrics.jsonl is complete up to the checkpoint
    assert train.main(["--resume", str(out)]) == 0
    assert metrics_rows(out) == metrics_rows(reference)
    assert_same_state(out, reference)


def test_a_second_sigint_leaves_at_once_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    real_step = engine.Trainer.train_step

    def step_then_signal_twice(self, x):
        real_step(self, x)
        if self.step == 11:
            os.kill(os.getpid(), signal.SIGINT)  # the first asks to stop after this step ...
            os.kill(os.getpid(), signal.SIGINT)  # ... the second leaves before it is saved
            time.sleep(0.1)  # (the handlers run between bytecodes; give them the chance here)

    monkeypatch.setattr(engine.Trainer, "train_step", step_then_signal_twice)
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)
    assert train.main([*TINY, "--epochs", "3", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: stopped at once by a second SIGINT, without saving.")
    assert f"The last good checkpoint is {out / 'checkpoint.pt'} (step 8)." in err
    assert f"Resume with: python -m fastvae.train --resume {out}" in err
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 8  # the epoch-end one, intact
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back
