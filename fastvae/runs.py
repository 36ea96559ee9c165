"""Load a trained run from Python: `model, config = fastvae.load_run("runs/sprites-...", device="cuda")`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

import fastvae
from fastvae import checkpoint as ckpt
from fastvae.model import VAE
from fastvae.options import ConfigError, build_model


class RunError(Exception):
    """A path that is not a run this fastvae can load; the message names the path and the problem."""


def _model_of(config: dict[str, Any], weights: dict[str, torch.Tensor], path: Path) -> VAE:
    """The VAE that `config` describes, with `weights`; RunError when they do not fit this fastvae."""
    written_by = f"written by fastvae {config.get('versions', {}).get('fastvae', '?')}, this is {fastvae.__version__}"
    try:
        model = build_model({**config, "impl": "auto"})
    except KeyError as err:
        raise RunError(f"{path}: its config has no {err} setting ({written_by})") from None
    except ConfigError as err:
        raise RunError(f"{path}: its config describes no model this fastvae builds: {err}") from None
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError) as err:
        problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunError(
            f"{path}: its weights do not fit the model its config describes ({written_by}): {problem}"
        ) from None
    return model


def load_run(run_dir: str | os.PathLike, device: str | torch.device | None = None) -> tuple[VAE, dict[str, Any]]:
    """The trained model of a `python -m fastvae.train` run, ready to encode, decode and sample, and its config.

    run_dir: the run directory, which holds checkpoint.pt. device: where the model goes (default: cuda when
    available, else cpu); its ops run with impl "auto", so the fused Triton kernels on CUDA.

    Returns (model, config). model: a `fastvae.VAE` in eval mode with the weights of the run's last checkpoint
    (its last epoch's end for a finished run; where it stopped for an interrupted one). config: the run's
    settings as config.json holds them, e.g. config["data_shape"] [C, H, W], config["latent_dim"] K,
    config["likelihood"], config["dataset"].

    Raises RunError (one line naming the file) for a path that is not a run directory, a missing, truncated or
    foreign checkpoint, or one written by another checkpoint format version or a fastvae whose model differs;
    ValueError for a CUDA device on a machine without one.
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
    return _model_of(config, state["model"], checkpoint_path).to(device).eval(), config
