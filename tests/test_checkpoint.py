"""checkpoint.pt: atomic writes, and one clear line for a file that cannot be resumed from."""

from __future__ import annotations

import pickle

import pytest
import torch
from run_helpers import TINY, build_trainer

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
    if torch.cuda.is_available():
        assert state["rng"]["cuda"].dtype == torch.uint8  # the training GPU's generator, not every GPU's
    else:
        assert state["rng"]["cuda"] is None
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


class VisibleGPUs:
    """A stand-in for torch.cuda's generators on `count` visible GPUs, each with its own state; a GPU that is
    not visible is an IndexError, as in torch (its `default_generators[index]`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
        self.states = [torch.full((16,), index, dtype=torch.uint8) for index in range(count)]
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(self.states))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.get(i) for i in range(len(self.states))])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set_all)

    @staticmethod
    def index(device: int | str | torch.device) -> int:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        return 0 if device.index is None else device.index  # the current device is 0

    def get(self, device: int | str | torch.device = "cuda") -> torch.Tensor:
        return self.states[self.index(device)].clone()

    def set(self, state: torch.Tensor, device: int | str | torch.device = "cuda") -> None:
        self.states[self.index(device)] = state.clone()

    def set_all(self, states: list[torch.Tensor]) -> None:
        for index, state in enumerate(states):  # as torch does: an IndexError past the visible GPUs
            self.set(state, index)


def _gpu_checkpoint(tmp_path, monkeypatch, index: int) -> tuple[VisibleGPUs, dict]:
    """A checkpoint saved by a run on cuda:`index` where 8 GPUs were visible (a CPU trainer whose device is
    the stand-in's GPU), and the stand-in, with the training GPU's state at save time as its state 99."""
    gpus = VisibleGPUs(monkeypatch, 8)
    trainer = build_trainer([*TINY, "--epochs", "1", "--device", "cpu"])
    trainer.device, trainer.checkpoint_path = torch.device("cuda", index), tmp_path / "checkpoint.pt"
    gpus.states[index] = torch.full((16,), 99, dtype=torch.uint8)
    trainer.save_checkpoint(0, 0)
    return gpus, checkpoint.load(trainer.checkpoint_path)


@pytest.mark.parametrize("index", [0, 1])
def test_a_gpu_run_resumes_where_fewer_gpus_are_visible(tmp_path, monkeypatch, index):
    """The checkpoint keeps the training GPU's RNG state only, and a resume puts it back into the training
    GPU: a run saved where 8 GPUs were visible resumes where index + 1 are, on the same GPU number."""
    gpus, state = _gpu_checkpoint(tmp_path, monkeypatch, index)
    assert torch.equal(state["rng"]["cuda"], torch.full((16,), 99, dtype=torch.uint8))
    gpus.states = [torch.zeros(16, dtype=torch.uint8) for _ in range(index + 1)]
    resumed = build_trainer([*TINY, "--epochs", "1", "--device", "cpu"])
    resumed.device = torch.device("cuda", index)
    resumed.restore(state)
    assert [int(s[0]) for s in gpus.states] == [0] * index + [99]  # the other GPUs' generators untouched


@pytest.mark.parametrize(("saved", "taken"), [(8, 1), (1, 0)])
def test_older_checkpoints_with_every_gpus_rng_state_resume(tmp_path, monkeypatch, saved, taken):
    """Checkpoints of older versions hold a list of every visible GPU's state: a resume on cuda:1 restores
    the list's entry 1, or the first when the saving run saw fewer GPUs (so its GPU had a lower number)."""
    gpus, state = _gpu_checkpoint(tmp_path, monkeypatch, 0)
    old = [torch.full((16,), 10 + i, dtype=torch.uint8) for i in range(saved)]
    state["ranks"][0]["rng"]["cuda"] = old
    gpus.states = [torch.zeros(16, dtype=torch.uint8) for _ in range(2)]
    resumed = build_trainer([*TINY, "--epochs", "1", "--device", "cpu"])
    resumed.device = torch.device("cuda", 1)
    resumed.restore(state)
    assert not gpus.states[0].any() and torch.equal(gpus.states[1], old[taken])


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
