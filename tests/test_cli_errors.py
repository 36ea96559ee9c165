"""Bad command lines of `python -m fastvae.train`: one clear line on stderr and exit code 2, no traceback."""

from __future__ import annotations

import pytest

from fastvae import train

TINY = ["--num-train", "64", "--num-test", "32", "--batch-size", "32", "--hidden", "16", "--latent-dim", "2"]
TINY += ["--image-size", "8"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--batch-size", "-5"], "argument --batch-size: must be >= 1, got -5"),
        (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
        (["--latent-dim", "0"], "argument --latent-dim: must be >= 1, got 0"),
        (["--lr", "0"], "argument --lr: must be a finite number > 0, got 0"),
        (["--lr=-1e-3"], "argument --lr: must be a finite number > 0, got -1e-3"),
        (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
        (["--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
        (["--beta", "-1"], "argument --beta: must be a finite number >= 0, got -1"),
        (["--checkpoint-every", "-1"], "argument --checkpoint-every: must be >= 0, got -1"),
        (["--stop-after", "0"], "argument --stop-after: must be >= 1, got 0"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--likelihood", "poisson"], "argument --likelihood: invalid choice: 'poisson'"),
    ],
)
def test_argparse_errors_are_one_line(args, expected, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train.main([*args, "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    line = one_error_line(capsys)
    assert expected in line and "--help" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--likelihood", "bernoulli", "--sigma", "2"], "--sigma applies to --likelihood gaussian only, not bernoulli"),
        (["--likelihood", "bernoulli", "--sigma", "learned"], "--sigma applies to --likelihood gaussian only"),
        (["--dataset", "mnist"], "--image-size applies to --dataset sprites only, not mnist"),
        (["--resume", "somewhere", "--overwrite"], "--resume and --overwrite exclude each other"),
        (["--batch-size", "100"], "--batch-size 100 is larger than the 64 training samples"),
        (["--resume", "no/such/run"], "--resume no/such/run: no such run directory"),
    ],
)
def test_conflicting_or_impossible_settings_are_one_line(args, expected, capsys, tmp_path):
    argv = [*TINY, *args]
    if "--resume" not in args:
        argv += ["--out", str(tmp_path / "r")]
    assert train.main(argv) == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "r").exists()  # refused before the run directory is made


def test_resume_with_out_is_refused(capsys, tmp_path):
    assert train.main(["--resume", str(tmp_path), "--out", str(tmp_path / "other")]) == 2
    assert "--resume RUN_DIR names the run directory already; leave out --out" in one_error_line(capsys)


def test_a_non_empty_out_dir_is_refused_unless_overwrite(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "metrics.jsonl").write_text('{"kind": "stale"}\n')
    args = [*TINY, "--epochs", "1", "--out", str(out)]
    assert train.main(args) == 2
    line = one_error_line(capsys)
    assert f"--out {out} is not empty" in line and "--overwrite" in line and "--resume" not in line  # no checkpoint
    assert (out / "metrics.jsonl").read_text() == '{"kind": "stale"}\n'  # untouched
    assert train.main([*args, "--overwrite"]) == 0
    assert "stale" not in (out / "metrics.jsonl").read_text()
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    capsys.readouterr()


def test_an_empty_out_dir_is_fine(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert train.main([*TINY, "--epochs", "1", "--out", str(out)]) == 0
    assert (out / "checkpoint.pt").is_file()


def test_overwrite_keeps_the_old_run_when_the_new_one_is_refused(capsys, tmp_path):
    """--overwrite deletes the old run's files only after the new run's data and settings passed."""
    out = tmp_path / "run"
    assert train.main([*TINY, "--epochs", "1", "--out", str(out)]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    missing = tmp_path / "missing.npy"
    assert train.main(["--dataset", str(missing), "--epochs", "1", "--out", str(out), "--overwrite"]) == 2
    assert str(missing) in one_error_line(capsys)
    assert (out / "checkpoint.pt").read_bytes() == before
    assert train.main([*TINY, "--batch-size", "4096", "--epochs", "1", "--out", str(out), "--overwrite"]) == 2
    assert "--batch-size 4096 is larger than the 64 training samples" in one_error_line(capsys)
    assert (out / "checkpoint.pt").read_bytes() == before
