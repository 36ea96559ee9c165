"""The public ops of fastvae: validation, then dispatch to the fused Triton path or the reference.

Shapes: B rows (batch), K latent dimensions, D data dimensions, S Monte Carlo samples.
All log-densities and KLs are fp32 (or wider) and in nats; the per-row ones are summed over K or D.
Latents may also be (B, *latent_shape) (K = prod(latent_shape)) and data (B, *data_shape)
(D = prod(data_shape)): the ops then run on the flattened (B, K) and (B, D) views (copies only of inputs
whose layout cannot be viewed so) and give the results of the flattened call, z and the gradients in the
callers' shapes.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

from fastvae import checks
from fastvae import reference as ref

# The in-kernel Philox generator's seeds are drawn from torch's generators, in [2^31, 2^62): always a
# 64-bit kernel argument, so one compiled variant serves every seed (a smaller seed, which a custom-op call
# may pass, is an i32 argument and has variants of its own).
_SEED_LOW, _SEED_HIGH = 2**31, 2**62


def _ops():
    """`fastvae.ops`, imported on first use (it imports triton) and kept in `_OPS`. Where torch.compile traces,
    imported without reading `_OPS`: Dynamo would guard on that global, which the first call sets, so every
    compiled program would be compiled a second time."""
    global _OPS
    if torch.compiler.is_compiling():
        import fastvae.ops as ops

        return ops
    if _OPS is None:
        import fastvae.ops as ops

        _OPS = ops
    return _OPS


_OPS = None


class DeviceSeeds:
    """Philox seeds counted on the device: the draws are base, base + 1, ..., each a one-element int64 tensor
    that the kernels read from memory. The count lives on the device, so a replayed CUDA graph draws the
    next seed without the host, and `reset(n)` makes the next draw base + n (a run restarting at step n
    draws what it drew the first time). base: an int in [2^31, 2^61).
    """

    def __init__(self, device: torch.device, base: int) -> None:
        if not _SEED_LOW <= base < _SEED_HIGH // 2:
            raise ValueError(f"`base` must be in [2^31, 2^61), got {base}")
        self.base = base
        self.counter = torch.full((1,), base, dtype=torch.int64, device=device)  # the next seed
        self.device = self.counter.device  # with its index

    def reset(self, n: int) -> None:
        """The next draw is base + n (a fill on the device: no host synchronisation)."""
        self.counter.fill_(self.base + n)

    def draw(self) -> Tensor:
        seed = self.counter.clone()
        self.counter.add_(1)
        return seed


_DEVICE_SEEDS: DeviceSeeds | None = None


@contextlib.contextmanager
def device_seeds(seeds: DeviceSeeds) -> Iterator[DeviceSeeds]:
    """Within the block, the fused sampler on `seeds.device` draws its seeds from `seeds`: for the steps of a
    run that captures them in a CUDA graph (its eager steps and its replays then draw the same seeds)."""
    global _DEVICE_SEEDS
    previous, _DEVICE_SEEDS = _DEVICE_SEEDS, seeds
    try:
        yield seeds
    finally:
        _DEVICE_SEEDS = previous


def _draw_seed(device: torch.device) -> int | Tensor:
    """The Philox seed of one fused sampling call on `device`; `torch.manual_seed` reproduces it.

    Normally an int from the CPU generator: no device work, passed with the launch. Within `device_seeds`,
    the next of those seeds. While a CUDA graph is otherwise being captured on `device`: an int64 (1,)
    tensor drawn there by the CUDA generator, which torch keeps graph-safe, so that every replay draws a
    fresh seed, which the kernel reads from memory.
    """
    if _DEVICE_SEEDS is not None and device == _DEVICE_SEEDS.device:
        return _DEVICE_SEEDS.draw()
    if _capturing(device):
        return torch.randint(_SEED_LOW, _SEED_HIGH, (1,), dtype=torch.int64, device=device)
    # The same draw as torch.randint(_SEED_LOW, _SEED_HIGH, ()).item(), in one torch op instead of three.
    _SEED_BUFFER.tensor.random_(_SEED_LOW, _SEED_HIGH)
    return int(_SEED_BUFFER.value)


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream (`device` a CUDA device), or, for a CPU
    device, within the compile-only driver's model of a capture (`fastvae.kernels.compile_only`)."""
    if device.type == "cuda":
        return torch.cuda.is_current_stream_capturing()
    compile_only = sys.modules.get("fastvae.kernels.compile_only")
    return compile_only is not None and compile_only.capturing()


class _SeedBuffer(threading.local):
    """Per thread (two threads drawing at once must not read each other's seed): a CPU int64 scalar that the
    seeds are drawn into, and a numpy view of it that reads the draw without another torch op. On the CPU
    whatever torch's default device, and a normal tensor (an inference tensor, made under inference mode,
    could not be drawn into outside it)."""

    def __init__(self) -> None:
        with torch.inference_mode(False):
            self.tensor = torch.empty((), dtype=torch.int64, device="cpu")
        self.value = self.tensor.numpy()


_SEED_BUFFER = _SeedBuffer()


def _check_latent_inputs(mu: object, logvar: object, samples: object, impl: object) -> str:
    """Checks the latent step's arguments; returns the impl to run: "triton" or "torch"."""
    if (  # the usual case, in one cheap test; anything else gets the detailed checks and their messages
        isinstance(mu, Tensor)
        and isinstance(logvar, Tensor)
        and mu.dim() == 2
        and logvar.shape == mu.shape
        and logvar.dtype == mu.dtype
        and logvar.device == mu.device
        and mu.dtype in checks.KERNEL_DTYPES
        and type(samples) is int
        and samples >= 1
    ):
        if impl == "auto" or impl == "torch":
            return "triton" if impl == "auto" and mu.is_cuda else "torch"
        if impl == "triton" and (mu.is_cuda or checks.kernels_on_cpu()):
            return "triton"
    mu = checks.float_tensor("mu", mu)
    logvar = checks.float_tensor("logvar", logvar)
    if mu.dim() < 2:
        raise ValueError(f"`mu` must have shape (B, K) or (B, *latent_shape), got {tuple(mu.shape)}")
    if logvar.shape != mu.shape:
        raise ValueError(f"`logvar` must have the shape of `mu` {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    checks.same_device(mu=mu, logvar=logvar)
    if logvar.dtype != mu.dtype:
        raise TypeError(f"`logvar` has dtype {logvar.dtype} but `mu` has {mu.dtype}; they must match")
    checks.positive_int("samples", samples)
    return checks.resolve_impl(impl, mu=mu, logvar=logvar)


def _fused_latent(mu: Tensor, logvar: Tensor, samples: int, log_ratio: bool) -> tuple[Tensor, ...]:
    """The fused latent step: the autograd Function, or the custom op when torch.compile traces."""
    if not torch.compiler.is_compiling():
        return (_OPS or _ops()).SampleLatent.apply(mu, logvar, _draw_seed(mu.device), samples, log_ratio)
    seed = torch.randint(_SEED_LOW, _SEED_HIGH, (1,), dtype=torch.int64)  # traced: a CPU draw
    z, kl, lr = _ops().sample_latent_op(mu, logvar, seed, samples)
    if log_ratio:
        return z, kl, lr
    return (z.squeeze(0) if samples == 1 else z), kl


def sample_latent_iw(
    mu: Tensor, logvar: Tensor, *, samples: int = 1, impl: str = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    """Reparameterised samples, analytic KL and importance log-ratios in one pass.

    mu, logvar: (B, K) or (B, *latent_shape), parameters of q(z|x) = N(mu, exp(logvar)).
    Returns z (S, B, K) or (S, B, *latent_shape) in mu's dtype, kl (B,) = KL(q(z|x) || N(0, I)) and
    log_ratio (S, B) = log p(z_s) - log q(z_s|x), both fp32 nats summed over every latent dimension.
    The fused path draws eps in-kernel from a seed taken from torch's generator, so
    `torch.manual_seed` makes it reproducible; its backward regenerates eps instead of storing it.
    """
    impl = _check_latent_inputs(mu, logvar, samples, impl)
    if mu.dim() != 2:  # (B, *latent_shape): the call on (B, K) views, z in the latent shape
        z, kl, log_ratio = sample_latent_iw(mu.flatten(1), logvar.flatten(1), samples=samples, impl=impl)
        return z.unflatten(-1, mu.shape[1:]), kl, log_ratio
    if impl == "triton":
        return _fused_latent(mu, logvar, samples, True)
    eps = torch.randn((samples, *mu.shape), dtype=mu.dtype, device=mu.device)
    return ref.latent_reference(mu, logvar, eps)


def sample_latent(mu: Tensor, logvar: Tensor, *, samples: int = 1, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """z = mu + exp(0.5*logvar)*eps with eps ~ N(0, I), and the KL to the prior, in one pass.

    mu, logvar: (B, K) or (B, *latent_shape), e.g. (B, C, H, W). Returns z of mu's shape, or (S, *mu.shape)
    when samples = S > 1, in mu's dtype, and kl (B,) fp32 nats (summed over every latent dimension).
    impl: "auto" (Triton on CUDA), "triton" or "torch".
    """
    impl = _check_latent_inputs(mu, logvar, samples, impl)
    if mu.dim() != 2:  # (B, *latent_shape): the call on (B, K) views, z in the latent shape
        z, kl = sample_latent(mu.flatten(1), logvar.flatten(1), samples=samples, impl=impl)
        return z.unflatten(-1, mu.shape[1:]), kl
    if impl == "triton":
        return _fused_latent(mu, logvar, samples, False)
    eps = torch.randn((samples, *mu.shape), dtype=mu.dtype, device=mu.device)
    z, kl, _ = ref.latent_reference(mu, logvar, eps)
    return (z.squeeze(0) if samples == 1 else z), kl


def _broadcasts_to(t: Tensor, shape: torch.Size) -> bool:
    """Whether `t` broadcasts to `shape` without growing it."""
    pairs = zip(reversed(t.shape), reversed(shape), strict=False)
    return t.dim() <= len(shape) and all(n == 1 or n == m for n, m in pairs)


def _check_likelihood_inputs(
    x: object, out: object, dist: object, log_scale: object, impl: object
) -> tuple[Tensor | float | None, str]:
    """Checks the likelihood's arguments; returns the log-scale (a tensor, a float or None) and the impl to
    run: "triton" or "torch"."""
    if (  # the usual cases, in one cheap test; anything else gets the detailed checks and their messages
        isinstance(x, Tensor)
        and isinstance(out, Tensor)
        and x.dim() == 2
        and 2 <= out.dim() <= 3
        and out.shape[-2:] == x.shape
        and x.dtype in checks.KERNEL_DTYPES
        and out.dtype in checks.KERNEL_DTYPES
        and out.device == x.device
        and (dist == "gaussian" or dist == "bernoulli")
        and (
            log_scale is None
            or (
                dist == "gaussian"
                and isinstance(log_scale, Tensor)
                and log_scale.dtype in checks.KERNEL_DTYPES
                and log_scale.device == out.device
                and _broadcasts_to(log_scale, out.shape)
            )
        )
    ):
        if impl == "auto" or impl == "torch":
            return log_scale, "triton" if impl == "auto" and x.is_cuda else "torch"
        if impl == "triton" and (x.is_cuda or checks.kernels_on_cpu()):
            return log_scale, "triton"
    x = checks.float_tensor("x", x)
    out = checks.float_tensor("out", out)
    checks.choice("dist", dist, checks.DISTS)
    if x.dim() < 2:
        raise ValueError(f"`x` must have shape (B, D) or (B, *data_shape), got {tuple(x.shape)}")
    if out.dim() - x.dim() not in (0, 1) or out.shape[out.dim() - x.dim() :] != x.shape:
        raise ValueError(
            f"`out` must have shape (B, *data_shape) or (S, B, *data_shape) matching x {tuple(x.shape)}, "
            f"got {tuple(out.shape)}"
        )
    checks.same_device(x=x, out=out)
    tensors = {"x": x, "out": out}
    if log_scale is not None:
        if dist == "bernoulli":
            raise ValueError("`log_scale` applies to dist='gaussian' only; pass log_scale=None for 'bernoulli'")
        if not isinstance(log_scale, Tensor):
            return checks.real_number("log_scale", log_scale), checks.resolve_impl(impl, **tensors)
        checks.float_tensor("log_scale", log_scale)
        checks.same_device(out=out, log_scale=log_scale)
        flat = x.dim() > 2 and log_scale.shape == (x.shape[1:].numel(),)
        if not (flat or _broadcasts_to(log_scale, out.shape)):
            also = f", nor is it the flattened (D,) = ({x.shape[1:].numel()},)" if x.dim() > 2 else ""
            raise ValueError(
                f"`log_scale` of shape {tuple(log_scale.shape)} does not broadcast to out's shape "
                f"{tuple(out.shape)}{also}"
            )
        tensors["log_scale"] = log_scale
    return log_scale, checks.resolve_impl(impl, **tensors)


def _flat_data(
    x: Tensor, out: Tensor, log_scale: Tensor | float | None
) -> tuple[Tensor, Tensor, Tensor | float | None]:
    """Checked x (B, *data_shape), out (B, *data_shape) or (S, B, *data_shape) and log-scale as the ops take
    them flattened: views (B, D) and (B, D) or (S, B, D) where the layout allows (contiguous inputs), and a
    log-scale tensor that broadcasts to data_shape expanded to it, then flattened (so it broadcasts to the
    flat out: (C, 1, 1) becomes (D,)); the flattened (D,) and a number as they are."""
    if isinstance(log_scale, Tensor) and log_scale.shape != (x.shape[1:].numel(),):
        lead = max(0, log_scale.dim() - (x.dim() - 1))
        log_scale = log_scale.expand(*log_scale.shape[:lead], *x.shape[1:]).flatten(lead)
    return x.flatten(1), out.flatten(out.dim() - x.dim() + 1), log_scale


def _check_kl_and_beta(x: Tensor, kl: object, beta: object) -> float | Tensor:
    """`kl` must be a float (B,) tensor on x's device; returns `beta` as a finite float >= 0, or as given when
    it is a one-element float tensor on x's device that needs no gradient (its value is not checked: that
    would cost a host synchronisation)."""
    if not (isinstance(kl, Tensor) and kl.is_floating_point() and kl.dim() == 1 and kl.shape[0] == x.shape[0]):
        kl = checks.float_tensor("kl", kl)
        if kl.shape != x.shape[:1]:
            raise ValueError(f"`kl` must have shape (B,) = {tuple(x.shape[:1])}, got {tuple(kl.shape)}")
    if kl.device != x.device:
        checks.same_device(x=x, kl=kl)
    if type(beta) is float and 0.0 <= beta < math.inf:
        return beta
    if isinstance(beta, Tensor):
        return checks.weight_tensor("beta", beta, x.device)
    return checks.finite_non_negative("beta", beta)


def _split_log_scale(log_scale: Tensor | float | None) -> tuple[Tensor | None, float]:
    """The fused ops take a log-scale tensor, or None with a constant (0.0 = unit variance)."""
    if isinstance(log_scale, Tensor):
        return log_scale, 0.0
    return None, 0.0 if log_scale is None else float(log_scale)


def log_likelihood(
    x: Tensor, out: Tensor, *, dist: str = "gaussian", log_scale: Tensor | float | None = None, impl: str = "auto"
) -> Tensor:
    """Per-row log p(x|z), summed over D, normalising constants included, fp32 nats.

    x: (B, D) or (B, *data_shape) data. out: decoder output of x's shape or (S, *x.shape): the Gaussian
    mean, or Bernoulli logits. dist: "gaussian" (N(x | out, exp(log_scale)^2)) or "bernoulli" (x in [0, 1],
    `out` are logits). log_scale (log sigma, in x's units; not a log-variance): None (unit variance), a
    float, or a tensor broadcastable to `out` (scalar, (D,), (B, D) or (S, B, D); with data (B, *data_shape)
    also the flattened (D,), or one that broadcasts to data_shape such as (C, 1, 1) per channel), which may
    require grad. x and out may have different float dtypes (autocast). Returns (B,) or (S, B), summed over
    every data dimension.
    """
    log_scale, impl = _check_likelihood_inputs(x, out, dist, log_scale, impl)
    if x.dim() != 2:  # (B, *data_shape): the call on the flattened views
        x, out, log_scale = _flat_data(x, out, log_scale)
        return log_likelihood(x, out, dist=dist, log_scale=log_scale, impl=impl)
    if impl == "triton":
        op = _ops().log_likelihood_op if torch.compiler.is_compiling() else (_OPS or _ops()).LogLikelihood.apply
        return op(x, out, *_split_log_scale(log_scale), dist)
    return ref.log_likelihood_reference(x, out, dist, log_scale)


def _elbo(
    x: Tensor,
    out: Tensor,
    kl: Tensor,
    dist: str,
    log_scale: Tensor | float | None,
    beta: float | Tensor,
    impl: str,
    with_terms: bool,
) -> tuple[Tensor, Tensor | None]:
    """`elbo_terms`; without `with_terms` the terms are None (the fused path computes them anyway)."""
    log_scale, impl = _check_likelihood_inputs(x, out, dist, log_scale, impl)
    if x.dim() != 2:  # (B, *data_shape): the call on the flattened views
        x, out, log_scale = _flat_data(x, out, log_scale)
        return _elbo(x, out, kl, dist, log_scale, beta, impl, with_terms)
    beta = _check_kl_and_beta(x, kl, beta)
    if impl != "triton":
        return ref.elbo_loss_reference(x, out, kl, dist, log_scale, beta, with_terms)
    ls_tensor, ls_const = _split_log_scale(log_scale)
    need_dls = ls_tensor is not None and ls_tensor.requires_grad
    if torch.compiler.is_compiling():
        ops = _ops()
        beta_tensor, beta_value = (beta, 0.0) if isinstance(beta, Tensor) else (None, beta)
        loss, state, *_ = ops.elbo_loss_op(x, out, kl, ls_tensor, ls_const, dist, beta_tensor, beta_value, need_dls)
    else:
        ops = _OPS or _ops()  # eager: the module once imported, without _ops()'s compile check
        loss, state = ops.ElboLoss.apply(x, out, kl, ls_tensor, ls_const, dist, beta, need_dls)
    return loss, ops.elbo_terms_of(state) if with_terms else None


def elbo_terms(
    x: Tensor,
    out: Tensor,
    kl: Tensor,
    *,
    dist: str = "gaussian",
    log_scale: Tensor | float | None = None,
    beta: float | Tensor = 1.0,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """`elbo_loss`, and its terms: a detached (3,) fp32 tensor of batch means in nats per sample,
    (log p(x|z) - kl, kl, log p(x|z)): the ELBO with beta = 1, the KL and the log-likelihood (the latter
    also averaged over the S samples). The fused path computes them in the loss's own launches."""
    return _elbo(x, out, kl, dist, log_scale, beta, impl, with_terms=True)


def elbo_loss(
    x: Tensor,
    out: Tensor,
    kl: Tensor,
    *,
    dist: str = "gaussian",
    log_scale: Tensor | float | None = None,
    beta: float | Tensor = 1.0,
    impl: str = "auto",
) -> Tensor:
    """Scalar negative ELBO: mean over the batch of -(log p(x|z) - beta*kl), in nats per sample.

    With out of shape (S, B, D) (or (S, B, *data_shape)) the log-likelihood is also averaged over the S samples.
    x, out, dist, log_scale: as in `log_likelihood`; kl: (B,), e.g. from `sample_latent`;
    beta: the KL weight, finite and >= 0: a float, or a one-element float tensor on x's device (not checked
    then), whose current value the fused kernels read (so a captured CUDA graph follows its updates).
    The fused path computes log p(x|z) and its gradient in one pass over x and out.
    An empty batch gives NaN, as a mean over no rows does in torch.
    """
    return _elbo(x, out, kl, dist, log_scale, beta, impl, with_terms=False)[0]


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
