"""`fastvae.fit(model, data, ...)`: `python -m fastvae.train` from Python, for your own model.

A thin front of `fastvae.train.train`: the options become the command line they stand for, checked by the
same parser, and the run goes through the same engine, with the same files and guarantees (exact resume,
the signals, the non-finite guard, pictures, --compile, --cuda-graphs, data-parallel under torchrun).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from fastvae.data import ARRAY
from fastvae.model import VAE
from fastvae.options import ConfigError, build_parser, explicit_options
from fastvae.own_model import GivenModel, spec_of

_OWN_ARGUMENTS = ("help", "dataset", "model", "out", "resume")  # fit's parameters, not **options


class FitOptionError(ConfigError, TypeError):
    """An option `fastvae.fit` does not know, or a value its command-line option refuses: one line naming it."""


def option_names() -> tuple[str, ...]:
    """The names `fastvae.fit` takes as **options: the dests of `python -m fastvae.train`'s options."""
    return tuple(a.dest for a in build_parser()._actions if a.dest not in _OWN_ARGUMENTS)


def _words(action: argparse.Action, name: str, value: Any) -> list[str]:
    """The command-line words that option `name` (its argparse `action`) = `value` stands for ([] for None)."""
    flag = action.option_strings[0]
    if value is None:
        return []
    if action.nargs == 0 or (action.nargs == "?" and isinstance(value, bool)):  # a flag
        if not isinstance(value, bool):
            raise FitOptionError(f"{name}={value!r}: expected True or False")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else f"--no-{flag[2:]}"]
        return [flag] if value else []
    if isinstance(action, argparse._AppendAction):  # --hidden: sizes
        sizes = [value] if isinstance(value, int) else value
        if not isinstance(sizes, (list, tuple)):
            raise FitOptionError(f"{name}={value!r}: expected an int or a sequence of ints")
        return [f"{flag}={','.join(map(str, sizes))}"]
    if isinstance(value, dict):
        return [f"{flag}={json.dumps(value)}"]
    return [f"{flag}={os.fspath(value) if isinstance(value, os.PathLike) else value}"]


def _arguments(options: dict[str, Any]) -> tuple[argparse.Namespace, set[str]]:
    """`options` (dest -> value) parsed as the command line they stand for; FitOptionError for a bad one."""
    parser = build_parser()
    parser.exit_on_error = False  # an ArgumentError, not usage text and an exit
    actions = {a.dest: a for a in parser._actions}
    argv = []
    for name, value in options.items():
        words = _words(actions[name], name, value)
        try:
            parser.parse_args(words)
        except argparse.ArgumentError as err:
            raise FitOptionError(f"{name}={value!r}: {err.message}") from None
        argv += words
    return parser.parse_args(argv), explicit_options(argv)


def fit(
    model: VAE | GivenModel | str,
    data: str | os.PathLike | torch.Tensor | np.ndarray,
    *,
    out: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    **options: Any,
) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Train `model` on `data` with fastvae's engine, as `python -m fastvae.train` does; returns the run
    directory and its last metrics rows, {"train": row, "eval": row} (as in metrics.jsonl, nats per sample).

    model: a `fastvae.VAE` (trained in place), a factory `FACTORY(data_shape, **model_args) -> fastvae.VAE`
    (a callable, or its "MODULE:FACTORY" name) with data_shape the samples' shape, a tuple of ints. A factory
    importable by name is recorded in config.json as MODULE:FACTORY, so that `python -m fastvae.train
    --resume` and `fastvae.load_run` rebuild it; an instance, or a factory defined in __main__ or inside a
    function, is recorded as given in-process, and a resume or `load_run` needs it passed again.
    data: a data set name ("sprites", "mnist", ...), a .npz/.npy/.pt path, or an array or tensor
    (N, D), (N, H, W) or (N, C, H, W): uint8 0..255 or floats, split into train and test as a user's file is
    (`test_fraction`, shuffled by `seed`).
    out, resume: the run directory of a fresh run (`--out`; default runs/<data>-<time>), or the run to
    continue exactly (`--resume`; pass the same model and data again).
    options: the options of `python -m fastvae.train` by their Python names (`option_names()`): epochs,
    batch_size, lr, beta, checkpoint_every, stop_after, cuda_graphs, compile, device, seed, model_args
    (a factory's keyword arguments, a dict), ... with the values the command line would take (True/False
    for flags). With your own model, arch, hidden, latent_dim, likelihood and sigma are refused.

    Raises FitOptionError for an unknown option or a bad value, and the errors that the command line
    prints as `error:` lines (ConfigError, DataError, CheckpointError, TrainingDiverged, ...), each one line.
    At `stop_after` it returns (the rows written so far). A SIGINT or SIGTERM stops the run with a
    checkpoint, then raises KeyboardInterrupt or SystemExit(143).
    """
    unknown = sorted(set(options) - set(option_names()))
    if unknown:
        raise FitOptionError(
            f"fastvae.fit got the unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"it takes {', '.join(option_names())}"
        )
    options = dict(options)
    given: GivenModel | None = None
    if isinstance(model, VAE):
        given = model
    elif isinstance(model, str):
        options["model"] = model
    elif callable(model):
        spec = spec_of(model)
        if spec is None:
            given = model
        else:
            options["model"] = spec
    else:
        raise FitOptionError(
            f"model must be a fastvae.VAE, a factory or its 'MODULE:FACTORY' name, got {type(model).__name__}"
        )
    array = None
    if isinstance(data, (str, os.PathLike)):
        options["dataset"] = os.fspath(data)
    elif isinstance(data, (torch.Tensor, np.ndarray)):
        array = data
    else:
        raise FitOptionError(f"data must be a data set name, a path, or an array or tensor, got {type(data).__name__}")
    options.update(out=out, resume=resume)
    args, explicit = _arguments(options)
    if array is not None:
        args.dataset = ARRAY
    # Imported here: fastvae imports this module, and `python -m fastvae.train` must find fastvae.train unloaded.
    from fastvae.train import SIGNAL_EXIT, RunStopped, train

    try:
        return train(args, Console(), explicit, model=given, data=array)
    except RunStopped as stop:
        if stop.code == 0:  # stop_after
            return stop.run_dir, stop.final
        if stop.code == SIGNAL_EXIT[signal.SIGINT]:
            raise KeyboardInterrupt(f"stopped by SIGINT with a checkpoint in {stop.run_dir}") from None
        raise SystemExit(stop.code) from None
