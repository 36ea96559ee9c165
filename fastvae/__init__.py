"""fastvae: variational autoencoders with the ELBO fused into Triton kernels.

The drop-in ops (see docs/drop-in.md):

    z, kl = fastvae.sample_latent(mu, logvar)           # (B, K) or (B, *latent_shape), (B,) nats
    out = decoder(z)                                     # (B, D) or (B, *data_shape)
    loss = fastvae.elbo_loss(x, out, kl, dist="bernoulli")  # scalar, nats per sample

`impl="auto"` runs the Triton kernels on CUDA tensors and the pure-PyTorch reference elsewhere.
`fastvae.VAE` is a ready-made model on top of them; `python -m fastvae.train` trains one, and
`model, config = fastvae.load_run(RUN_DIR)` loads the trained model back. `fastvae.fit(model, data, **options)`
trains your own model with the same engine.
"""

from fastvae.fit import FitOptionError, fit
from fastvae.functional import (
    elbo_loss,
    elbo_terms,
    iwae_bound,
    log_likelihood,
    sample_latent,
    sample_latent_iw,
)
from fastvae.model import VAE, LossOutput, iwae_log_likelihood
from fastvae.runs import RunError, load_run

__version__ = "0.1.0"

__all__ = [
    "FitOptionError",
    "VAE",
    "LossOutput",
    "RunError",
    "__version__",
    "elbo_loss",
    "elbo_terms",
    "fit",
    "iwae_bound",
    "iwae_log_likelihood",
    "load_run",
    "log_likelihood",
    "sample_latent",
    "sample_latent_iw",
]
