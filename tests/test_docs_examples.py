"""The runnable examples in the docs run as written: the drop-in training loop (docs/drop-in.md), and the
examples that load a trained run (README.md, docs/drop-in.md), here on a small run in runs/sprites-*."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from run_helpers import TINY

from fastvae import train

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "drop-in.md"


def run_block(path: Path, marker: str) -> None:
    """Run the first ```python block after the text `marker` in the file `path`."""
    after = path.read_text().split(marker, 1)[1]
    code = re.search(r"```python\n(.*?)```", after, flags=re.S).group(1)
    exec(compile(code, str(path), "exec"), {})


def test_drop_in_example_runs_and_lowers_the_loss(capsys):
    run_block(DOC, "## A complete example")
    printed = capsys.readouterr().out
    first, last = (float(v) for v in re.findall(r"negative ELBO ([\d.]+) nats", printed))
    assert last < first - 20, printed


def _runs_dir(tmp_path_factory, *likelihood: str) -> Path:
    """A folder holding runs/sprites-<...>, a small finished run, as `make train` leaves it."""
    root = tmp_path_factory.mktemp("docs")
    args = [*TINY, *likelihood, "--epochs", "1", "--no-pictures"]
    assert train.main([*args, "--out", str(root / "runs" / "sprites-20260101-000000")]) == 0
    return root


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return _runs_dir(tmp_path_factory, "--likelihood", "bernoulli")


@pytest.fixture(scope="module")
def learned_sigma_runs_dir(tmp_path_factory):
    return _runs_dir(tmp_path_factory, "--likelihood", "gaussian", "--sigma", "learned")


def test_readme_load_run_example(runs_dir, monkeypatch, capsys):
    monkeypatch.chdir(runs_dir)
    run_block(ROOT / "README.md", "**Use the trained model**")
    assert capsys.readouterr().out.endswith("sprites, K = 3: samples (16, 1, 8, 8), z (16, 3)\n")


def test_drop_in_load_run_example(runs_dir, monkeypatch, capsys):
    monkeypatch.chdir(runs_dir)
    run_block(DOC, "## A trained run")
    printed = capsys.readouterr().out
    found = re.search(r"test ELBO (-[\d.]+), loss ([\d.]+) = ([\d.]+) nats per image; K = 3", printed)
    elbo, loss = float(found.group(1)), float(found.group(2))
    assert 0 < -elbo < 64 * math.log(2) and 0 < loss < 64 * math.log(2)  # better than a coin flip per pixel
    assert found.group(2) == found.group(3)


def test_drop_in_load_run_example_scores_a_learned_sigma_as_the_model_does(learned_sigma_runs_dir, monkeypatch, capsys):
    """The example's loss from the ops is the model's own, the learned scale included."""
    monkeypatch.chdir(learned_sigma_runs_dir)
    run_block(DOC, "## A trained run")
    found = re.search(r"loss (-?[\d.]+) = (-?[\d.]+) nats per image", capsys.readouterr().out)
    assert found.group(1) == found.group(2)
