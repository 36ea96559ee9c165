"""The data's shared types: `DataSplits` (a data set's train and test splits) and `DataError`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class DataError(Exception):
    """A data problem to show the user as a clear message (the CLI prints str(err) and exits with code 2)."""


@dataclass(frozen=True)
class DataSplits:
    """The train and test splits of one data set, on the CPU.

    `train` and `test` are (N, C, H, W) uint8 in 0..255 for images, or (N, D) uint8 / float32 in [0, 1]
    for vectors; both splits share the per-sample shape.
    """

    train: torch.Tensor
    test: torch.Tensor
    name: str
    notes: tuple[str, ...] = ()  # one-line remarks for the user, e.g. a layout that was guessed

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample: (C, H, W) or (D,)."""
        return tuple(self.train.shape[1:])

    @property
    def dim(self) -> int:
        """D, the number of values in one flattened sample."""
        return math.prod(self.sample_shape)

    @property
    def value_range(self) -> tuple[float, float]:
        """(min, max) over both splits of the values the model sees: uint8 divided by 255, floats as stored."""
        scale = 255.0 if self.train.dtype == torch.uint8 else 1.0
        lo = min(self.train.min().item(), self.test.min().item()) / scale
        hi = max(self.train.max().item(), self.test.max().item()) / scale
        return float(lo), float(hi)


_MAX_REASON = 200  # characters of a library's error message quoted in a DataError


def _reason(err: BaseException) -> str:
    """The first line of an exception's message, shortened: DataError messages are one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."

