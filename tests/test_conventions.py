"""docs/drop-in.md's table of conventions, row by row: each library's formula (written out here in a few
lines of torch; none of them is imported) equals its fastvae expression, and both equal torch.distributions.

Every op runs on the reference path and on the kernels (under the interpreter without a GPU), at tiny sizes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_DEVICE, assert_close
from torch.distributions import Bernoulli, Normal, kl_divergence

import fastvae

B, C, H, W = 4, 2, 2, 2  # image-shaped latents and data, (B, C, H, W), as diffusers' autoencoders have them
D = K = C * H * W  # flattened for fastvae's (B, K) and (B, D) calls
IMPLS = ["torch", "triton"]


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(KERNEL_DEVICE)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float32 rounding (fastvae's results are float32 nats; the expectations are float64 sums)."""
    assert_close(actual, expected, torch.float32, scale=math.sqrt(D))


# ------------------------------------------------------------------------- the libraries' formulas


def diffusers_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """`DiagonalGaussianDistribution(moments).kl()`, to N(0, I): per row, summed over dims 1, 2, 3."""
    logvar = logvar.clamp(-30.0, 20.0)
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))


def diffusers_nll(sample: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """`DiagonalGaussianDistribution(moments).nll(sample)`: -log N(sample | mean, exp(logvar)), summed."""
    logvar = logvar.clamp(-30.0, 20.0)
    return 0.5 * (math.log(2 * math.pi) + logvar + (sample - mean).pow(2) / logvar.exp()).sum(dim=(1, 2, 3))


def pythae_kld(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """pythae's VAE: the KL term per row."""
    return -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp(), dim=-1)


def pythae_recon(recon_x: torch.Tensor, x: torch.Tensor, loss: str) -> torch.Tensor:
    """pythae's VAE: the reconstruction loss per row, "mse" (half the squared error, from pythae 0.1.2 on) or
    "bce" (on probabilities); "mse, older" is the mse of pythae before 0.1.2, without the 0.5."""
    if loss == "bce":
        return F.binary_cross_entropy(recon_x, x, reduction="none").sum(dim=-1)
    squared = F.mse_loss(recon_x, x, reduction="none").sum(dim=-1)
    return 0.5 * squared if loss == "mse" else squared


# --------------------------------------------------------------------------------------- the rows


@pytest.fixture
def moments() -> tuple[torch.Tensor, torch.Tensor]:
    """An encoder's (mean, logvar), each (B, C, H, W): an AutoencoderKL's moments chunked along dim 1."""
    mean, logvar = _randn(B, 2 * C, H, W, seed=0).chunk(2, dim=1)
    return mean, 0.5 * logvar


@pytest.mark.parametrize("impl", IMPLS)
def test_the_kl(moments, impl):
    """diffusers' kl(), pythae's KLD and torch's kl_divergence are fastvae's kl (logvar = log sigma^2)."""
    mean, logvar = moments
    _, kl = fastvae.sample_latent(mean.flatten(1), logvar.flatten(1), impl=impl)
    q = Normal(mean.double(), (0.5 * logvar.double()).exp())
    expected = kl_divergence(q, Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    close(kl, expected)
    close(diffusers_kl(mean.double(), logvar.double()), expected)
    close(pythae_kld(mean.double().flatten(1), logvar.double().flatten(1)), expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_the_gaussian_log_p_is_minus_diffusers_nll(moments, impl):
    """diffusers' nll(x) with its logvar is -log_likelihood with log_scale = logvar / 2; logvar itself as
    the log-scale is another distribution (sigma^2 taken for sigma)."""
    mean, logvar = moments
    x = _randn(B, C, H, W, seed=1)
    log_p = fastvae.log_likelihood(x.flatten(1), mean.flatten(1), log_scale=0.5 * logvar.flatten(1), impl=impl)
    expected = Normal(mean.double(), (0.5 * logvar.double()).exp()).log_prob(x.double()).sum(dim=(1, 2, 3))
    close(log_p, expected)
    close(-diffusers_nll(x.double(), mean.double(), logvar.double()), expected)
    mistaken = fastvae.log_likelihood(x.flatten(1), mean.flatten(1), log_scale=logvar.flatten(1), impl=impl)
    assert not torch.allclose(mistaken.double(), expected, rtol=1e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_pythaes_reconstruction_losses(impl):
    """pythae's mse is -log p under N(recon, 1) less its constant D/2 log 2 pi; its older mse (no 0.5) the
    same under sigma^2 = 1/2, less D/2 log pi; its bce on sigmoid(out) is -log p of Bernoulli logits out."""
    x, out = _randn(B, D, seed=2), _randn(B, D, seed=3)
    unit = -Normal(out.double(), 1.0).log_prob(x.double()).sum(-1)
    close(pythae_recon(out.double(), x.double(), "mse"), unit - D / 2 * math.log(2 * math.pi))
    close(-fastvae.log_likelihood(x, out, impl=impl) - D / 2 * math.log(2 * math.pi), pythae_recon(out, x, "mse"))
    half = -Normal(out.double(), math.sqrt(0.5)).log_prob(x.double()).sum(-1)
    close(pythae_recon(out.double(), x.double(), "mse, older"), half - D / 2 * math.log(math.pi))
    older = -fastvae.log_likelihood(x, out, log_scale=-0.5 * math.log(2.0), impl=impl) - D / 2 * math.log(math.pi)
    close(older, pythae_recon(out, x, "mse, older"))
    binary = (x > 0).float()
    bernoulli = -Bernoulli(logits=out.double()).log_prob(binary.double()).sum(-1)
    close(pythae_recon(torch.sigmoid(out.double()), binary.double(), "bce"), bernoulli)
    close(-fastvae.log_likelihood(binary, out, dist="bernoulli", impl=impl), bernoulli)


@pytest.mark.parametrize("impl", IMPLS)
def test_pythaes_vae_loss_and_pyros_mean_field_elbo(impl):
    """pythae's VAE loss is the batch mean of recon + KLD: elbo_loss (less D/2 log 2 pi for "mse"). Pyro's
    TraceMeanField_ELBO (a plate over the batch, analytic KL) is the batch sum: B * elbo_loss."""
    mu, logvar, x = _randn(B, K, seed=4), 0.5 * _randn(B, K, seed=5), (_randn(B, D, seed=6) > 0).float()
    out = _randn(B, D, seed=7)  # the decoder's logits for the drawn z
    _, kl = fastvae.sample_latent(mu, logvar, impl=impl)
    loss = fastvae.elbo_loss(x, out, kl, dist="bernoulli", impl=impl)
    q = Normal(mu.double(), (0.5 * logvar.double()).exp())
    per_row = Bernoulli(logits=out.double()).log_prob(x.double()).sum(-1) - kl_divergence(q, Normal(0.0, 1.0)).sum(-1)
    recon = pythae_recon(torch.sigmoid(out.double()), x.double(), "bce")
    close((recon + pythae_kld(mu.double(), logvar.double())).mean(dim=0), -per_row.mean())
    close(loss, -per_row.mean())
    pyro_mean_field = -per_row.sum()
    close(B * loss, pyro_mean_field)
    recon_x = out  # the decoder's means, for pythae's "mse"
    gaussian = Normal(recon_x.double(), 1.0).log_prob(x.double()).sum(-1) - kl_divergence(q, Normal(0.0, 1.0)).sum(-1)
    constant = D / 2 * math.log(2 * math.pi)
    pythae_mse = pythae_recon(recon_x.double(), x.double(), "mse") + pythae_kld(mu.double(), logvar.double())
    close(pythae_mse.mean(dim=0), -gaussian.mean() - constant)
    close(fastvae.elbo_loss(x, recon_x, kl, impl=impl) - constant, -gaussian.mean() - constant)


def _trace_elbo_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q's (mu, logvar) (B, K), binary x (B, D) and a linear decoder's weight (K, D), to logits."""
    mu, logvar, x = _randn(B, K, seed=8), 0.5 * _randn(B, K, seed=9), (_randn(B, D, seed=10) > 0).float()
    return mu, logvar, x, _randn(K, D, seed=11)


@pytest.mark.parametrize("impl", IMPLS)
def test_pyros_trace_elbo(impl):
    """Pyro's Trace_ELBO with S particles: minus the batch sum of log p(x|z) + log p(z) - log q(z|x) at the
    drawn z, averaged over the particles: sample_latent_iw's log_ratio takes the place of -kl."""
    mu, logvar, x, weight = _trace_elbo_inputs()
    z, _, log_ratio = fastvae.sample_latent_iw(mu, logvar, samples=3, impl=impl)  # (S, B, K), (S, B)
    log_px_z = fastvae.log_likelihood(x, z @ weight, dist="bernoulli", impl=impl)  # (S, B)
    q, zd = Normal(mu.double(), (0.5 * logvar.double()).exp()), z.double()
    log_p_x_z = Bernoulli(logits=zd @ weight.double()).log_prob(x.double()).sum(-1)
    trace_elbo = -(log_p_x_z + Normal(0.0, 1.0).log_prob(zd).sum(-1) - q.log_prob(zd).sum(-1)).sum(-1).mean()
    close(-(log_px_z + log_ratio).sum(-1).mean(), trace_elbo)
    close(log_ratio, Normal(0.0, 1.0).log_prob(zd).sum(-1) - q.log_prob(zd).sum(-1))


def test_the_monte_carlo_kl_averages_to_the_analytic_one():
    """Trace_ELBO's KL term, -log_ratio, is the analytic kl (TraceMeanField_ELBO's) in the mean over many
    draws: within 5 standard errors (on the reference path; the kernels draw the same distribution)."""
    mu, logvar, _, _ = _trace_elbo_inputs()
    samples = 4000
    torch.manual_seed(0)
    _, kl, log_ratio = fastvae.sample_latent_iw(mu, logvar, samples=samples, impl="torch")
    spread = log_ratio.double().std(dim=0) / math.sqrt(samples)
    assert ((log_ratio.double().mean(dim=0) + kl.double()).abs() < 5 * spread).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_torchs_mean_reductions_average_over_the_elements(impl):
    """F.mse_loss and F.binary_cross_entropy_with_logits (reduction "mean") average over the B*D elements,
    fastvae's values sum over D: divide by D (the mse also counts the squared error twice and no constant)."""
    x, out = _randn(B, D, seed=12).sigmoid(), _randn(B, D, seed=13)  # x in (0, 1), as BCE allows
    gaussian = -fastvae.log_likelihood(x, out, impl=impl)
    expected = -Normal(out.double(), 1.0).log_prob(x.double()).mean() - 0.5 * math.log(2 * math.pi)
    close(0.5 * F.mse_loss(out.double(), x.double()), expected)
    close((gaussian.mean() / D - 0.5 * math.log(2 * math.pi)) * 2, F.mse_loss(out, x))
    bernoulli = -fastvae.log_likelihood(x, out, dist="bernoulli", impl=impl)
    expected = -Bernoulli(logits=out.double(), validate_args=False).log_prob(x.double()).mean()
    close(F.binary_cross_entropy_with_logits(out.double(), x.double()), expected)
    close(bernoulli.mean() / D, expected)
