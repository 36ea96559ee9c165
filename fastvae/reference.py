"""Pure-PyTorch reference of every fused op: the direct transcription of the maths.

These functions run on any device and dtype, are differentiable by autograd, and are
what the Triton kernels are tested against. All results are in nats.

Shapes: B rows (batch), K latent dimensions, D data dimensions, S Monte Carlo samples.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def kl_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row, summed over K: (B, K) -> (B,) in nats, fp32 or wider."""
    acc = torch.promote_types(mu.dtype, torch.float32)
    mu, logvar = mu.to(acc), logvar.to(acc)
    return -0.5 * torch.sum(1.0 + logvar - mu.square() - logvar.exp(), dim=-1)


def reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    """z = mu + exp(0.5*logvar) * eps. mu, logvar: (B, K); eps: (S, B, K) -> z (S, B, K), in mu's dtype."""
    acc = torch.promote_types(mu.dtype, torch.float32)
    z = mu.to(acc) + torch.exp(0.5 * logvar.to(acc)) * eps.to(acc)
    return z.to(mu.dtype)


def log_ratio(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    """log p(z) - log q(z|x) per sample, summed over K: (S, B) in nats, fp32 or wider.

    With z = mu + std*eps, log q(z|x) = sum_k -0.5*eps^2 - 0.5*logvar - 0.5*log(2*pi) and
    log p(z) = sum_k -0.5*z^2 - 0.5*log(2*pi); the constants cancel.
    """
    acc = torch.promote_types(mu.dtype, torch.float32)
    mu, logvar, eps = mu.to(acc), logvar.to(acc), eps.to(acc)
    z = mu + torch.exp(0.5 * logvar) * eps
    return torch.sum(0.5 * (eps.square() - z.square() + logvar), dim=-1)


def latent_reference(mu: Tensor, logvar: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The latent step with given noise eps (S, B, K): returns z (S, B, K), kl (B,), log_ratio (S, B)."""
    return reparameterize(mu, logvar, eps), kl_standard_normal(mu, logvar), log_ratio(mu, logvar, eps)


def gaussian_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor | float | None = None) -> Tensor:
    """log N(x | mean, exp(log_scale)^2) per row, summed over the last dim, constants included.

    x: (B, D); mean: (B, D) or (S, B, D); log_scale: None (unit variance), a float, or a tensor
    broadcastable to mean. Returns (B,) or (S, B) in nats, fp32 or wider.
    """
    acc = torch.promote_types(torch.promote_types(x.dtype, mean.dtype), torch.float32)
    diff = x.to(acc) - mean.to(acc)
    if log_scale is None:
        elem = -0.5 * diff.square() - HALF_LOG_2PI
    elif isinstance(log_scale, Tensor):
        ls = log_scale.to(acc)
        elem = -0.5 * diff.square() * torch.exp(-2.0 * ls) - ls - HALF_LOG_2PI
    else:
        elem = -0.5 * diff.square() * math.exp(-2.0 * log_scale) - log_scale - HALF_LOG_2PI
    return torch.sum(elem, dim=-1)


def bernoulli_log_prob(x: Tensor, logits: Tensor) -> Tensor:
    """log Bernoulli(x | sigmoid(logits)) per row, summed over the last dim, computed stably.

    Uses x*l - softplus(l) with softplus(l) = max(l, 0) + log1p(exp(-|l|)), never log(sigmoid).
    x: (B, D) in [0, 1]; logits: (B, D) or (S, B, D). Returns (B,) or (S, B) in nats, fp32 or wider.
    """
    acc = torch.promote_types(torch.promote_types(x.dtype, logits.dtype), torch.float32)
    x, logits = x.to(acc), logits.to(acc)
    softplus = torch.clamp(logits, min=0) + torch.log1p(torch.exp(-logits.abs()))
    return torch.sum(x * logits - softplus, dim=-1)


def log_likelihood_reference(
    x: Tensor, out: Tensor, dist: str = "gaussian", log_scale: Tensor | float | None = None
) -> Tensor:
    """Per-row log p(x|z) for `dist` in {"gaussian", "bernoulli"}; see the two functions above."""
    if dist == "bernoulli":
        return bernoulli_log_prob(x, out)
    return gaussian_log_prob(x, out, log_scale)


def elbo_loss_reference(
    x: Tensor,
    out: Tensor,
    kl: Tensor,
    dist: str = "gaussian",
    log_scale: Tensor | float | None = None,
    beta: float = 1.0,
    with_terms: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Scalar loss mean_{s,b}(-log p(x|z_s)) + beta * mean_b(kl), and its terms: the detached batch means
    (log p - kl, kl, log p), a (3,) tensor in log p's dtype (fp32 or wider); None without `with_terms`."""
    logp = log_likelihood_reference(x, out, dist, log_scale)
    log_px, kl_mean = logp.mean(), kl.to(logp.dtype).mean()
    loss = -log_px + beta * kl_mean
    if not with_terms:
        return loss, None
    return loss, torch.stack([log_px - kl_mean, kl_mean, log_px]).detach()


def iwae_bound(log_px_given_z: Tensor, log_ratio: Tensor) -> Tensor:
    """Importance-weighted bound per row: logsumexp_s(log p(x|z_s) + log p(z_s) - log q(z_s|x)) - log S.

    Both inputs are (S, B) in nats; returns (B,) in nats. S = 1 gives the single-sample ELBO.
    """
    log_w = log_px_given_z + log_ratio
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])
