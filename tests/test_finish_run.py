"""`--resume` on a completed run writes the final files that are missing (pictures, summary) and exits 0: the
way out of a run interrupted after its last checkpoint, while its pictures were drawn."""

from __future__ import annotations

import os
import signal
import time

import pytest
from run_helpers import TINY

from fastvae import pictures, rundir, train

ARGS = [*TINY, "--latent-dim", "2", "--epochs", "2"]  # 16 steps; every picture, manifold.png too


def run_files(out) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A completed run's files, to copy."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train.main([*ARGS, "--out", str(out)]) == 0
    return run_files(out)


def copy_of(files: dict[str, bytes], out):
    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_drawing_then_resume_writes_the_missing_pictures(tmp_path, capsys, monkeypatch, signum, code):
    real_save_grid = pictures.save_grid

    def signal_at_samples(images, path, nrow=8, **labels):
        if path.name == "samples.png":
            os.kill(os.getpid(), signum)
            time.sleep(0.1)  # the handler runs between bytecodes
        real_save_grid(images, path, nrow, **labels)

    monkeypatch.setattr(pictures, "save_grid", signal_at_samples)
    out = tmp_path / "run"
    assert train.main([*ARGS, "--out", str(out)]) == code
    err = capsys.readouterr().err
    name = signal.Signals(signum).name
    assert err == (
        f"error: stopped by {name} while drawing the pictures; the training is complete and saved (step 16). "
        f"Write the missing pictures with: python -m fastvae.train --resume {out}\n"
    )
    assert not any((out / name).exists() for name in rundir.PICTURES)  # samples.png is the first
    before = run_files(out)

    monkeypatch.undo()
    assert train.main(["--resume", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # the console may wrap the lines
    assert f"The run in {out} has completed its 2 epochs (step 16): nothing to train." in printed
    assert "fastvae training run" in printed and "test ELBO" in printed  # the summary table
    drawn = ", ".join(str(out / name) for name in rundir.PICTURES)
    assert f"Wrote the summary above and the missing pictures: {drawn}" in printed
    after = run_files(out)
    assert {name: after[name] for name in before} == before  # checkpoint, config and metrics untouched


def test_resume_draws_only_the_pictures_that_are_missing(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path / "run")
    (out / "samples.png").unlink()
    (out / "manifold.png").unlink()
    (out / "loss.png").write_bytes(b"an older picture, which stays")
    assert train.main(["--resume", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert f"Wrote the summary above and the missing pictures: {out / 'samples.png'}, {out / 'manifold.png'}" in printed
    after = run_files(out)
    assert after["samples.png"] == finished["samples.png"]  # drawn again from the same model and generator state
    assert after["loss.png"] == b"an older picture, which stays"
    assert {name: after[name] for name in finished if name != "loss.png"} == {
        name: data for name, data in finished.items() if name != "loss.png"
    }


def test_resume_of_a_complete_run_with_nothing_missing(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path / "run")
    assert train.main(["--resume", str(out), "--epochs", "2"]) == 0  # --epochs equal to the run's: no change
    assert "No picture was missing." in capsys.readouterr().out
    assert run_files(out) == finished


def test_resume_with_pictures_draws_those_of_a_no_pictures_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([*ARGS, "--no-pictures", "--out", str(out)]) == 0
    assert train.main(["--resume", str(out)]) == 0  # the run's setting: still none
    assert not list(out.glob("*.png"))
    assert train.main(["--resume", str(out), "--pictures"]) == 0
    assert sorted(path.name for path in out.glob("*.png")) == sorted(rundir.PICTURES)


def test_fewer_epochs_than_completed_is_refused(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path / "run")
    assert train.main(["--resume", str(out), "--epochs", "1"]) == 2
    assert capsys.readouterr().err == (
        f"error: --resume {out}: the run has completed 2 epochs, more than --epochs 1; leave out --epochs to "
        "finish the run, or pass a larger one to train further\n"
    )
