"""Charts of a run, drawn with matplotlib's object-oriented API on its Agg canvas: no pyplot, no display,
and no change to matplotlib's global backend."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fastvae.checkpoint import atomic_write

SIZE_INCHES = (7.2, 5.4)
DPI = 100  # loss.png is 720 x 540 pixels


def _plot(axes: Axes, rows: Sequence[Mapping[str, Any]], key: str, label: str, **style: Any) -> None:
    """One line of `rows[i][key]` against `rows[i]["step"]`; a lone point gets a marker, no rows draw nothing."""
    if not rows:
        return
    steps, values = [row["step"] for row in rows], [row[key] for row in rows]
    if len(rows) == 1:
        style.setdefault("marker", "o")
    axes.plot(steps, values, label=label, **style)


def training_curves(history: Sequence[Mapping[str, Any]]) -> Figure:
    """The figure of loss.png from the rows of metrics.jsonl, in nats per sample against the step.

    Top: the train ELBO (each statistics reading, "train" rows) and the test ELBO (each evaluation, "eval"
    rows). Bottom, sharing the step axis: the KL to the prior, train and test.
    """
    train = [row for row in history if row["kind"] == "train"]
    test = [row for row in history if row["kind"] == "eval"]
    figure = Figure(figsize=SIZE_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    elbo, kl = figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    for axes, (train_key, test_key, name) in zip(
        (elbo, kl), (("elbo", "test_elbo", "ELBO"), ("kl", "test_kl", "KL")), strict=True
    ):
        _plot(axes, train, train_key, f"train {name}", color="tab:blue", linewidth=1.5)
        _plot(axes, test, test_key, f"test {name}", color="tab:red", marker="o", markersize=4)
        axes.set_ylabel(f"{name} (nats per sample)")
        axes.grid(True, alpha=0.3)
        if train or test:
            axes.legend(loc="best")  # where it covers the fewest points
    elbo.set_title("ELBO and KL during training")
    kl.set_xlabel("step")
    return figure


def save_training_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Write `training_curves(history)` to `path` as a PNG, atomically."""
    figure = training_curves(history)
    atomic_write(path, lambda f: figure.savefig(f, format="png"))
