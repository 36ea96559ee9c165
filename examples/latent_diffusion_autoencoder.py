"""A latent-diffusion-style KL autoencoder, trained with fastvae's engine.

The model is written as users of latent diffusion write their AutoencoderKL, kept small: a conv encoder of
GroupNorm/SiLU residual blocks and stride-2 downsamplings gives the moments (N, 2*4, H/8, W/8) of q(z|x), a
mirrored decoder maps z (N, 4, H/8, W/8) back to the mean of a Gaussian p(x|z) over (N, C, H, W), and that
Gaussian has a learned log-scale per channel, (C, 1, 1). `build` wraps the modules in a `fastvae.VAE`, so the
engine trains it as any other model (exact resume, the non-finite guard, pictures, torchrun, CUDA graphs).
Likelihoods, KL and ELBO are in nats per image.

From the repository root:

    python -m examples.latent_diffusion_autoencoder                      # coloured sprites, 32x32x3
    python -m examples.latent_diffusion_autoencoder --dataset cifar10 --data-dir DIR
    python -m fastvae.train --model examples.latent_diffusion_autoencoder:build --dataset cifar10 --data-dir DIR

The embedded data are fastvae's sprites (grey shapes, `fastvae.data.render_sprites`) painted in colour:
each sprite gets its own foreground and background colour, drawn deterministically from the seed
(`coloured_sprites`). CIFAR-10 reads the python batches in DIR, as `--dataset cifar10` of fastvae.train does.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

import fastvae
from fastvae.checkpoint import CheckpointError
from fastvae.data import DataError, render_sprites
from fastvae.options import ConfigError

MODEL = "examples.latent_diffusion_autoencoder:build"
"""This module's factory as `--model` and config.json name it."""

_GROUPS = 32  # GroupNorm groups, as latent diffusion has them; fewer where a layer has fewer channels


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(_GROUPS, channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """(N, c_in, h, w) -> (N, c_out, h, w): two GroupNorm, SiLU, 3x3 conv stages added to the input (through
    a 1x1 conv where the channels change)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
            _norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
        )  # fmt: skip
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class Upsample(nn.Module):
    """(N, c, h, w) -> (N, c, 2h, 2w): nearest-neighbour doubling, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """x (N, C, H, W) -> moments (N, 2 * latent_channels, H / 2^L, W / 2^L), L = len(channels): mu, then
    logvar along dim 1. Level i is a ResnetBlock to channels[i] and a stride-2 3x3 conv; then a middle
    block, GroupNorm, SiLU, a 3x3 conv to the moments and the 1x1 `quant_conv` of an AutoencoderKL."""

    def __init__(self, in_channels: int, channels: Sequence[int], latent_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 3, padding=1)]
        previous = channels[0]
        for width in channels:
            layers += [ResnetBlock(previous, width), nn.Conv2d(width, width, 3, stride=2, padding=1)]
            previous = width
        layers += [
            ResnetBlock(previous, previous), _norm(previous), nn.SiLU(),
            nn.Conv2d(previous, 2 * latent_channels, 3, padding=1),
        ]  # fmt: skip
        self.body = nn.Sequential(*layers)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.quant_conv(self.body(x))


class Decoder(nn.Module):
    """z (N, latent_channels, h, w) -> the Gaussian mean (N, out_channels, h * 2^L, w * 2^L), L = len(channels):
    the 1x1 `post_quant_conv`, a 3x3 conv to channels[-1] and a middle block, then per level, from the last,
    a ResnetBlock to channels[i] and an Upsample; GroupNorm, SiLU and a 3x3 conv to the image channels."""

    def __init__(self, out_channels: int, channels: Sequence[int], latent_channels: int) -> None:
        super().__init__()
        previous = channels[-1]
        layers: list[nn.Module] = [
            nn.Conv2d(latent_channels, latent_channels, 1),  # post_quant_conv
            nn.Conv2d(latent_channels, previous, 3, padding=1),
            ResnetBlock(previous, previous),
        ]
        for width in reversed(channels):
            layers += [ResnetBlock(previous, width), Upsample(width)]
            previous = width
        layers += [_norm(previous), nn.SiLU(), nn.Conv2d(previous, out_channels, 3, padding=1)]
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.body(z)


def build(
    data_shape: Sequence[int],
    channels: Sequence[int] = (16, 32, 64),
    latent_channels: int = 4,
    log_scale_init: float = -2.0,
) -> fastvae.VAE:
    """The factory (`--model examples.latent_diffusion_autoencoder:build`): a KL autoencoder for images of
    data_shape (C, H, W), H and W divisible by 2^len(channels) (8 by default), as a `fastvae.VAE` with the
    latent shape (latent_channels, H / 2^L, W / 2^L), a Gaussian likelihood and a learned log sigma per
    image channel (`log_scale_shape` (C, 1, 1)). channels: the width of each downsampling level.
    log_scale_init: the learned log sigma's start, in the data's units ([0, 1] for images): -2 is sigma
    0.14 (latent diffusion's `logvar_init` is a log-variance, 2 * log sigma, 0 there)."""
    if len(data_shape) != 3:
        raise ValueError(f"images of shape (C, H, W) are needed, got data_shape {tuple(data_shape)}")
    widths = [int(w) for w in channels]
    if not widths or min(widths) < 1:
        raise ValueError(f"channels must be one or more positive widths, got {channels!r}")
    c, h, w = (int(d) for d in data_shape)
    factor = 2 ** len(widths)
    if h % factor or w % factor:
        raise ValueError(
            f"H and W must be divisible by {factor} ({len(widths)} stride-2 levels), got data_shape {tuple(data_shape)}"
        )
    model = fastvae.VAE(
        (c, h, w),
        (latent_channels, h // factor, w // factor),
        encoder=Encoder(c, widths, latent_channels),
        decoder=Decoder(c, widths, latent_channels),
        likelihood="gaussian",
        sigma="learned",
        log_scale_shape=(c, 1, 1),
    )
    with torch.no_grad():
        model.log_scale.fill_(log_scale_init)
    return model


def coloured_sprites(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """n of fastvae's sprites painted in colour: (n, 3, size, size) uint8. Sprite i's coverage a (0..1, its
    grey image) mixes its foreground colour, each channel in [0.3, 1], with its background colour, each in
    [0, 0.3]: 255 * (a * fg + (1 - a) * bg). Deterministic in `seed`; the first m images do not depend on n."""
    grey, _ = render_sprites(n, size, seed=(seed, 0))
    coverage = grey.astype(np.float32) / 255.0  # (n, 1, size, size)
    u = np.random.default_rng((seed, 2)).random((n, 2, 3, 1, 1), dtype=np.float32)
    foreground, background = 0.3 + 0.7 * u[:, 0], 0.3 * u[:, 1]
    return np.rint(255.0 * (coverage * foreground + (1.0 - coverage) * background)).astype(np.uint8)


def _widths(text: str) -> list[int]:
    try:
        widths = [int(part) for part in text.split(",")]
    except ValueError:
        widths = []
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive widths such as 16,32,64, got {text!r}")
    return widths


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m examples.latent_diffusion_autoencoder",
        description="Train a small latent-diffusion-style KL autoencoder with fastvae.fit (nats per image).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dataset", choices=("sprites", "cifar10"), default="sprites",
                        help="coloured sprites (embedded, a 10%% test split) or the CIFAR-10 batches in --data-dir")
    parser.add_argument("--data-dir", default="data", help="where the CIFAR-10 python batches are")
    parser.add_argument("--num-images", type=int, default=2048, help="coloured sprites rendered")
    parser.add_argument("--image-size", type=int, default=32, help="side of the sprites, pixels")
    parser.add_argument("--num-train", type=int, help="CIFAR-10: use the first N training images")
    parser.add_argument("--num-test", type=int, help="CIFAR-10: use the first N test images")
    parser.add_argument("--channels", type=_widths, default=[16, 32, 64], help="widths of the levels")
    parser.add_argument("--latent-channels", type=int, default=4, help="channels of z")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam's learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data, the model, the order and z")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", help="run directory (default: runs/<data>-<time>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run (give the same data options)")
    parser.add_argument("--no-pictures", dest="pictures", action="store_false", help="skip the run's pictures")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Train the autoencoder with `fastvae.fit`; prints the run directory and the final test ELBO (nats per
    image). Returns 0, or 2 after an `error:` line."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    options = {
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "device": args.device, "pictures": args.pictures,
        "model_args": {"channels": args.channels, "latent_channels": args.latent_channels},
    }  # fmt: skip
    if args.dataset == "cifar10":
        data = "cifar10"
        options.update(data_dir=args.data_dir, num_train=args.num_train, num_test=args.num_test)
    else:
        data = torch.from_numpy(coloured_sprites(args.num_images, args.image_size, seed=args.seed))
    try:
        run_dir, final = fastvae.fit(MODEL, data, out=args.out, resume=args.resume, **options)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{run_dir}: test ELBO {final['eval']['test_elbo']:.1f} nats per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
