"""The embedded sprites data set: shapes rendered with anti-aliased edges, no files needed."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from fastvae.data.splits import DataError, DataSplits

SHAPES = ("square", "ellipse", "heart", "triangle")
"""The sprite shape classes; the `shape` factor indexes this tuple. Each fits the unit circle (to 3%) in its
own frame; their areas there are 1.96, 1.57, 2.16 and 1.30."""

_SUPERSAMPLE = 4  # subpixels per pixel side: 16 samples per pixel, so 17 grey levels on the edges
_CHUNK = 256  # images rendered at once; keeps the subpixel arrays small enough to stay in cache
_MIN_RADIUS, _MAX_RADIUS = 0.25, 0.5  # shape radius as a fraction of the image half-width, scale 0..1
_MAX_OFFSET = 1.0 - 1.1 * _MAX_RADIUS  # centres stay within +-this, so even the largest shape fits


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.7


def _ellipse(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + 4.0 * (v * v) <= 1.0  # semi-axes 1 and 0.5: elongated, so its rotation shows


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # The sextic heart (x^2 + y^2 - 1)^3 <= x^2 y^3 with y pointing up (rows point down), centred.
    x = 1.3 * u
    y = 0.118 - 1.3 * v
    x2 = x * x
    q = x2 + y * y - 1.0
    return q * q * q <= x2 * (y * y * y)


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Equilateral, inscribed in the unit circle, apex up: inside all three edge half-planes.
    return (v <= 0.5) & (0.8660254 * np.abs(u) - 0.5 * v <= 0.5)


ShapeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(u, v) sprite-frame coordinates in units of the radius, (k, H, W) float32 -> (k, H, W) bool inside."""
_SHAPE_FNS: tuple[ShapeFn, ...] = (_square, _ellipse, _heart, _triangle)


def _sprite_factors(n: int, seed: int | Sequence[int]) -> dict[str, np.ndarray]:
    """Draw the factors of `n` sprites; one (n, 5) uniform draw, so a prefix does not depend on `n`."""
    u = np.random.default_rng(seed).random((n, 5))
    return {
        "shape": np.minimum((u[:, 0] * len(SHAPES)).astype(np.int64), len(SHAPES) - 1),
        "scale": u[:, 1].astype(np.float32),
        "rotation": (2.0 * np.pi * u[:, 2]).astype(np.float32),
        "pos_x": u[:, 3].astype(np.float32),
        "pos_y": u[:, 4].astype(np.float32),
    }


def _coverage_counts(inside: np.ndarray, size: int) -> np.ndarray:
    """(k, size*s, size*s) bool -> (k, size, size) uint8: inside subpixels per pixel (s = _SUPERSAMPLE).

    Sums strided slices, which numpy does far faster than a reduction over short axes.
    """
    s = _SUPERSAMPLE
    rows = inside.view(np.uint8).reshape(len(inside), size, s, size * s)
    acc = rows[:, :, 0, :].copy()
    for i in range(1, s):
        acc += rows[:, :, i, :]
    cols = acc.reshape(len(inside), size, size, s)
    counts = cols[..., 0].copy()
    for j in range(1, s):
        counts += cols[..., j]
    return counts


def _render(shape_fn: ShapeFn, factors: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Render k sprites of one shape, described by `factors` (k-long arrays) -> (k, size, size) uint8."""
    grid = ((np.arange(size * _SUPERSAMPLE, dtype=np.float32) + 0.5) / (size * _SUPERSAMPLE)) * 2.0 - 1.0
    radius = _MIN_RADIUS + (_MAX_RADIUS - _MIN_RADIUS) * factors["scale"]
    cos = (np.cos(factors["rotation"]) / radius)[:, None, None]
    sin = (np.sin(factors["rotation"]) / radius)[:, None, None]
    dx = grid[None, None, :] - (_MAX_OFFSET * (2.0 * factors["pos_x"] - 1.0))[:, None, None]
    dy = grid[None, :, None] - (_MAX_OFFSET * (2.0 * factors["pos_y"] - 1.0))[:, None, None]
    u = cos * dx + sin * dy  # sprite frame, in units of its radius: (k, 1, W) + (k, H, 1) -> (k, H, W)
    v = cos * dy - sin * dx
    levels = np.rint(np.arange(_SUPERSAMPLE**2 + 1) * (255.0 / _SUPERSAMPLE**2)).astype(np.uint8)
    return levels[_coverage_counts(shape_fn(u, v), size)]


def render_sprites(
    n: int, size: int = 28, seed: int | Sequence[int] = 0
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render `n` dSprites-like images, deterministically from `seed`.

    Returns the images, (n, 1, size, size) uint8 (0 background, 255 inside the shape, anti-aliased edges
    from 4x4 supersampling), and their factors of variation, each an (n,) array:
    `shape` int64 index into `SHAPES`; `scale` float32 in [0, 1) (radius from 25% to 50% of the image
    half-width); `rotation` float32 radians in [0, 2*pi); `pos_x`, `pos_y` float32 in [0, 1) (left to
    right, top to bottom, over the range that keeps the largest shape inside the image).
    The first m images do not depend on `n`.
    """
    if n < 0 or size < 4:
        raise DataError(f"sprites need n >= 0 and size >= 4, got n={n}, size={size}")
    factors = _sprite_factors(n, seed)
    images = np.empty((n, 1, size, size), dtype=np.uint8)
    for shape, shape_fn in enumerate(_SHAPE_FNS):
        members = np.flatnonzero(factors["shape"] == shape)
        for start in range(0, len(members), _CHUNK):
            idx = members[start : start + _CHUNK]
            images[idx, 0] = _render(shape_fn, {k: f[idx] for k, f in factors.items()}, size)
    return images, factors


def _load_sprites(seed: int, num_train: int, num_test: int, image_size: int) -> DataSplits:
    if num_train < 1 or num_test < 1:
        raise DataError(f"sprites need num_train and num_test >= 1, got {num_train} and {num_test}")
    train, _ = render_sprites(num_train, image_size, seed=(seed, 0))
    test, _ = render_sprites(num_test, image_size, seed=(seed, 1))
    return DataSplits(torch.from_numpy(train), torch.from_numpy(test), "sprites")


