"""Torch custom ops (namespace `fastvae::`) wrapping the Triton kernels, with fake and autograd registrations."""

from fastvae.ops.latent import sample_latent_op
from fastvae.ops.likelihood import elbo_nll_op, log_likelihood_op

__all__ = ["elbo_nll_op", "log_likelihood_op", "sample_latent_op"]
