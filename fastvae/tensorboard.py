"""`--tensorboard [DIR]`: the run's scalars and pictures as TensorBoard event files (torch.utils.tensorboard).

tensorboard is an optional dependency (`pip install fastvae[tensorboard]`); without it `EventLog` raises a
one-line ConfigError. Under torchrun only rank 0 writes, as with metrics.jsonl.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fastvae.options import ConfigError

SKIP = ("kind", "step", "epoch", "wall_time_s")  # the row's coordinates, not scalars


def check_available() -> None:
    """ConfigError (one line) when the tensorboard package is not installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install fastvae[tensorboard]") from None


class EventLog:
    """A TensorBoard SummaryWriter into `log_dir`: `add_row` for the rows of metrics.jsonl, `add_pictures` for PNGs.

    It starts with the rows of `history` (a resumed run's metrics.jsonl so far) and tells TensorBoard to drop
    every earlier event in `log_dir` (purge from step 0): the events then hold this run's rows once each,
    whether --tensorboard was on before the resume (rows written after the last checkpoint are dropped
    with the rest) or is added by it.
    """

    def __init__(self, log_dir: Path, history: Sequence[dict[str, Any]] = ()) -> None:
        check_available()
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=0)
        for row in history:
            self.add_row(row)

    def add_row(self, row: dict[str, Any]) -> None:
        """Each number of a metrics row as the scalar "<kind>/<key>" ("train/elbo", "eval/test_elbo") at its step."""
        for key, value in row.items():
            if key not in SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{row['kind']}/{key}", value, row["step"])
        self.writer.flush()

    def add_pictures(self, paths: Sequence[Path], step: int) -> None:
        """The PNGs `paths` as images "pictures/<name>" at `step`."""
        for path in paths:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"pictures/{path.stem}", pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
