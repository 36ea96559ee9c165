"""The importance-weighted bound on a linear-Gaussian VAE, whose marginal log p(x) is known exactly.

Model: p(z) = N(0, I_K), p(x|z) = N(W z + b, sigma^2 I_D), so p(x) = N(b, W W^T + sigma^2 I_D).
The encoder is linear with the exact posterior mean and a deliberately mis-set diagonal variance, so
the ELBO sits well below log p(x) and IWAE_k has room to tighten: ELBO <= IWAE_1 <= IWAE_k <= log p(x)
in expectation, and IWAE_k -> log p(x) as k grows.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import KERNEL_DEVICE
from torch import nn

from fastvae.model import VAE, iwae_log_likelihood

D, K, ROWS, SIGMA = 6, 2, 256, 0.5


class LinearGaussianEncoder(nn.Module):
    """x (N, D) -> (mu, logvar), mu the exact posterior mean, logvar the exact diagonal + `inflate`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, inflate: float) -> None:
        super().__init__()
        precision = torch.eye(K, dtype=torch.float64) + weight.T @ weight / SIGMA**2
        cov = torch.linalg.inv(precision)
        self.register_buffer("gain", (cov @ weight.T / SIGMA**2).float())  # (K, D)
        self.register_buffer("bias", bias)
        self.register_buffer("logvar", (cov.diagonal().log() + inflate).float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = (x - self.bias) @ self.gain.T
        return mu, self.logvar.expand_as(mu)


def linear_gaussian(impl: str = "torch", inflate: float = 1.0) -> tuple[VAE, torch.Tensor, torch.Tensor]:
    """The model, data x (ROWS, D) drawn from it, and the exact log p(x) per row (ROWS,) nats."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(D, K, generator=gen, dtype=torch.float64)
    bias = torch.randn(D, generator=gen, dtype=torch.float64)
    decoder = nn.Linear(K, D)
    with torch.no_grad():
        decoder.weight.copy_(weight)
        decoder.bias.copy_(bias)
    encoder = LinearGaussianEncoder(weight, bias.float(), inflate)
    model = VAE(D, K, encoder=encoder, decoder=decoder, sigma=SIGMA, impl=impl)
    marginal = torch.distributions.MultivariateNormal(bias, weight @ weight.T + SIGMA**2 * torch.eye(D))
    torch.manual_seed(0)
    x = marginal.sample(torch.Size([ROWS]))
    return model, x.float(), marginal.log_prob(x).float()


def _standard_error(values: torch.Tensor) -> torch.Tensor:
    return values.std() / math.sqrt(len(values))


def test_exact_marginal_oracle_is_the_model_density():
    """The oracle: log p(x) = log p(x|z) + log p(z) - log p(z|x) at any z, with the exact posterior."""
    model, x, log_px = linear_gaussian()
    weight = model.decoder.weight.detach().double()
    cov = torch.linalg.inv(torch.eye(K, dtype=torch.float64) + weight.T @ weight / SIGMA**2)
    mean = (x.double() - model.decoder.bias.detach().double()) @ (cov @ weight.T / SIGMA**2).T
    z = mean + torch.randn(ROWS, K, dtype=torch.float64)  # any z works; not only the posterior mean
    with torch.no_grad():
        log_px_given_z = model.log_likelihood(x, model.decode(z.float())).double()
    log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_posterior = torch.distributions.MultivariateNormal(mean, cov).log_prob(z)
    torch.testing.assert_close((log_px_given_z + log_prior - log_posterior).float(), log_px, atol=1e-4, rtol=1e-5)


def test_iwae_bound_tightens_towards_the_exact_log_likelihood():
    model, x, log_px = linear_gaussian()
    torch.manual_seed(2)
    with torch.no_grad():
        elbo = model.elbo(x, samples=50).mean()  # the ELBO itself, up to a small Monte Carlo error
    bounds = {k: iwae_log_likelihood(model, x, k, chunk=500) for k in (1, 10, 100, 5000)}
    exact = log_px.mean()
    gap = exact - elbo
    assert gap > 0.5  # the mis-set variance leaves room for IWAE to tighten
    # IWAE_1 is a one-sample estimate of the ELBO; compare within 4 standard errors over the rows.
    assert abs(bounds[1].mean() - elbo) < 4 * _standard_error(bounds[1] - log_px)
    assert bounds[1].mean() < bounds[10].mean() < bounds[100].mean()
    for k, bound in bounds.items():  # below log p(x) up to 4 standard errors, and tighter with k
        assert (bound - log_px).mean() < 4 * _standard_error(bound - log_px), k
    assert exact - bounds[10].mean() < 0.1 * gap
    assert abs(exact - bounds[5000].mean()) < max(4 * _standard_error(bounds[5000] - log_px), 1e-3)
    assert abs(exact - bounds[5000].mean()) < 0.01 * gap


def test_iwae_chunks_give_the_bound_of_one_draw():
    """With the torch sampler, chunking only changes how the k samples are grouped, not the bound."""
    model, x, _ = linear_gaussian()
    torch.manual_seed(3)
    whole = iwae_log_likelihood(model, x, 64, chunk=64)
    torch.manual_seed(3)
    chunked = iwae_log_likelihood(model, x, 64, chunk=16)  # 16 * 256 * 2 is a multiple of 16
    torch.testing.assert_close(chunked, whole)


def test_iwae_on_the_fused_latent_kernel_approaches_the_exact_log_likelihood():
    """The same bound with the Triton latent and likelihood kernels (on the GPU, or the interpreter on the CPU)."""
    model, x, log_px = linear_gaussian(impl="triton")
    model, x, log_px = model.to(KERNEL_DEVICE), x[:32].to(KERNEL_DEVICE), log_px[:32].to(KERNEL_DEVICE)
    torch.manual_seed(4)
    fused = iwae_log_likelihood(model, x, 400, chunk=200)
    model.impl = "torch"
    torch.manual_seed(4)
    reference = iwae_log_likelihood(model, x, 400, chunk=200)
    gap = (log_px - model.elbo(x, samples=50)).mean()
    # Different noise streams: both estimate the same bound, which is within a small part of the gap.
    assert abs(fused.mean() - reference.mean()) < 0.05 * gap
    assert log_px.mean() - fused.mean() < 0.1 * gap


@pytest.mark.parametrize(("k", "chunk", "name"), [(0, 10, "k"), (10, 0, "chunk")])
def test_iwae_arguments_are_checked(k, chunk, name):
    model, x, _ = linear_gaussian()
    with pytest.raises(ValueError, match=f"`{name}`"):
        iwae_log_likelihood(model, x, k, chunk)
