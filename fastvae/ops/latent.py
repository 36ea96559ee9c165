"""`fastvae::sample_latent`: the fused latent step as a torch custom op with autograd.

Forward and backward are each one Triton launch (see `fastvae.kernels.latent`). What autograd
saves is mu, logvar and the one-element seed; the backward regenerates eps from it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastvae.kernels.latent import latent_backward, latent_forward


@torch.library.custom_op("fastvae::sample_latent", mutates_args=())
def sample_latent_op(mu: Tensor, logvar: Tensor, seed: Tensor, samples: int) -> tuple[Tensor, Tensor, Tensor]:
    """mu, logvar (B, K); seed int64 (1,). Returns z (S, B, K), kl (B,) fp32, log_ratio (S, B) fp32."""
    return latent_forward(mu, logvar, seed, samples)


@sample_latent_op.register_fake
def _(mu: Tensor, logvar: Tensor, seed: Tensor, samples: int) -> tuple[Tensor, Tensor, Tensor]:
    B, K = mu.shape
    return (
        mu.new_empty((samples, B, K)),
        mu.new_empty((B,), dtype=torch.float32),
        mu.new_empty((samples, B), dtype=torch.float32),
    )


@torch.library.custom_op("fastvae::sample_latent_backward", mutates_args=())
def sample_latent_backward_op(
    grad_z: Tensor, grad_kl: Tensor, grad_log_ratio: Tensor, mu: Tensor, logvar: Tensor, seed: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients (S, B, K), (B,), (S, B) of z, kl, log_ratio -> dmu, dlogvar (B, K)."""
    return latent_backward(grad_z, grad_kl, grad_log_ratio, mu, logvar, seed)


@sample_latent_backward_op.register_fake
def _(grad_z, grad_kl, grad_log_ratio, mu, logvar, seed):
    return torch.empty_like(mu, memory_format=torch.contiguous_format), torch.empty_like(
        logvar, memory_format=torch.contiguous_format
    )


def _setup_context(ctx, inputs, output) -> None:
    mu, logvar, seed, _ = inputs
    ctx.save_for_backward(mu, logvar, seed)


def _backward(ctx, grad_z: Tensor, grad_kl: Tensor, grad_log_ratio: Tensor):
    mu, logvar, seed = ctx.saved_tensors
    dmu, dlogvar = sample_latent_backward_op(grad_z, grad_kl, grad_log_ratio, mu, logvar, seed)
    return dmu, dlogvar, None, None


sample_latent_op.register_autograd(_backward, setup_context=_setup_context)
