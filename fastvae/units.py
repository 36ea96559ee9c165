"""A learned sigma's statistics, and bits per dimension (beside nats per sample; docs/maths.md)."""

from __future__ import annotations

import math

import torch

from fastvae.model import VAE, floored_log_scale

LN2 = math.log(2.0)
LN256 = math.log(256.0)


def bits_per_dim(log_likelihood: float, dim: int, likelihood: str, eight_bit: bool) -> float | None:
    """A per-sample log-likelihood bound (nats, an ELBO or IWAE_K: negative for Bernoulli) in bits per dimension.

    Bernoulli: -log p / (D ln 2). Gaussian: a density on 8-bit data scaled to [0, 1] (`eight_bit`), dequantised
    to the 256 levels: (-log p / D + ln 256) / ln 2. None for a Gaussian density on other data, where bits
    per dimension has no meaning.
    """
    if likelihood == "bernoulli":
        return -log_likelihood / (dim * LN2)
    if eight_bit:
        return (-log_likelihood / dim + LN256) / LN2
    return None


@torch.no_grad()
def sigma_stats(model: VAE) -> dict[str, float]:
    """Mean, min and max over the D dimensions of a learned Gaussian sigma (data units, after its floor)."""
    if model.log_scale is None:
        raise ValueError("the model's sigma is not learned")
    sigma = floored_log_scale(model.log_scale.detach().float()).exp()
    return {"mean": sigma.mean().item(), "min": sigma.min().item(), "max": sigma.max().item()}
