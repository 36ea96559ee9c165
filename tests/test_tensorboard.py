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


def _scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    """The (step, value) events of `tag` as TensorBoard shows them (earlier events a restart purged left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def _rows(out, kind: str, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], pytest.approx(row[key], rel=1e-6)) for row in rows if row["kind"] == kind]


def test_tensorboard_added_on_resume_holds_the_whole_run(tmp_path):
    """--tensorboard may be added on --resume: the events start with the rows written before it."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert train.main([*TINY, "--epochs", "2", "--out", str(out), "--stop-after", "7"]) == 0
    assert train.main(["--resume", str(out), "--tensorboard"]) == 0
    assert json.loads((out / "config.json").read_text())["tensorboard"] == ""
    assert _scalars(out / "tensorboard", "train/elbo") == _rows(out, "train", "elbo")
    assert _rows(out, "train", "elbo")[0][0] < 7  # rows from before the resume are there


def test_tensorboard_after_a_resume_shows_each_row_once(tmp_path):
    """Resumed from the checkpoint before the latest, the run writes steps 4..6 again: TensorBoard shows
    metrics.jsonl's rows once each, not the events of the abandoned attempt as well."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    argv = [*TINY, "--epochs", "2", "--out", str(out), "--tensorboard", "--checkpoint-every", "3"]
    assert train.main([*argv, "--stop-after", "6"]) == 0
    assert train.main(["--resume", str(out), "--from-previous"]) == 0  # from step 3; --tensorboard stays on
    for kind, key in (("train", "elbo"), ("eval", "test_elbo")):
        assert _scalars(out / "tensorboard", f"{kind}/{key}") == _rows(out, kind, key)
