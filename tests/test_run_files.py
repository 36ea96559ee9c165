"""The files of a run under faults: damaged checkpoints, a second process, metrics.jsonl, temp files."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from run_helpers import TINY

from fastvae import checkpoint, rundir, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("files") / "run"
    assert train.main([*TINY, "--epochs", "2", "--out", str(out)]) == 0
    return out


def copy_run(run_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    return out


def weight_range(path):
    """The byte offset and size of the largest tensor's data inside the checkpoint's zip."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    header = path.read_bytes()[info.header_offset : info.header_offset + 30]
    names = int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + names, info.file_size


def damage(path, how):
    data = bytearray(path.read_bytes())
    start, size = weight_range(path)
    if how == "zeroed":
        data[start : start + min(size, 65536)] = bytes(min(size, 65536))
    else:
        data[start + 8 : start + 16] = bytes(b ^ 0xFF for b in data[start + 8 : start + 16])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["zeroed", "flipped"])
def test_a_damaged_checkpoint_is_refused_and_the_previous_one_named(run_dir, tmp_path, capsys, how):
    out = copy_run(run_dir, tmp_path)
    assert (out / "checkpoint.prev.pt").is_file()
    damage(out / "checkpoint.pt", how)
    assert train.main(["--resume", str(out), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "is damaged" in err and "--from-previous" in err


def test_from_previous_resumes_from_the_previous_checkpoint(run_dir, tmp_path, capsys):
    out = copy_run(run_dir, tmp_path)
    prev = torch.load(out / "checkpoint.prev.pt", weights_only=True)
    damage(out / "checkpoint.pt", "zeroed")
    assert train.main(["--resume", str(out), "--from-previous", "--stop-after", str(prev["step"] + 1)]) == 0
    assert checkpoint.load(out / "checkpoint.pt")["step"] == prev["step"] + 1
    assert "previous checkpoint" in capsys.readouterr().out


def test_a_payload_checksum_mismatch_is_damage(run_dir, tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    # re-saved with valid CRCs but a payload its recorded SHA-256 does not match
    next(iter(state["model"].values())).view(-1)[0] += 1.0
    torch.save(state, path)
    with pytest.raises(checkpoint.CheckpointError, match="is damaged"):
        checkpoint.load(path)


def test_the_diagnosis_never_calls_an_unverified_checkpoint_good(run_dir, tmp_path):
    from fastvae.engine import Trainer

    out = copy_run(run_dir, tmp_path)
    damage(out / "checkpoint.pt", "flipped")
    trainer = Trainer.__new__(Trainer)
    trainer.checkpoint_path, trainer.checkpoint_step = out / "checkpoint.pt", 8
    text = trainer.checkpoint_text()
    assert "last good checkpoint" not in text and "damaged" in text


def test_a_second_process_on_a_run_directory_is_refused(run_dir, tmp_path, capsys):
    out = copy_run(run_dir, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl,sys,time;f=open(sys.argv[1],'a+');fcntl.flock(f,fcntl.LOCK_EX);"
         "f.seek(0);f.truncate();f.write('%d\\n'%__import__('os').getpid());f.flush();print('held',flush=True);time.sleep(60)",
         str(out / rundir.LOCK_FILE)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = (out / "metrics.jsonl").read_bytes()
        assert train.main(["--resume", str(out), "--epochs", "3"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"PID {holder.pid}" in err
        assert (out / "metrics.jsonl").read_bytes() == before
        assert train.main([*TINY, "--epochs", "1", "--out", str(out), "--overwrite"]) == 2
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock does not block
    assert train.main(["--resume", str(out), "--epochs", "2", "--no-pictures"]) == 0


def test_a_fresh_run_takes_the_lock_before_writing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = []
    real = rundir.write_json

    def write_json(path, obj):
        with open(path.parent / rundir.LOCK_FILE) as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append(path.name)
        real(path, obj)

    monkeypatch.setattr(train, "write_json", write_json)
    assert train.main([*TINY, "--epochs", "1", "--out", str(out), "--no-pictures"]) == 0
    assert seen == ["config.json"]


def test_damaged_counted_metrics_rows_are_repaired_from_the_checkpoint(run_dir, tmp_path, capsys):
    out = copy_run(run_dir, tmp_path)
    good = (out / "metrics.jsonl").read_text().splitlines()
    lines = list(good)
    lines[2] = lines[2][:10] + "\x00garbage"
    (out / "metrics.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe trailing")
    assert train.main(["--resume", str(out), "--no-pictures"]) == 0
    assert (out / "metrics.jsonl").read_text().splitlines() == good
    assert "repaired" in capsys.readouterr().out


def test_a_deleted_metrics_file_is_rewritten_from_the_checkpoint(run_dir, tmp_path):
    out = copy_run(run_dir, tmp_path)
    good = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").unlink()
    assert train.main(["--resume", str(out), "--no-pictures"]) == 0
    assert (out / "metrics.jsonl").read_text() == good


def test_a_bad_row_without_rows_in_the_checkpoint_names_the_files_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train"}\n{"kind": "train", "loss": nope}\n')
    with pytest.raises(rundir.ConfigError, match=r"metrics.jsonl line 2 is not a JSON row"):
        rundir.restore_metrics(path, 2, None)


def test_a_completed_runs_resume_rewrites_no_metrics(run_dir, tmp_path, monkeypatch):
    out = copy_run(run_dir, tmp_path)
    (out / "samples.png").unlink()
    before = os.stat(out / "metrics.jsonl").st_ino
    assert train.main(["--resume", str(out)]) == 0
    assert os.stat(out / "metrics.jsonl").st_ino == before
    assert (out / "samples.png").is_file()


def test_metrics_are_fsynced_before_each_checkpoint(tmp_path, monkeypatch):
    order = []
    real_save = checkpoint.save
    real_fsync = os.fsync
    monkeypatch.setattr(checkpoint, "save", lambda p, s: (order.append("save"), real_save(p, s)))

    def fsync(fd):
        if os.path.realpath(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            order.append("metrics")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert train.main([*TINY, "--epochs", "1", "--out", str(tmp_path / "run"), "--no-pictures"]) == 0
    pairs = zip(order, order[1:], strict=False)
    assert order and order[0] == "metrics" and all(a == "metrics" for a, b in pairs if b == "save")


def test_temp_files_of_dead_processes_are_removed_at_a_resume(run_dir, tmp_path):
    out = copy_run(run_dir, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".checkpoint.pt.tmp-{dead.stdout.strip()}"
    stale.write_bytes(b"PK\x03\x04 half")
    assert train.main(["--resume", str(out), "--no-pictures"]) == 0
    assert not stale.exists()


def test_auto_resume_starts_then_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([*TINY, "--epochs", "2", "--out", str(out), "--auto-resume", "--stop-after", "3"]) == 0
    assert train.main([*TINY, "--epochs", "2", "--out", str(out), "--auto-resume", "--no-pictures"]) == 0
    assert "Resuming at step 3" in capsys.readouterr().out
    assert train.main([*TINY, "--epochs", "2", "--out", str(out), "--auto-resume", "--seed", "7"]) == 2
    assert "differs from the run's" in capsys.readouterr().err


def test_auto_resume_of_a_directory_without_checkpoint_starts_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"killed": "before the first checkpoint"}))
    assert train.main([*TINY, "--epochs", "1", "--out", str(out), "--auto-resume", "--no-pictures"]) == 0
    assert checkpoint.load(out / "checkpoint.pt")["epoch"] == 1


def test_no_circular_advice_before_the_first_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert train.main(["--resume", str(out)]) == 2
    first = capsys.readouterr().err
    assert train.main([*TINY, "--out", str(out)]) == 2
    second = capsys.readouterr().err
    assert "--auto-resume" in first or "--overwrite" in first
    assert "pass --resume" not in second and "--overwrite" in second


def test_evaluate_prints_its_table_before_a_failed_eval_json_write(run_dir, tmp_path, capsys, monkeypatch):
    import errno

    from fastvae import evaluate

    out = copy_run(run_dir, tmp_path)

    def refuse(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(evaluate.Path, "write_text", refuse)
    monkeypatch.setattr(checkpoint, "atomic_write", refuse)
    assert evaluate.main([str(out), "--iw-samples", "2"]) == 2
    captured = capsys.readouterr()
    assert "ELBO" in captured.out
    assert captured.err.count("\n") == 1 and "Read-only file system" in captured.err and "eval.json" in captured.err
