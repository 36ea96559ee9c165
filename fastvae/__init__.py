"""fastvae: variational autoencoders with the ELBO fused into Triton kernels.

The drop-in ops (see docs/drop-in.md):

    z, kl = fastvae.sample_latent(mu, logvar)           # (B, K), (B,) nats
    out = decoder(z)                                     # (B, D)
    loss = fastvae.elbo_loss(x, out, kl, dist="bernoulli")  # scalar, nats per sample

`impl="auto"` runs the Triton kernels on CUDA tensors and the pure-PyTorch reference elsewhere.
"""

from fastvae.functional import (
    elbo_loss,
    elbo_terms,
    iwae_bound,
    log_likelihood,
    sample_latent,
    sample_latent_iw,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "elbo_loss",
    "elbo_terms",
    "iwae_bound",
    "log_likelihood",
    "sample_latent",
    "sample_latent_iw",
]
