"""The fused latent step with autograd: `SampleLatent` (eager) and the custom op `fastvae::sample_latent`
(what `torch.compile` traces). Both launch the same kernels (`fastvae.kernels.latent`) and share the
gradient wiring; see docs/design.md for why there are two entry points.

Forward and backward are each one launch. What autograd keeps is mu, logvar and the seed; the backward
regenerates eps from it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastvae.kernels.latent import latent_backward, latent_forward

_Grads = tuple[Tensor | None, Tensor | None, None, None]


def _seed_value(seed: Tensor) -> int | Tensor:
    """A custom op's seed tensor as the launcher takes it: a CPU seed by value, a device seed in place."""
    return int(seed) if seed.device.type == "cpu" else seed


def _latent_grads(
    grads: tuple[Tensor | None, ...], mu: Tensor, logvar: Tensor, seed: int | Tensor, samples: int,
    backward: Callable[..., tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor]:
    """d(mu, logvar) from the upstream gradients of (z, kl[, log_ratio]); None for an unused output."""
    grad_z, grad_kl, grad_lr = grads if len(grads) == 3 else (*grads, None)
    if grad_z is None:  # z unused (its KL alone was): no gradient flows through the noise
        grad_z = torch.zeros((samples, *mu.shape), dtype=mu.dtype, device=mu.device)
    return backward(grad_z, grad_kl, grad_lr, mu, logvar, seed)


# ------------------------------------------------------------------------------------------ eager path


class SampleLatent(torch.autograd.Function):
    """`SampleLatent.apply(mu, logvar, seed, samples, log_ratio)` -> z, kl (B,) fp32, and with `log_ratio`
    the log-ratio (S, B) fp32. z is (S, B, K), or (B, K) for samples = 1 without `log_ratio`.

    mu, logvar: (B, K); seed: an int (the eager case) or an int64 (1,) device tensor (while a CUDA graph is
    captured). Launches the kernels directly: no dispatcher round trip.
    """

    @staticmethod
    def forward(ctx, mu: Tensor, logvar: Tensor, seed: int | Tensor, samples: int, log_ratio: bool):
        # (A forward that takes ctx: with a separate setup_context, every call would bind its arguments
        # through inspect.signature, some 10 us.)
        ctx.save_for_backward(mu, logvar)
        ctx.seed, ctx.samples = seed, samples
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zero-filled buffer
        z, kl, lr = latent_forward(mu, logvar, seed, samples, log_ratio, squeeze=not log_ratio)
        return (z, kl, lr) if log_ratio else (z, kl)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple:
        mu, logvar = ctx.saved_tensors
        dmu, dlogvar = _latent_grads(grads, mu, logvar, ctx.seed, ctx.samples, latent_backward)
        return dmu, dlogvar, None, None, None


# ------------------------------------------------------------------------------ the torch.compile path

# The traced graph draws the seed on the CPU and these ops read it on the host, at each call: recorded in a CUDA
# graph (torch.compile's mode="reduce-overhead"), the launch would keep the seed it was recorded with, and
# every replay would repeat its noise. Tagged cudagraph_unsafe, Inductor runs them between its CUDA graphs
# (graph partitioning) or records none of the graph. (A torch without the tag does not partition graphs by
# default either: there the graph's CPU draw keeps the whole graph out of CUDA graphs.)
_OUTSIDE_CUDA_GRAPHS = {"tags": (torch.Tag.cudagraph_unsafe,)} if hasattr(torch.Tag, "cudagraph_unsafe") else {}


@torch.library.custom_op("fastvae::sample_latent", mutates_args=(), **_OUTSIDE_CUDA_GRAPHS)
def sample_latent_op(mu: Tensor, logvar: Tensor, seed: Tensor, samples: int) -> tuple[Tensor, Tensor, Tensor]:
    """mu, logvar (B, K); seed int64 (1,) on the CPU or mu's device. Returns z (S, B, K), kl (B,) fp32,
    log_ratio (S, B) fp32."""
    return latent_forward(mu, logvar, _seed_value(seed), samples)


@sample_latent_op.register_fake
def _(mu: Tensor, logvar: Tensor, seed: Tensor, samples: int) -> tuple[Tensor, Tensor, Tensor]:
    B, K = mu.shape
    return (
        mu.new_empty((samples, B, K)),
        mu.new_empty((B,), dtype=torch.float32),
        mu.new_empty((samples, B), dtype=torch.float32),
    )


@torch.library.custom_op("fastvae::sample_latent_backward", mutates_args=(), **_OUTSIDE_CUDA_GRAPHS)
def sample_latent_backward_op(
    grad_z: Tensor, grad_kl: Tensor | None, grad_log_ratio: Tensor | None, mu: Tensor, logvar: Tensor, seed: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients (S, B, K), (B,) or None, (S, B) or None of z, kl, log_ratio -> dmu, dlogvar (B, K)."""
    return latent_backward(grad_z, grad_kl, grad_log_ratio, mu, logvar, _seed_value(seed))


@sample_latent_backward_op.register_fake
def _(grad_z, grad_kl, grad_log_ratio, mu, logvar, seed):
    return torch.empty_like(mu, memory_format=torch.contiguous_format), torch.empty_like(
        logvar, memory_format=torch.contiguous_format
    )


def _setup_context(ctx, inputs, output) -> None:
    mu, logvar, seed, samples = inputs
    ctx.save_for_backward(mu, logvar, seed)
    ctx.samples = samples
    ctx.set_materialize_grads(False)


def _backward(ctx, *grads: Tensor | None) -> _Grads:
    mu, logvar, seed = ctx.saved_tensors
    return *_latent_grads(grads, mu, logvar, seed, ctx.samples, sample_latent_backward_op), None, None


sample_latent_op.register_autograd(_backward, setup_context=_setup_context)
