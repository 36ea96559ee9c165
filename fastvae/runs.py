"""Load a trained run from Python: `model, config = fastvae.load_run("runs/sprites-...", device="cuda")`.

Loading the run of an own model (`--model MODULE:FACTORY`) imports that module and calls its factory, as
unpickling would run code; `load_run(run_dir, model=your_vae)` imports nothing and loads the weights into
the model you pass. Only config.json's MODULE:ATTR string is ever imported, and weights load with
`weights_only`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

import fastvae
from fastvae import checkpoint as ckpt
from fastvae.model import VAE
from fastvae.options import ConfigError
from fastvae.own_model import check_model, run_model


class RunError(Exception):
    """A path that is not a run this fastvae can load; the message names the path and the problem."""


def _written_by(config: dict[str, Any]) -> str:
    """Which fastvae wrote `config`, and which this is: for the messages."""
    version = (config.get("versions") or {}).get("fastvae")
    written = f"written by fastvae {version}" if version else "its config names no fastvae version"
    return f"{written}, this is {fastvae.__version__}"


def _model_of(config: dict[str, Any], weights: dict[str, torch.Tensor], path: Path, given: VAE | None) -> VAE:
    """The VAE that `config` describes (or `given`), with `weights`; RunError when they do not fit."""
    written_by = _written_by(config)
    try:
        if given is not None:
            shape = config.get("data_shape")
            model = check_model(given, given.data_shape if shape is None else shape, "model")
            model.impl = "auto"
        else:
            model = run_model({**config, "impl": "auto"}, config["data_shape"])
    except KeyError as err:
        raise RunError(
            f"{path}: its config has no {err} setting ({written_by}); pass the model to load the weights into: "
            "load_run(run_dir, model=...)"
        ) from None
    except ConfigError as err:
        if given is None and config.get("model_source", "built-in") == "built-in":
            raise RunError(f"{path}: its config describes no model this fastvae builds: {err}") from None
        raise RunError(f"{path}: {err}") from None
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError) as err:
        problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunError(
            f"{path}: its weights do not fit the model its config describes ({written_by}): {problem}"
        ) from None
    return model


def load_run(
    run_dir: str | os.PathLike, device: str | torch.device | None = None, *, model: VAE | None = None
) -> tuple[VAE, dict[str, Any]]:
    """The trained model of a `python -m fastvae.train` (or `fastvae.fit`) run, ready to encode, decode and
    sample, and its config.

    run_dir: the run directory, which holds checkpoint.pt. device: where the model goes (default: cuda when
    available, else cpu); its ops run with impl "auto", so the fused Triton kernels on CUDA.
    model: a `fastvae.VAE` to load the weights into (for a model defined in a notebook or script, or given
    in-process to `fastvae.fit`); nothing is imported then. Without it, a built-in model is built from the
    config and an own model's factory (config.json's "model", MODULE:FACTORY) is imported and called, which
    runs that module's code, as unpickling would.

    Returns (model, config). model: a `fastvae.VAE` in eval mode with the weights of the run's last checkpoint
    (its last epoch's end for a finished run; where it stopped for an interrupted one). config: the run's
    settings as config.json holds them, e.g. config["data_shape"] [C, H, W], config["latent_dim"] K,
    config["likelihood"], config["dataset"].

    Raises RunError (one line naming the file) for a path that is not a run directory, a missing, truncated or
    foreign checkpoint, or one written by another checkpoint format version or a fastvae whose model differs;
    for a factory that cannot be imported or called, a model given in-process that is not passed, or a
    `model` whose data shape or weights do not fit; ValueError for a CUDA device on a machine without one.
    """
    path = Path(run_dir)
    if not path.is_dir():
        what = "is a file, not a run directory" if path.exists() else "does not exist"
        raise RunError(f"{path} {what}: pass the directory that `python -m fastvae.train` wrote (--out)")
    checkpoint_path = path / "checkpoint.pt"
    if not checkpoint_path.is_file():
        raise RunError(
            f"{checkpoint_path} not found: {path} is not a fastvae run directory, or its run stopped before its "
            "first checkpoint"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}: CUDA is not available on this machine; use device='cpu'")
    try:
        state = ckpt.load(checkpoint_path)
    except ckpt.CheckpointError as err:
        raise RunError(str(err)) from None
    config = state["config"]
    return _model_of(config, state["model"], checkpoint_path, model).to(device).eval(), config
