"""The pictures of a run directory: which ones apply to a run, and drawing them (`python -m fastvae.train`
draws them at the end of a run, and a resumed completed run draws the ones missing).

- samples.png: 64 draws z ~ N(0, I), decoded (8 x 8);
- reconstructions.png: 8 test images above their reconstructions;
- interpolations.png: 8 rows of 10 decoded linear interpolations between pairs of test encodings;
- manifold.png (latent dim 2 only): the decoded 20 x 20 grid over the prior's quantiles;
- loss.png: the train and test ELBO, and the KL, against the step (matplotlib).

The image grids need image data, (C, H, W) with C = 1 or 3; loss.png applies to every run. Each is
written atomically, so an interrupted run leaves a picture whole or missing, never truncated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastvae.data import to_float
from fastvae.images import interpolations, latent_manifold, save_grid, save_reconstructions
from fastvae.model import VAE
from fastvae.plots import save_training_curves

SAMPLES = 64  # samples.png: an 8 x 8 grid
RECONSTRUCTIONS = 8  # reconstructions.png: test images (one row) over their reconstructions
PAIRS, STEPS = 8, 10  # interpolations.png: a row per pair of test images, STEPS images per row
MANIFOLD = 20  # manifold.png: MANIFOLD x MANIFOLD images


@dataclass(frozen=True)
class RunRecord:
    """What the pictures are drawn from: the trained model, the test split as data.py loads it ((N, C, H, W)
    uint8 or float in [0, 1], on the CPU) and the rows of metrics.jsonl."""

    model: VAE
    test: torch.Tensor
    history: Sequence[dict[str, Any]]
    dataset: str = ""

    def title(self, what: str) -> str:
        """`what`, and on a second line the data set, the step and epoch and the last test ELBO of `history`
        (two lines, so that the title of a narrow grid fits)."""
        evals = [row for row in self.history if row["kind"] == "eval"]
        if not evals:
            return f"{what}\n{self.dataset}"
        last = evals[-1]
        return (
            f"{what}\n{self.dataset}, step {last['step']} (epoch {last['epoch'] + 1}), "
            f"test ELBO {last['test_elbo']:.2f} nats"
        )

    def test_images(self, n: int) -> torch.Tensor:
        """The first n test images, float32 in [0, 1], on the model's device."""
        return to_float(self.test[:n].to(next(self.model.parameters()).device))


def _samples(run: RunRecord, path: Path) -> None:
    save_grid(run.model.sample(SAMPLES), path, nrow=8, title=run.title("samples z ~ N(0, I)"))


def _reconstructions(run: RunRecord, path: Path) -> None:
    originals = run.test_images(RECONSTRUCTIONS)
    save_reconstructions(originals, run.model.reconstruct(originals), path, title=run.title("reconstructions"))


def _interpolations(run: RunRecord, path: Path) -> None:
    pairs = min(PAIRS, len(run.test) // 2)
    grid = interpolations(run.model, run.test_images(2 * pairs), STEPS)
    save_grid(grid, path, nrow=STEPS, title=run.title("interpolations between test encodings"))


def _manifold(run: RunRecord, path: Path) -> None:
    quantiles = torch.special.ndtri((torch.arange(MANIFOLD, dtype=torch.float64) + 0.5) / MANIFOLD).tolist()
    grid = latent_manifold(run.model, MANIFOLD)
    save_grid(grid, path, nrow=MANIFOLD, title=run.title("latent manifold"), ticks=quantiles)


def _loss(run: RunRecord, path: Path) -> None:
    save_training_curves(run.history, path)


_DRAW: dict[str, Callable[[RunRecord, Path], None]] = {
    "samples.png": _samples,
    "reconstructions.png": _reconstructions,
    "interpolations.png": _interpolations,
    "manifold.png": _manifold,
    "loss.png": _loss,
}


def pictures_of(sample_shape: Sequence[int], latent_dim: int, num_test: int) -> tuple[list[str], list[str]]:
    """The pictures (in PICTURES order) that apply to a run with this sample shape, latent dimension and
    number of test samples, and a reason for each image picture that does not (manifold.png, which only
    a 2-D latent space has, goes unmentioned)."""
    shape = tuple(sample_shape)
    if not (len(shape) == 3 and shape[0] in (1, 3)):
        grids = "samples.png, reconstructions.png, interpolations.png"
        return ["loss.png"], [f"{grids}: the data are not images (sample shape {shape})"]
    names, skipped = ["samples.png", "reconstructions.png"], []
    if num_test >= 2:
        names.append("interpolations.png")
    else:
        skipped.append(f"interpolations.png: it needs 2 test samples, and there is {num_test}")
    if latent_dim == 2:
        names.append("manifold.png")
    return [*names, "loss.png"], skipped


def draw(names: Sequence[str], run: RunRecord, out_dir: Path) -> list[Path]:
    """Draw the pictures `names` (from PICTURES) of `run` into `out_dir`; returns their paths, in order."""
    run.model.eval()
    paths = []
    for name in names:
        _DRAW[name](run, out_dir / name)
        paths.append(out_dir / name)
    return paths
