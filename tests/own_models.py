"""Factories of own models for tests/test_own_model.py: `FACTORY(data_shape, **model_args) -> fastvae.VAE`,
named as `own_models:FACTORY` (tests/ is on the path), and some that break the factory contract."""

from __future__ import annotations

import math

from torch import Tensor, nn

import fastvae


class Encoder(nn.Module):
    """x (N, *data_shape) or (N, D) -> (mu, logvar), each (N, K): a hidden layer of `width` units."""

    def __init__(self, dim: int, width: int, latent: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, width), nn.Tanh())
        self.mu = nn.Linear(width, latent)
        self.logvar = nn.Linear(width, latent)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x.flatten(1))
        return self.mu(h), self.logvar(h)


class Decoder(nn.Module):
    """z (N, K) -> logits or means (N, *data_shape)."""

    def __init__(self, data_shape: tuple[int, ...], width: int, latent: int) -> None:
        super().__init__()
        self.data_shape = data_shape
        self.body = nn.Sequential(nn.Linear(latent, width), nn.Tanh(), nn.Linear(width, math.prod(data_shape)))

    def forward(self, z: Tensor) -> Tensor:
        return self.body(z).reshape(-1, *self.data_shape)


def flat_vae(
    data_shape: tuple[int, ...], width: int = 16, latent: int = 3, likelihood: str = "bernoulli"
) -> fastvae.VAE:
    """A VAE of your own modules with a flat latent z (N, `latent`)."""
    return fastvae.VAE(
        data_shape,
        latent,
        encoder=Encoder(math.prod(data_shape), width, latent),
        decoder=Decoder(data_shape, width, latent),
        likelihood=likelihood,
    )


def not_a_vae(data_shape: tuple[int, ...]) -> nn.Module:
    """Breaks the contract: a module, but no fastvae.VAE."""
    return nn.Linear(math.prod(data_shape), 2)


def other_shape(data_shape: tuple[int, ...]) -> fastvae.VAE:
    """Breaks the contract: a VAE for samples of another shape."""
    return flat_vae((math.prod(data_shape) + 1,))


def failing(data_shape: tuple[int, ...]) -> fastvae.VAE:
    """Breaks the contract: raises."""
    raise RuntimeError(f"cannot build a model for {data_shape}")


NOT_CALLABLE = 3
