"""Triton kernels of fastvae, installed as `fastvae.kernels`.

- `latent`: reparameterised sampling + KL + log-ratio, noise drawn and regenerated in-kernel.
- `likelihood`: per-row log p(x|z) for Gaussian (unit, fixed or learned scale) and Bernoulli
  likelihoods, with the gradient computed in the same pass.

Import these through `fastvae` (which registers them as torch custom ops); the launchers here
take already-validated tensors.
"""
