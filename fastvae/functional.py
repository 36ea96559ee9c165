"""The public ops of fastvae: validation, then dispatch to the fused Triton path or the reference.

Shapes: B rows (batch), K latent dimensions, D data dimensions, S Monte Carlo samples.
All log-densities and KLs are fp32 (or wider) and in nats; the per-row ones are summed over K or D.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastvae import checks
from fastvae import reference as ref

# Seeds for the in-kernel Philox generator are drawn from torch's generator on the tensors' device.
_SEED_HIGH = 2**62


def _draw_seed(device: torch.device) -> Tensor:
    return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device)


def _check_latent_inputs(mu: object, logvar: object, samples: object) -> int:
    mu = checks.float_tensor("mu", mu)
    logvar = checks.float_tensor("logvar", logvar)
    if mu.dim() != 2:
        raise ValueError(f"`mu` must have shape (B, K), got {tuple(mu.shape)}")
    if logvar.shape != mu.shape:
        raise ValueError(f"`logvar` must have the shape of `mu` {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    checks.same_device(mu=mu, logvar=logvar)
    if logvar.dtype != mu.dtype:
        raise TypeError(f"`logvar` has dtype {logvar.dtype} but `mu` has {mu.dtype}; they must match")
    return checks.positive_int("samples", samples)


def sample_latent_iw(
    mu: Tensor, logvar: Tensor, *, samples: int = 1, impl: str = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    """Reparameterised samples, analytic KL and importance log-ratios in one pass.

    mu, logvar: (B, K) parameters of q(z|x) = N(mu, exp(logvar)).
    Returns z (S, B, K) in mu's dtype, kl (B,) = KL(q(z|x) || N(0, I)) and
    log_ratio (S, B) = log p(z_s) - log q(z_s|x), both fp32 nats summed over K.
    The fused path draws eps in-kernel from a seed taken from torch's generator, so
    `torch.manual_seed` makes it reproducible; its backward regenerates eps instead of storing it.
    """
    samples = _check_latent_inputs(mu, logvar, samples)
    if checks.resolve_impl(impl, mu=mu, logvar=logvar) == "triton":
        from fastvae.ops import sample_latent_op

        return sample_latent_op(mu, logvar, _draw_seed(mu.device), samples)
    eps = torch.randn((samples, *mu.shape), dtype=mu.dtype, device=mu.device)
    return ref.latent_reference(mu, logvar, eps)


def sample_latent(mu: Tensor, logvar: Tensor, *, samples: int = 1, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """z = mu + exp(0.5*logvar)*eps with eps ~ N(0, I), and the KL to the prior, in one pass.

    mu, logvar: (B, K). Returns z, shape (B, K) or (S, B, K) when samples = S > 1, in mu's dtype,
    and kl (B,) fp32 nats (summed over K). impl: "auto" (Triton on CUDA), "triton" or "torch".
    """
    z, kl, _ = sample_latent_iw(mu, logvar, samples=samples, impl=impl)
    return (z.squeeze(0) if samples == 1 else z), kl


def _check_likelihood_inputs(x: object, out: object, dist: object, log_scale: object) -> Tensor | float | None:
    x = checks.float_tensor("x", x)
    out = checks.float_tensor("out", out)
    checks.choice("dist", dist, checks.DISTS)
    if x.dim() != 2:
        raise ValueError(f"`x` must have shape (B, D) (flatten the data dimensions), got {tuple(x.shape)}")
    if out.dim() not in (2, 3) or out.shape[-2:] != x.shape:
        raise ValueError(
            f"`out` must have shape (B, D) or (S, B, D) matching x {tuple(x.shape)}, got {tuple(out.shape)}"
        )
    checks.same_device(x=x, out=out)
    if log_scale is None:
        return None
    if dist == "bernoulli":
        raise ValueError("`log_scale` applies to dist='gaussian' only; pass log_scale=None for 'bernoulli'")
    if not isinstance(log_scale, Tensor):
        return checks.real_number("log_scale", log_scale)
    checks.float_tensor("log_scale", log_scale)
    checks.same_device(out=out, log_scale=log_scale)
    try:
        shape = torch.broadcast_shapes(log_scale.shape, out.shape)
    except RuntimeError:
        shape = None
    if shape != out.shape:
        raise ValueError(
            f"`log_scale` of shape {tuple(log_scale.shape)} does not broadcast to out's shape {tuple(out.shape)}"
        )
    return log_scale


def _resolve_likelihood_impl(impl: str, x: Tensor, out: Tensor, log_scale: Tensor | float | None) -> str:
    tensors = {"x": x, "out": out}
    if isinstance(log_scale, Tensor):
        tensors["log_scale"] = log_scale
    return checks.resolve_impl(impl, **tensors)


def _split_log_scale(log_scale: Tensor | float | None) -> tuple[Tensor | None, float]:
    """The custom ops take a log-scale tensor, or None with a constant (0.0 = unit variance)."""
    if isinstance(log_scale, Tensor):
        return log_scale, 0.0
    return None, 0.0 if log_scale is None else float(log_scale)


def log_likelihood(
    x: Tensor, out: Tensor, *, dist: str = "gaussian", log_scale: Tensor | float | None = None, impl: str = "auto"
) -> Tensor:
    """Per-row log p(x|z), summed over D, normalising constants included, fp32 nats.

    x: (B, D) data. out: decoder output (B, D) or (S, B, D): the Gaussian mean, or Bernoulli logits.
    dist: "gaussian" (N(x | out, exp(log_scale)^2)) or "bernoulli" (x in [0, 1], `out` are logits).
    log_scale: None (unit variance), a float, or a tensor broadcastable to `out` (scalar, (D,),
    (B, D) or (S, B, D)), which may require grad. x and out may have different float dtypes (autocast).
    Returns (B,) or (S, B).
    """
    log_scale = _check_likelihood_inputs(x, out, dist, log_scale)
    if _resolve_likelihood_impl(impl, x, out, log_scale) == "triton":
        from fastvae.ops import log_likelihood_op

        return log_likelihood_op(x, out, *_split_log_scale(log_scale), dist)
    return ref.log_likelihood_reference(x, out, dist, log_scale)


def elbo_terms(
    x: Tensor,
    out: Tensor,
    kl: Tensor,
    *,
    dist: str = "gaussian",
    log_scale: Tensor | float | None = None,
    beta: float = 1.0,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """`elbo_loss` plus the detached per-row log p(x|z) (S*B,) fp32 nats it was computed from."""
    log_scale = _check_likelihood_inputs(x, out, dist, log_scale)
    kl = checks.float_tensor("kl", kl)
    if kl.shape != x.shape[:1]:
        raise ValueError(f"`kl` must have shape (B,) = {tuple(x.shape[:1])}, got {tuple(kl.shape)}")
    checks.same_device(x=x, kl=kl)
    beta = checks.finite_non_negative("beta", beta)
    if _resolve_likelihood_impl(impl, x, out, log_scale) == "triton":
        from fastvae.ops import elbo_nll_op

        ls_tensor, ls_const = _split_log_scale(log_scale)
        need_dls = ls_tensor is not None and ls_tensor.requires_grad
        nll, logp, *_ = elbo_nll_op(x, out, ls_tensor, ls_const, dist, need_dls)
        return nll + beta * kl.float().mean(), logp.detach()
    return ref.elbo_loss_reference(x, out, kl, dist, log_scale, beta)


def elbo_loss(
    x: Tensor,
    out: Tensor,
    kl: Tensor,
    *,
    dist: str = "gaussian",
    log_scale: Tensor | float | None = None,
    beta: float = 1.0,
    impl: str = "auto",
) -> Tensor:
    """Scalar negative ELBO: mean over the batch of -(log p(x|z) - beta*kl), in nats per sample.

    With out of shape (S, B, D) the log-likelihood is also averaged over the S samples.
    x, out, dist, log_scale: as in `log_likelihood`; kl: (B,), e.g. from `sample_latent`;
    beta: the KL weight, finite and >= 0.
    The fused path computes log p(x|z) and its gradient in one pass over x and out.
    An empty batch gives NaN, as a mean over no rows does in torch.
    """
    return elbo_terms(x, out, kl, dist=dist, log_scale=log_scale, beta=beta, impl=impl)[0]


def iwae_bound(log_px_given_z: Tensor, log_ratio: Tensor) -> Tensor:
    """Importance-weighted lower bound on log p(x) per row, in nats.

    IWAE_S = logsumexp_s(log p(x|z_s) + log p(z_s) - log q(z_s|x)) - log S, with log_px_given_z from
    `log_likelihood` on out of shape (S, B, D) and log_ratio from `sample_latent_iw`; both (S, B).
    Returns (B,). S = 1 gives the ELBO; the bound tightens as S grows.
    """
    log_px_given_z = checks.float_tensor("log_px_given_z", log_px_given_z)
    log_ratio = checks.float_tensor("log_ratio", log_ratio)
    if log_px_given_z.dim() != 2 or log_ratio.shape != log_px_given_z.shape:
        raise ValueError(
            "`log_px_given_z` and `log_ratio` must both have shape (S, B), got "
            f"{tuple(log_px_given_z.shape)} and {tuple(log_ratio.shape)}"
        )
    return ref.iwae_bound(log_px_given_z, log_ratio)


__all__ = ["elbo_loss", "elbo_terms", "iwae_bound", "log_likelihood", "sample_latent", "sample_latent_iw"]
