"""The fused ops with autograd: an autograd Function per op for eager calls, and the torch custom op
(namespace `fastvae::`) that `torch.compile` traces, both over the same Triton kernels."""

from fastvae.ops.latent import SampleLatent, sample_latent_op
from fastvae.ops.likelihood import ElboLoss, LogLikelihood, elbo_loss_op, elbo_terms_of, log_likelihood_op

__all__ = [
    "ElboLoss",
    "LogLikelihood",
    "SampleLatent",
    "elbo_loss_op",
    "elbo_terms_of",
    "log_likelihood_op",
    "sample_latent_op",
]
