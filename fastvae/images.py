"""Pictures of a run: image grids (torchvision) and a small line chart drawn with PIL (no matplotlib)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import save_image

GRID_PADDING = 2  # pixels between and around the images of a grid: an n-column grid is n*(W+2)+2 wide
_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int = 8) -> None:
    """Save (N, C, H, W) images with values in [0, 1] (clamped) as a grid with `nrow` images per row.

    C is 1 (grey) or 3 (RGB). The PNG is nrow*(W+2)+2 by ceil(N/nrow)*(H+2)+2 pixels.
    """
    save_image(images.detach().float().clamp(0.0, 1.0).cpu(), path, nrow=nrow, padding=GRID_PADDING)


def save_reconstructions(originals: Tensor, reconstructions: Tensor, path: str | os.PathLike) -> None:
    """One row of originals (N, C, H, W) above the row of their reconstructions, values in [0, 1]."""
    if originals.shape != reconstructions.shape:
        shapes = f"{tuple(reconstructions.shape)} vs {tuple(originals.shape)}"
        raise ValueError(f"`reconstructions` must have the shape of `originals`, got {shapes}")
    save_grid(torch.cat([originals.float().cpu(), reconstructions.float().cpu()]), path, nrow=len(originals))


def _axis(values: Sequence[float], count: int = 6) -> tuple[float, float, list[float]]:
    """The axis range (the data range plus 3% each side) and about `count` round ticks inside it."""
    lo, hi = min(values), max(values)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.03 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    return lo, hi, [first + i * step for i in range(int((hi - first) / step) + 1)]


def _label(value: float) -> str:
    return f"{value:.4g}"


def plot_lines(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    size: tuple[int, int] = (720, 440),
) -> None:
    """Draw each named series of (x, y) points as a line (a dot when it has one point) into a PNG.

    Axes with round ticks, a legend in the bottom-right corner of the plot, the title and the axis labels.
    Empty series are listed in the legend but not drawn; with no points at all the axes span [0, 1].
    """
    font = ImageFont.load_default()
    width, height = size
    left, right, top, bottom = 80, 20, 36, 56
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [p for pts in series.values() for p in pts]
    xs, ys = [p[0] for p in points] or [0.0, 1.0], [p[1] for p in points] or [0.0, 1.0]
    (x0, x1, x_ticks), (y0, y1, y_ticks) = _axis(xs), _axis(ys)

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x0) / (x1 - x0) * (width - left - right)
        py = height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for x in x_ticks:
        px, py = to_pixel(x, y0)
        draw.line([px, py, px, py + 5], fill="black")
        draw.text((px, py + 8), _label(x), fill="black", font=font, anchor="mt")
    for y in y_ticks:
        px, py = to_pixel(x0, y)
        draw.line([px - 5, py, px, py], fill="black")
        draw.line([px + 1, py, width - right - 1, py], fill=(230, 230, 230))
        draw.text((px - 8, py), _label(y), fill="black", font=font, anchor="rm")
    for i, pts in enumerate(series.values()):
        colour = _COLOURS[i % len(_COLOURS)]
        pixels = [to_pixel(x, y) for x, y in sorted(pts)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels if len(pixels) == 1 else ():
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    lx, ly = width - right - 164, height - bottom - 8 - 16 * len(series)  # bottom right: rising curves
    draw.rectangle([lx, ly - 4, width - right - 4, height - bottom - 4], fill="white", outline="grey")
    for i, name in enumerate(series):
        colour = _COLOURS[i % len(_COLOURS)]
        y = ly + 6 + 16 * i
        draw.line([lx + 6, y, lx + 26, y], fill=colour, width=3)
        draw.text((lx + 32, y), name, fill="black", font=font, anchor="lm")
    draw.text((width / 2, 18), title, fill="black", font=font, anchor="mm")
    draw.text(((left + width - right) / 2, height - 18), xlabel, fill="black", font=font, anchor="mm")
    vertical = Image.new("RGB", (height, 20), "white")
    ImageDraw.Draw(vertical).text((height / 2, 10), ylabel, fill="black", font=font, anchor="mm")
    image.paste(vertical.rotate(90, expand=True), (4, 0))
    image.save(path)
