"""Pictures of a model as image grids (torchvision): images, their reconstructions, and decoded walks through
the latent space (interpolations between encodings, and the 2-D manifold over the prior's quantiles)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.utils import make_grid

from fastvae.checkpoint import atomic_write
from fastvae.model import VAE

GRID_PADDING = 2  # pixels between and around the images of a grid: an n-column grid is n*(W+2)+2 wide
PAD_VALUE = 0.5  # mid grey between the images, so that each one's frame shows on black backgrounds
DPI = 100
MIN_SIDE = 4.0  # inches: a grid is shown at least this wide, its pixels enlarged without smoothing (nearest)
EDGE = 0.1  # inches left beside a title that a figure was widened for


def save_grid(
    images: Tensor,
    path: str | os.PathLike,
    nrow: int = 8,
    title: str = "",
    row_labels: Sequence[str] = (),
    ticks: Sequence[float] = (),
) -> None:
    """Save (N, C, H, W) images with values in [0, 1] (clamped) as a PNG of a grid with `nrow` images per row,
    drawn with matplotlib: the grid's pixels enlarged by an integer factor with nearest-neighbour sampling
    (no smoothing) to at least MIN_SIDE inches at DPI, under `title`. `row_labels`: one label per row of the
    grid, on its left. `ticks` (a manifold): the latent values of the columns (z1, left to right) and of the
    rows (z2, bottom to top), shown on labelled axes. C is 1 (grey) or 3 (RGB). Written atomically.
    """
    images = images.detach().float().clamp(0.0, 1.0).cpu()
    grid = make_grid(images, nrow=nrow, padding=GRID_PADDING, pad_value=PAD_VALUE)  # (3, height, width)
    height, width = grid.shape[1:]
    scale = max(1, math.ceil(MIN_SIDE * DPI / max(height, width)))
    figure = Figure(figsize=(width * scale / DPI + 1.6, height * scale / DPI + 1.0), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    step_x, step_y = images.shape[-1] + GRID_PADDING, images.shape[-2] + GRID_PADDING
    centre = lambda i, step: GRID_PADDING + i * step + (step - GRID_PADDING) / 2  # noqa: E731
    if ticks:
        axes.set_xticks([centre(i, step_x) for i in range(len(ticks))], [f"{t:.2f}" for t in ticks], rotation=90)
        axes.set_yticks([centre(i, step_y) for i in range(len(ticks))], [f"{t:.2f}" for t in reversed(ticks)])
        axes.set_xlabel("z1 (prior quantiles)")
        axes.set_ylabel("z2 (prior quantiles)")
    else:
        axes.set_xticks([])
        axes.set_yticks([centre(i, step_y) for i in range(len(row_labels))], list(row_labels))
        axes.tick_params(axis="y", length=0)
        for side in axes.spines.values():
            side.set_visible(False)
    if title:
        axes.set_title(title)
        _fit_width(figure)
    atomic_write(path, lambda f: figure.savefig(f, format="png"))


def _fit_width(figure: Figure) -> None:
    """Widen `figure` (inches) so that what it draws stays inside it: a title wider than a narrow grid (a long
    file name over a few columns) would be cut at its edges. The axes stay centred in the space that their
    labels leave, so widening by 2d moves the title d inwards on either side."""
    figure.draw_without_rendering()  # the constrained layout places the axes and the title
    drawn, width = figure.get_tightbbox(), figure.get_figwidth()
    over = max(-drawn.x0, drawn.x1 - width)
    if over > 0:
        figure.set_figwidth(width + 2 * over + 2 * EDGE)


def save_reconstructions(
    originals: Tensor, reconstructions: Tensor, path: str | os.PathLike, title: str = ""
) -> None:
    """One row of originals (N, C, H, W) above the row of their reconstructions, values in [0, 1], labelled."""
    if originals.shape != reconstructions.shape:
        shapes = f"{tuple(reconstructions.shape)} vs {tuple(originals.shape)}"
        raise ValueError(f"`reconstructions` must have the shape of `originals`, got {shapes}")
    both = torch.cat([originals.float().cpu(), reconstructions.float().cpu()])
    save_grid(both, path, nrow=len(originals), title=title, row_labels=("test images", "reconstructions"))


def _decoded(model: VAE, z: Tensor) -> Tensor:
    """z (..., *latent_shape) -> the decoded images (prod(...), *data_shape) in data space, float32."""
    return model.to_data_space(model.decode(z)).reshape(-1, *model.data_shape)


@torch.no_grad()
def interpolations(model: VAE, x: Tensor, steps: int = 10) -> Tensor:
    """Decoded linear interpolations between the encodings (posterior means) of pairs of samples.

    x: (2P, D) or (2P, *data_shape) on the model's device, values in [0, 1]. Row i of the result goes from
    x[2i]'s encoding to x[2i+1]'s in `steps` equal steps (both ends included, so its first and last images
    are their reconstructions). Returns (P * steps, *data_shape) float32, row-major: a grid of `steps` columns.
    """
    if len(x) < 2 or len(x) % 2 or steps < 2:
        raise ValueError(f"need an even number >= 2 of samples and steps >= 2, got {len(x)} and {steps}")
    mu, _ = model.encode(x)  # (2P, *latent_shape)
    start, end = mu[0::2, None], mu[1::2, None]  # (P, 1, *latent_shape)
    t = torch.linspace(0.0, 1.0, steps, device=mu.device, dtype=mu.dtype)  # (steps,), then (1, steps, 1, ...)
    t = t.reshape(1, steps, *(1,) * len(model.latent_shape))
    return _decoded(model, start + t * (end - start))


@torch.no_grad()
def latent_manifold(model: VAE, n: int = 20) -> Tensor:
    """The decoded n x n grid over a 2-D latent space at the prior's quantiles (Kingma and Welling, 2014, fig. 4).

    Image (i, j) decodes z = (Phi^-1(u_j), Phi^-1(u_n-1-i)), u_k = (k + 0.5) / n, Phi the standard normal CDF:
    z1 grows to the right and z2 upwards, each over the central (1 - 1/n) of the prior's mass. Needs
    latent_dim K = 2 (of any latent shape: (2,), (1, 2), ...). Returns (n * n, *data_shape) float32,
    row-major: a grid of n columns.
    """
    if model.latent_dim != 2:
        raise ValueError(f"the latent manifold needs latent_dim 2, got {model.latent_dim}")
    param = next(model.parameters())
    u = (torch.arange(n, device=param.device, dtype=torch.float64) + 0.5) / n
    q = torch.special.ndtri(u).to(torch.float32 if model.arch == "custom" else param.dtype)
    z1, z2 = torch.meshgrid(q, q.flip(0), indexing="xy")  # (n, n): z1 varies along a row, z2 down the columns
    return _decoded(model, torch.stack([z1, z2], dim=-1).reshape(n, n, *model.latent_shape))
