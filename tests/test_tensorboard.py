"""`--tensorboard`: the run's scalars and pictures as event files, read back with tensorboard's own reader."""

from __future__ import annotations

import builtins
import json

import pytest
from run_helpers import TINY

from fastvae import train


def test_tensorboard_events_hold_the_scalars_and_pictures(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert train.main([*TINY, "--epochs", "1", "--out", str(out), "--tensorboard"]) == 0
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/elbo", "train/kl", "eval/test_elbo"} <= set(tags["scalars"])
    assert {"pictures/samples", "pictures/loss"} <= set(tags["images"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last_eval = [row for row in rows if row["kind"] == "eval"][-1]
    scalar = events.Scalars("eval/test_elbo")[-1]
    assert (scalar.step, scalar.value) == (last_eval["step"], pytest.approx(last_eval["test_elbo"], rel=1e-6))


def test_without_tensorboard_it_is_one_error_line(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    assert train.main([*TINY, "--out", str(tmp_path / "run"), "--tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --tensorboard needs the tensorboard package: pip install fastvae[tensorboard]\n"
    assert not (tmp_path / "run").exists()
