"""Faults in the process: a second signal inside the checkpoint write, OS errors (full disk, read-only or
missing run directory, a file as --out's parent), too little free space, SIGTERM before training. Each
gives one `error:` line and its exit code, never a traceback (docs/training.md, "Exit codes")."""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
from run_helpers import TINY

from fastvae import checkpoint, engine, train

ARGS = [*TINY, "--epochs", "3"]  # 8 steps an epoch


class _SignallingFile(io.RawIOBase):
    """A file whose `calls`-th write first runs `hook` (from inside torch.save's C++ writer)."""

    def __init__(self, f, calls: int, hook) -> None:
        self.f, self.calls, self.hook = f, calls, hook

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.calls -= 1
        if self.calls == 0:
            self.hook()
        return self.f.write(data)


def _patch_save(monkeypatch, hook, calls: int = 3, nth_save: int = 1) -> None:
    """Run `hook` inside the `nth_save`-th torch.save of a checkpoint, at its `calls`-th write."""
    real = checkpoint.torch.save
    count = [0]

    def save(obj, f, *args, **kwargs):
        count[0] += 1
        if count[0] == nth_save:
            f = _SignallingFile(f, calls, hook)
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: "), err
    return err


def test_a_second_signal_inside_the_checkpoint_write_names_what_is_on_disk(tmp_path, capsys, monkeypatch):
    def signal_twice():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)

    real_step = engine.Trainer.train_step

    def step(self, x):
        real_step(self, x)
        if self.step == 11:
            os.kill(os.getpid(), signal.SIGINT)  # the first: stop after this step, with a checkpoint
            time.sleep(0.05)

    monkeypatch.setattr(engine.Trainer, "train_step", step)
    _patch_save(monkeypatch, signal_twice, nth_save=2)  # the second lands inside that checkpoint's write
    out = tmp_path / "run"
    assert train.main([*ARGS, "--out", str(out)]) == 130
    err = _one_error_line(capsys)
    on_disk = checkpoint.load(out / "checkpoint.pt")["step"]
    assert f"The last good checkpoint is {out / 'checkpoint.pt'} (step {on_disk})." in err
    assert f"Resume with: python -m fastvae.train --resume {out}" in err


def test_a_second_sigterm_after_the_rename_names_the_new_checkpoint(tmp_path, capsys, monkeypatch):
    real_step = engine.Trainer.train_step

    def step(self, x):
        real_step(self, x)
        if self.step == 11:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)

    real_fsync_dir = checkpoint._fsync_dir

    def fsync_dir(directory):  # after os.replace: the new checkpoint is in place
        if (directory / "checkpoint.pt").exists() and checkpoint.load(directory / "checkpoint.pt")["step"] == 11:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        real_fsync_dir(directory)

    monkeypatch.setattr(engine.Trainer, "train_step", step)
    monkeypatch.setattr(checkpoint, "_fsync_dir", fsync_dir)
    out = tmp_path / "run"
    assert train.main([*ARGS, "--out", str(out)]) == 143
    err = _one_error_line(capsys)
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 11
    assert f"The last good checkpoint is {out / 'checkpoint.pt'} (step 11)." in err


def _failing_writes(monkeypatch, code: int, nth_file: int, calls: int) -> None:
    """The `nth_file`-th checkpoint temp file that fastvae.checkpoint opens fails its `calls`-th write."""
    count = [0]

    class FailingFile(io.FileIO):
        left = calls

        def write(self, data):
            FailingFile.left -= 1
            if FailingFile.left == 0:
                raise OSError(code, os.strerror(code))
            return super().write(data)

    def fake_open(path, mode="r", *args, **kwargs):
        count[0] += Path(path).name.startswith(".checkpoint.pt")
        if count[0] == nth_file and Path(path).name.startswith(".checkpoint.pt"):
            return FailingFile(path, mode.replace("b", ""))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", fake_open, raising=False)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failed_checkpoint_write_is_one_line_with_the_last_good_checkpoint(tmp_path, capsys, monkeypatch, code):
    _failing_writes(monkeypatch, code, nth_file=2, calls=4)  # the epoch-2 checkpoint; epoch 1's is good
    out = tmp_path / "run"
    assert train.main([*ARGS, "--out", str(out)]) == 2
    err = _one_error_line(capsys)
    assert os.strerror(code) in err
    assert str(out / "checkpoint.pt") in err
    assert f"The last good checkpoint is {out / 'checkpoint.pt'} (step 8)." in err
    assert f"Resume with: python -m fastvae.train --resume {out}" in err
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 8
    assert [p.name for p in out.iterdir() if p.name.startswith(".checkpoint")] == []  # no temp file left


def test_a_run_directory_deleted_mid_run_is_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_step = engine.Trainer.train_step

    def step(self, x):
        real_step(self, x)
        if self.step == 10:
            shutil.rmtree(out)

    monkeypatch.setattr(engine.Trainer, "train_step", step)
    assert train.main([*ARGS, "--out", str(out)]) == 2
    err = _one_error_line(capsys)
    assert str(out) in err and os.strerror(errno.ENOENT) in err


def _no_data_load(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("the data were loaded before --out was checked")

    monkeypatch.setattr(train, "load_dataset", load)


def test_an_unwritable_out_is_found_before_the_data_load(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() == 0:  # root writes through permissions: make the file system refuse instead
        real_open = os.open

        def refusing_open(path, flags, *args, **kwargs):
            if str(path).startswith(str(out)) and flags & os.O_CREAT:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", refusing_open)
        reason = os.strerror(errno.EROFS)
    else:
        out.chmod(0o500)
        reason = os.strerror(errno.EACCES)
    _no_data_load(monkeypatch)
    try:
        assert train.main([*ARGS, "--out", str(out / "run")]) == 2
    finally:
        out.chmod(0o700)
    err = _one_error_line(capsys)
    assert str(out) in err and reason in err


def test_an_out_whose_parent_is_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    parent = tmp_path / "file"
    parent.write_text("not a directory")
    _no_data_load(monkeypatch)
    assert train.main([*ARGS, "--out", str(parent / "run")]) == 2
    err = _one_error_line(capsys)
    assert str(parent) in err and os.strerror(errno.ENOTDIR) in err


def test_too_little_free_space_for_a_checkpoint_is_found_before_training(tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    out = tmp_path / "run"
    assert train.main([*ARGS, "--out", str(out)]) == 2
    err = _one_error_line(capsys)
    assert "free" in err and str(out) in err
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()


SIGTERM_AT_DATA_LOAD = """
import os, signal, sys, time
from fastvae import train
def load(*args, **kwargs):
    os.kill(os.getpid(), signal.{name})
    time.sleep(5)
train.load_dataset = load
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("name", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_while_the_data_load_is_one_line(tmp_path, name, code):
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_AT_DATA_LOAD.format(name=name), *ARGS, "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: interrupted by {name} before training")


HANG_RANK_1 = """
import os, signal, sys
from fastvae import engine, train
real_step = engine.Trainer.train_step
def step(self, x):
    real_step(self, x)
    if self.step == 4 and self.ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # hung: alive, but no longer answering
engine.Trainer.train_step = step
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_hung_rank_is_named_after_the_dist_timeout(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANG_RANK_1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    args = [*TINY, "--epochs", "1", "--log-every", "1", "--dist-timeout", "3", "--out", str(tmp_path / "run")]
    proc = subprocess.run(
        [*launcher, str(script), *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 0: rank 1 stopped answering (a collective failed or waited longer than "
                      "--dist-timeout 3 s)"], proc.stderr  # fmt: skip
    assert "[rank0]: Traceback" not in proc.stderr, proc.stderr  # (torchrun's own report of the exit follows)
