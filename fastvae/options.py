"""The options of `python -m fastvae.train` and the run config they resolve to.

`build_parser` reads the command line; `check_options` refuses the conflicts argparse does not see;
`make_config` resolves the options, the device and the data into the run's config (config.json), and
`build_model` makes the VAE a config describes. A bad option is a ConfigError (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import fastvae
from fastvae import checks
from fastvae.data import LAYOUTS, TEST_FRACTION, DataSplits
from fastvae.model import ARCHS, VAE


class ConfigError(Exception):
    """A bad combination of options or an unusable device: printed as is, exit code 2."""


def _sigma(text: str) -> float | str:
    if text == "learned":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'learned', got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"sigma must be a positive finite number, got {text}")
    return value


def _positive_ints(text: str) -> list[int]:
    """'400' or '512,256' -> [400] or [512, 256]."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return values


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _float_at_least(minimum: float, strict: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            relation = ">" if strict else ">="
            raise argparse.ArgumentTypeError(f"must be a finite number {relation} {minimum:g}, got {text}")
        return value

    return parse


_positive_float = _float_at_least(0.0, strict=True)
_non_negative_float = _float_at_least(0.0, strict=False)


def _json_object(text: str) -> dict[str, Any]:
    """'{"width": 64}' -> {"width": 64}: a JSON object (--model-args)."""
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"width\": 64}}', got {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object (keyword arguments), got {text!r}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2) instead of the whole usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the options)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: not where the help text gives it, nor a None or False default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m fastvae.train`; a usage error exits with code 2."""
    parser = Parser(
        prog="python -m fastvae.train",
        description="Train a VAE with the fused ELBO. Statistics are in nats per sample.",
        formatter_class=HelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset", default="sprites", help="sprites, mnist, fashion-mnist, cifar10 or a .npz/.npy/.pt path"
    )
    data.add_argument(
        "--data-dir", default="data", help="where the MNIST IDX files or the CIFAR-10 batches are (or go)"
    )
    data.add_argument(
        "--download", action="store_true", help="fetch missing MNIST or CIFAR-10 files with torchvision"
    )
    data.add_argument("--num-train", type=_positive_int, help="use the first N training samples")
    data.add_argument("--num-test", type=_positive_int, help="use the first N test samples")
    data.add_argument("--image-size", type=_positive_int, default=28, help="side of the sprites, pixels")
    data.add_argument(
        "--test-fraction", type=float,
        help="share of your file's samples (after a shuffle seeded by --seed) held out as the test split "
        f"(default {TEST_FRACTION})",
    )
    data.add_argument(
        "--test-data", metavar="PATH",
        help="a .npz/.npy/.pt file of test samples: then the whole --dataset file trains (not with --test-fraction)",
    )
    data.add_argument(
        "--layout", choices=LAYOUTS, default="auto",
        help="axes of a 4-d array in your file: auto reads (N, H, W, C) with C in 1/3/4 as channel-last images",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--likelihood", choices=checks.DISTS, default="gaussian", help="p(x|z): Gaussian mean or Bernoulli logits"
    )
    model.add_argument("--sigma", type=_sigma, default=1.0, help="Gaussian std: a number or 'learned'")
    model.add_argument("--arch", choices=ARCHS, default="mlp", help="fully connected, or two conv layers first")
    model.add_argument(
        "--hidden",
        type=_positive_ints,
        action="append",
        help="hidden layer sizes, repeatable or 512,256 [400]",
    )
    model.add_argument("--latent-dim", type=_positive_int, default=20, help="K, the size of z")
    model.add_argument(
        "--model",
        metavar="MODULE:FACTORY",
        help="your own model: FACTORY(data_shape, **MODEL_ARGS) returns a fastvae.VAE (docs/training.md); "
        "excludes --arch, --hidden, --latent-dim, --likelihood and --sigma",
    )
    model.add_argument(
        "--model-args", type=_json_object, metavar="JSON", help="keyword arguments of --model's factory, a JSON object"
    )
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=_positive_int, default=10, help="passes over the training split")
    train.add_argument(
        "--batch-size", type=_positive_int, default=128, help="samples per step (under torchrun: all ranks')"
    )
    train.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam's learning rate")
    train.add_argument("--beta", type=_non_negative_float, default=1.0, help="weight of the KL term")
    train.add_argument(
        "--kl-warmup", type=_non_negative_int, default=0, help="steps of linear beta warm-up from 0"
    )
    train.add_argument("--iw-samples", type=_positive_int, default=1, help="K > 1 trains on the IWAE_K bound")
    train.add_argument(
        "--fused",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the Triton kernels (default: on CUDA; elsewhere the PyTorch reference)",
    )
    train.add_argument("--compile", action="store_true", help="torch.compile the loss step")
    train.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="capture each training step as one CUDA graph and replay it (CUDA, one process; not yet verified "
        "on a GPU: docs/training.md)",
    )
    train.add_argument("--amp", choices=("off", "bf16"), default="off", help="autocast the forward to bf16")
    train.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    train.add_argument("--seed", type=_non_negative_int, default=0, help="seeds the model, the data order and z")
    out = parser.add_argument_group("output")
    out.add_argument("--out", help="run directory (default: runs/<dataset>-<timestamp>)")
    out.add_argument("--log-every", type=_positive_int, default=50, help="steps between statistics reads")
    out.add_argument(
        "--eval-every",
        type=_non_negative_int,
        default=0,
        help="steps between test evaluations (0: each epoch end)",
    )
    out.add_argument(
        "--overwrite", action="store_true", help="train into an existing non-empty --out (replaces its run files)"
    )
    out.add_argument(
        "--pictures",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="draw the run's pictures at its end (samples, reconstructions, interpolations, manifold, loss)",
    )
    out.add_argument(
        "--tensorboard",
        nargs="?",
        const="",
        metavar="DIR",
        help="also write the scalars and pictures as TensorBoard event files, into DIR (default: RUN_DIR/"
        "tensorboard); needs pip install fastvae[tensorboard]",
    )
    reliable = parser.add_argument_group("checkpoints and resume (see docs/training.md)")
    reliable.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its checkpoint.pt (a completed run: write its missing pictures); "
        "only --epochs, --log-every, --checkpoint-every, --pictures, --tensorboard, --device, --data-dir, "
        "--download and --stop-after may be given anew, and --dataset/--test-data as a moved copy of the run's file",
    )
    reliable.add_argument(
        "--auto-resume",
        action="store_true",
        help="resume the run in --out if it holds one (its settings must match, as with --resume), else start "
        "it there afresh (for torchrun --max-restarts and a scheduler's requeue)",
    )
    reliable.add_argument(
        "--from-previous",
        action="store_true",
        help="with --resume: continue from checkpoint.prev.pt, the checkpoint before the latest (when the "
        "latest is damaged; it is kept as checkpoint.damaged.pt)",
    )
    reliable.add_argument(
        "--checkpoint-every",
        type=_non_negative_int,
        default=0,
        help="steps between checkpoints, besides the one at each epoch end (0: epoch ends only)",
    )
    reliable.add_argument(
        "--dist-timeout",
        type=_positive_float,
        default=300.0,
        metavar="SECONDS",
        help="under torchrun: how long a process waits for the others at a collective before the run stops "
        "with an error naming the process that stopped answering (default 300)",
    )
    reliable.add_argument(
        "--stop-after",
        type=_positive_int,
        metavar="STEPS",
        help="stop once the run has done STEPS steps in all, with a checkpoint to --resume from (exit code 0)",
    )
    return parser


def explicit_options(argv: Sequence[str]) -> set[str]:
    """The settings (dests) given on the command line `argv`, as opposed to their defaults."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def check_options(args: argparse.Namespace, explicit: set[str]) -> None:
    """Conflicts between options that argparse does not see; each a one-line ConfigError."""
    if args.resume is not None and args.overwrite:
        raise ConfigError(
            "--resume and --overwrite exclude each other: --resume continues a run, --overwrite starts one afresh"
        )
    if args.resume is not None and "out" in explicit:
        raise ConfigError("--resume RUN_DIR names the run directory already; leave out --out")
    if args.resume is not None:
        return  # the other settings come from the run; resume_settings checks what was given anew
    if "sigma" in explicit and args.likelihood != "gaussian":
        raise ConfigError(f"--sigma applies to --likelihood gaussian only, not {args.likelihood}")
    if "image_size" in explicit and args.dataset != "sprites":
        raise ConfigError(f"--image-size applies to --dataset sprites only, not {args.dataset}")
    if args.cuda_graphs and args.compile:
        raise ConfigError(
            "--cuda-graphs and --compile exclude each other: a compiled step draws its noise on the host, which "
            "a replayed graph would repeat; use one of them (--cuda-graphs cuts the host work further)"
        )


def check_cuda_graphs(args: argparse.Namespace, device: torch.device, world_size: int) -> None:
    """--cuda-graphs needs a CUDA device and one process (ConfigError otherwise)."""
    if not args.cuda_graphs:
        return
    if device.type != "cuda":
        raise ConfigError(
            f"--cuda-graphs needs a CUDA device, and the device is {device}; leave it out on this machine"
        )
    if world_size > 1:
        raise ConfigError(
            f"--cuda-graphs runs in one process, and torchrun started {world_size}: graphed steps are not "
            "combined with DistributedDataParallel yet; leave out --cuda-graphs under torchrun"
        )


def resolve_device(name: str | None) -> torch.device:
    """--device NAME, checked (ConfigError); None: cuda when available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists every device type it knows
        raise ConfigError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def resolve_impl(fused: bool | None, device: torch.device) -> str:
    """--fused/--no-fused -> the ops' impl: "auto" (Triton on CUDA), "triton" or "torch"."""
    if fused is None:
        return "auto"
    if not fused:
        return "torch"
    if device.type == "cuda" or (device.type == "cpu" and checks.kernels_on_cpu()):
        return "triton"
    raise ConfigError(
        f"--fused needs a CUDA device for the Triton kernels, and the device is {device}. Use --no-fused "
        "(the PyTorch reference), or set TRITON_INTERPRET=1 to run the kernels on the CPU (very slow)."
    )


def _version(package: str) -> str:
    """The installed version of `package`, or "not installed"."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def make_config(args: argparse.Namespace, device: torch.device, splits: DataSplits) -> dict[str, Any]:
    """Every setting of the run, resolved, plus the data shape and the versions of the software."""
    config = vars(args).copy()
    config.update(
        hidden=[h for group in args.hidden or [[400]] for h in group],
        device=str(device),
        impl=resolve_impl(args.fused, device),
        data_shape=list(splits.sample_shape),
        data_range=list(splits.value_range),
        num_train=len(splits.train),
        num_test=len(splits.test),
        versions={"torch": str(torch.__version__), "triton": _version("triton"), "fastvae": fastvae.__version__},
        data_8bit=splits.train.dtype == torch.uint8,  # 0..255 values: bits per dimension of a Gaussian
        command=" ".join([Path(sys.executable).name, "-m", "fastvae.train", *sys.argv[1:]]),
        started=datetime.now().isoformat(timespec="seconds"),
    )
    config["fused"] = config["impl"] == "triton" or (config["impl"] == "auto" and device.type == "cuda")
    return config


def build_model(config: dict[str, Any]) -> VAE:
    """The VAE a config describes (also used by `fastvae.evaluate`), on the CPU."""
    try:
        return VAE(
            tuple(config["data_shape"]),
            config["latent_dim"],
            arch=config["arch"],
            hidden=tuple(config["hidden"]),
            likelihood=config["likelihood"],
            sigma=config["sigma"],
            beta=config["beta"],
            impl=config["impl"],
        )
    except ValueError as err:
        raise ConfigError(str(err).replace("`", "")) from None
