"""checkpoint.pt: atomic writes, and one clear line for a file that cannot be resumed from."""

from __future__ import annotations

import pickle

import pytest
import torch
from run_helpers import TINY

from fastvae import checkpoint, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert train.main([*TINY, "--epochs", "1", "--out", str(out)]) == 0
    return out


def test_the_checkpoint_holds_everything_to_continue(run_dir):
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)  # plain values only
    assert state["format"] == "fastvae-checkpoint" and state["version"] == checkpoint.FORMAT_VERSION
    assert (state["step"], state["epoch"], state["position"]) == (8, 1, 0)
    assert set(state["optimizer"]["state"]) == set(range(len(state["model"])))  # Adam moments of every tensor
    assert state["rng"]["torch"].dtype == torch.uint8
    assert len(state["rng"]["cuda"]) == torch.cuda.device_count()  # each GPU's state on CUDA, none on the CPU
    assert state["running"]["count"] == 0
    assert state["running"]["sums"].shape == (5,)  # the 5 statistics
    assert torch.equal(state["permutation"].sort().values, torch.arange(256))
    assert state["metrics_rows"] == len((run_dir / "metrics.jsonl").read_text().splitlines())
    assert state["config"]["latent_dim"] == 3 and state["config"]["data_sha256"]


def test_a_failed_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"step": 1})
    good = path.read_bytes()

    def crash(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, {"step": 2})
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]  # no temp file


def test_save_fsyncs_the_file_and_the_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = checkpoint.os.fsync

    def fsync(fd):
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    checkpoint.save(tmp_path / "checkpoint.pt", {"step": 1})
    assert len(synced) == 2


def corrupt(run_dir, tmp_path, kind):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        (out / name).write_bytes((run_dir / name).read_bytes())
    data = (run_dir / "checkpoint.pt").read_bytes()
    path = out / "checkpoint.pt"
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("not a checkpoint at all\n")
    elif kind == "version":
        state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
        torch.save({**state, "version": 99}, path)
    elif kind == "foreign":
        torch.save({"model": {}, "step": 3}, path)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"format": "fastvae-checkpoint", "obj": object}))
    elif kind == "object":
        torch.save({"format": "fastvae-checkpoint", "version": 1, "fn": print}, path)
    elif kind == "field":
        state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
        del state["rng"]
        torch.save(state, path)
    return out, path


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("truncated", "is truncated or corrupt"),
        ("text", "is not a fastvae checkpoint (not a file written by torch.save)"),
        ("pickle", "is not a fastvae checkpoint (not a file written by torch.save)"),
        ("object", "is not a fastvae checkpoint: it holds objects other than tensors and plain values: "),
        ("version", f"has checkpoint format version 99; this fastvae reads version {checkpoint.FORMAT_VERSION}"),
        ("foreign", "is not a fastvae checkpoint (no 'fastvae-checkpoint' format marker)"),
        ("field", "is corrupt: field 'rng' is missing"),
    ],
)
def test_resume_from_a_bad_checkpoint_is_one_clear_line(run_dir, tmp_path, capsys, kind, problem):
    out, path = corrupt(run_dir, tmp_path, kind)
    assert train.main(["--resume", str(out), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {path} ") and problem in err
