"""`VAE`: a variational autoencoder whose objective runs through the fused ops of `fastvae.functional`.

Shapes: B rows (batch), latent_shape (K,) or a feature map such as (C, H, W) (`latent_dim`: an int K or
that shape), K = prod(latent_shape) latent dimensions, D = prod(data_shape) data dimensions, S importance
samples. Every log-density, KL and bound is in nats per sample (summed over D or K, averaged over rows where
a single number is returned).

Encoder and decoder contract (for your own modules):

- encoder: x (N, *data_shape) float -> one tensor with mu and logvar in that order along dim 1, (N, 2K) or
  (N, 2C, H, W) as an AutoencoderKL's moments are, or a tuple (mu, logvar), each (N, *latent_shape). logvar
  is the log-variance of the diagonal Gaussian q(z|x). (The built-in modules take x flattened, (N, D).)
- decoder: z (N, *latent_shape) -> (N, D) or (N, *data_shape): the Gaussian mean, or the Bernoulli logits.
  `VAE.decode` flattens any leading sample axes into N before calling it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fastvae import checks
from fastvae.functional import elbo_terms, iwae_bound, log_likelihood, sample_latent, sample_latent_iw

ARCHS = ("mlp", "conv")
_CONV_CHANNELS = (32, 64)  # two stride-2 convolutions: H and W must be divisible by 4


class LossOutput(NamedTuple):
    """The result of `VAE.loss`. Every statistic is detached, on the model's device, in nats per sample.

    loss: the scalar training objective (with grad): -(log p(x|z) - beta*KL) averaged over the batch,
    or the negative importance-weighted bound when iw_samples > 1.
    elbo: batch mean of log p(x|z) - KL (beta = 1). kl: batch mean of KL(q(z|x) || N(0, I)).
    log_px: batch mean of log p(x|z) (also averaged over the importance samples).
    iwae: batch mean of the importance-weighted bound IWAE_S (beta = 1); equals `elbo` when S = 1.
    """

    loss: Tensor
    elbo: Tensor
    kl: Tensor
    log_px: Tensor
    iwae: Tensor


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers between consecutive sizes, with a ReLU after every one but the last."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _conv_grid(data_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) of the feature map after the two stride-2 convolutions of the conv architecture."""
    if len(data_shape) != 3:
        raise ValueError(f"`arch`='conv' needs image data of shape (C, H, W), got data_shape {data_shape}")
    _, h, w = data_shape
    if h % 4 or w % 4:
        raise ValueError(
            f"`arch`='conv' needs H and W divisible by 4, got data_shape {data_shape}, read as (C, H, W) = "
            f"{tuple(data_shape)}: H={h}, W={w}; if the array is channel-last (N, H, W, C), pass --layout nhwc"
        )
    return _CONV_CHANNELS[-1], h // 4, w // 4


class ConvEncoder(nn.Module):
    """x (N, D) -> (N, 2K): two 4x4 stride-2 convolutions (32, 64 channels), then an MLP over `hidden`."""

    def __init__(self, data_shape: tuple[int, int, int], latent_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        c, h, w = _conv_grid(data_shape)
        self.data_shape = data_shape
        self.conv = nn.Sequential(
            nn.Conv2d(data_shape[0], _CONV_CHANNELS[0], 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(_CONV_CHANNELS[0], _CONV_CHANNELS[1], 4, 2, 1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.head = _mlp([c * h * w, *hidden, 2 * latent_dim])

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.conv(x.reshape(-1, *self.data_shape)))


class ConvDecoder(nn.Module):
    """z (N, K) -> (N, D): an MLP over reversed `hidden` to a 64-channel map, then two transposed convs."""

    def __init__(self, data_shape: tuple[int, int, int], latent_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.grid = _conv_grid(data_shape)
        self.body = nn.Sequential(_mlp([latent_dim, *reversed(hidden), math.prod(self.grid)]), nn.ReLU())
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(_CONV_CHANNELS[1], _CONV_CHANNELS[0], 4, 2, 1),
            nn.ReLU(),
            nn.ConvTranspose2d(_CONV_CHANNELS[0], data_shape[0], 4, 2, 1),
            nn.Flatten(),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.deconv(self.body(z).reshape(-1, *self.grid))


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _shape(name: str, value: object) -> tuple[int, ...]:
    """A data shape: an int D or a non-empty sequence of positive ints."""
    dims = (value,) if _is_int(value) else value
    if (
        not isinstance(dims, Sequence)
        or isinstance(dims, str)
        or not dims
        or not all(_is_int(d) and d >= 1 for d in dims)
    ):
        raise ValueError(
            f"`{name}` must be a positive int or a sequence of them, e.g. (1, 28, 28), got {value!r}"
        )
    return tuple(int(d) for d in dims)


def _latent_shape(value: object) -> tuple[int, ...]:
    """latent_dim: an int K, giving (K,), or a latent shape, a non-empty sequence of positive ints."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return _shape("latent_dim", value)
    return (checks.positive_int("latent_dim", value),)


def _hidden(value: object) -> tuple[int, ...]:
    """Hidden layer sizes: a (possibly empty: linear maps) sequence of positive ints."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"`hidden` must be a sequence of layer sizes, e.g. (400,) or (), got {value!r}")
    return tuple(checks.positive_int("hidden", h) for h in value)


# 1/sigma^2 must be a finite float32 for the Gaussian log-density: sigma >= ~5.4e-20.
_MIN_SIGMA = 1e-19

LOG_SCALE_FLOOR = -6.0
"""The lowest log sigma of a learned Gaussian scale: sigma = e^-6 = 0.0025, under one grey level (1/255) of
images in [0, 1]. docs/maths.md gives the reasons for the value."""


def floored_log_scale(raw: Tensor) -> Tensor:
    """The log sigma that a learned `log_scale` parameter `raw` stands for, shaped like it:
    LOG_SCALE_FLOOR + softplus(raw - LOG_SCALE_FLOOR), a soft floor as in the sigma-VAE paper. It never goes
    below the floor, equals `raw` to within log(1 + exp(LOG_SCALE_FLOOR - raw)) (0.0025 at raw = 0), and its
    gradient sigmoid(raw - LOG_SCALE_FLOOR) stays positive, so a scale that reached the floor can rise again."""
    return LOG_SCALE_FLOOR + nn.functional.softplus(raw - LOG_SCALE_FLOOR)


def _sigma(value: object, likelihood: str) -> float | str:
    if value == "learned":
        if likelihood != "gaussian":
            raise ValueError("`sigma`='learned' applies to likelihood='gaussian' only")
        return "learned"
    sigma = checks.real_number("sigma", value)
    if not (math.isfinite(sigma) and sigma >= _MIN_SIGMA):
        raise ValueError(
            f"`sigma` must be a finite number >= {_MIN_SIGMA:g} (1/sigma^2 must fit in float32) or 'learned', "
            f"got {value!r}"
        )
    if likelihood != "gaussian" and sigma != 1.0:
        raise ValueError(
            f"`sigma` applies to likelihood='gaussian' only, got sigma={value!r} with {likelihood!r}"
        )
    return sigma


def _log_scale_shape(value: object, sigma: float | str, data_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a learned `log_scale`: (D,) by default, or a shape that broadcasts to data_shape, such as
    (C, 1, 1) for one sigma per channel. Only with sigma='learned'."""
    dim = math.prod(data_shape)
    if value is None:
        return (dim,)
    if sigma != "learned":
        raise ValueError(f"`log_scale_shape` applies to sigma='learned' only, got sigma={sigma!r}")
    shape = _shape("log_scale_shape", value)
    try:
        fits = shape == (dim,) or torch.broadcast_shapes(shape, data_shape) == data_shape
    except RuntimeError:
        fits = False
    if not fits:
        ones = ", ".join("1" * (len(data_shape) - 1))
        example = f", e.g. ({data_shape[0]}, {ones}) per channel, or be the flattened ({dim},)" if ones else ""
        raise ValueError(f"`log_scale_shape` {shape} must broadcast to data_shape {data_shape}{example}")
    return shape


def _default_modules(
    arch: str, data_shape: tuple[int, ...], latent_dim: int, hidden: Sequence[int]
) -> tuple[nn.Module, nn.Module]:
    if arch == "conv":
        return ConvEncoder(data_shape, latent_dim, hidden), ConvDecoder(data_shape, latent_dim, hidden)
    dim = math.prod(data_shape)
    return _mlp([dim, *hidden, 2 * latent_dim]), _mlp([latent_dim, *reversed(hidden), dim])


class VAE(nn.Module):
    """A VAE with a diagonal Gaussian q(z|x), a N(0, I) prior and a Gaussian or Bernoulli p(x|z).

    data_shape: the shape of one sample, (C, H, W) for images or (D,) (an int D is accepted).
    latent_dim: K, or the shape of a latent, such as (4, 8, 8) for a feature map (your own encoder and
    decoder only). The model keeps it as `latent_shape` ((K,) for an int) and K = prod(latent_shape) as
    `latent_dim`. arch: "mlp" (default) or "conv" (two stride-2 convolutions; (C, H, W) data with
    H and W divisible by 4, e.g. 28 or 32), with fully connected layers of sizes `hidden` (a sequence of
    positive ints; () gives linear maps).
    encoder, decoder: your own modules instead of `arch` (both or neither; see the module docstring).
    likelihood: "gaussian" (the decoder gives the mean) or "bernoulli" (the decoder gives logits).
    sigma: the Gaussian's standard deviation: a fixed finite float >= 1e-19 (1.0, the default, is unit
    variance) or "learned": a parameter `log_scale` of shape `log_scale_shape`, init 0, which the likelihood
    uses as log sigma = floored_log_scale(log_scale) >= LOG_SCALE_FLOOR (-6), expanded to data_shape.
    log_scale_shape: with sigma="learned", (D,) (the default: one sigma per data dimension) or any shape
    that broadcasts to data_shape, such as (C, 1, 1) for one sigma per channel.
    beta: the default weight of the KL term in `loss`, finite and >= 0. impl: "auto", "triton" or
    "torch", passed to every op ("auto" runs the Triton kernels on CUDA tensors).
    """

    def __init__(
        self,
        data_shape: int | Sequence[int],
        latent_dim: int = 20,
        *,
        arch: str = "mlp",
        hidden: Sequence[int] = (400,),
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        likelihood: str = "gaussian",
        sigma: float | str = 1.0,
        log_scale_shape: Sequence[int] | None = None,
        beta: float = 1.0,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.data_shape = _shape("data_shape", data_shape)
        self.dim = math.prod(self.data_shape)
        self.latent_shape = _latent_shape(latent_dim)
        self.latent_dim = math.prod(self.latent_shape)
        self.likelihood = checks.choice("likelihood", likelihood, checks.DISTS)
        self.sigma = _sigma(sigma, self.likelihood)
        self.log_scale_shape = _log_scale_shape(log_scale_shape, self.sigma, self.data_shape)
        self.beta = checks.finite_non_negative("beta", beta)
        self.impl = checks.choice("impl", impl, checks.IMPLS)
        if (encoder is None) != (decoder is None):
            raise ValueError("pass both `encoder` and `decoder`, or neither (to build them from `arch`)")
        if encoder is None:
            self.arch = checks.choice("arch", arch, ARCHS)
            if len(self.latent_shape) > 1:
                raise ValueError(
                    f"`latent_dim`={latent_dim!r}, a latent shape, needs your own `encoder` and `decoder`; "
                    f"arch={self.arch!r} takes an int K"
                )
            encoder, decoder = _default_modules(self.arch, self.data_shape, self.latent_dim, _hidden(hidden))
        else:
            if arch != "mlp":
                raise ValueError(f"`arch`={arch!r} does not apply to your own `encoder` and `decoder`; leave it out")
            self.arch = "custom"
            for name, module in (("encoder", encoder), ("decoder", decoder)):
                if not isinstance(module, nn.Module):
                    raise TypeError(f"`{name}` must be a torch.nn.Module, got {type(module).__name__}")
        self.encoder = encoder
        self.decoder = decoder
        self.log_scale = nn.Parameter(torch.zeros(self.log_scale_shape)) if self.sigma == "learned" else None

    def extra_repr(self) -> str:
        latent = self.latent_dim if len(self.latent_shape) == 1 else self.latent_shape  # as it was given
        return (
            f"data_shape={self.data_shape}, latent_dim={latent}, likelihood={self.likelihood!r}, "
            f"sigma={self.sigma!r}, beta={self.beta}, impl={self.impl!r}"
        )

    # ------------------------------------------------------------------------------------------ checks

    def _device(self) -> torch.device | None:
        tensor = next(self.parameters(), None)
        return None if tensor is None else tensor.device

    def _on_device(self, name: str, t: Tensor) -> None:
        device = self._device()
        if device is not None and t.device != device:
            raise ValueError(f"`{name}` is on {t.device} but the model is on {device}; move it with .to()")

    def _same_dtype(self, name: str, t: Tensor) -> None:
        """The built-in modules need inputs in their parameters' dtype (autocast does the casting itself)."""
        if self.arch == "custom" or torch.is_autocast_enabled(t.device.type):
            return
        param = next(self.parameters(), None)
        if param is not None and t.dtype != param.dtype:
            raise TypeError(
                f"`{name}` has dtype {t.dtype} but the model's parameters are {param.dtype}; convert it with "
                f"{name}.to({param.dtype}) (or the model with model.to({t.dtype})), or use torch.autocast"
            )

    def _flat(self, x: object) -> Tensor:
        """Data (B, D) or (B, *data_shape) -> (B, D), checked."""
        x = checks.float_tensor("x", x)
        if x.dim() < 2 or x.shape[1:] not in (torch.Size([self.dim]), torch.Size(self.data_shape)):
            raise ValueError(
                f"`x` must have shape (B, {self.dim}) or (B, *{self.data_shape}), got {tuple(x.shape)}"
            )
        self._on_device("x", x)
        self._same_dtype("x", x)
        return x.reshape(len(x), self.dim)

    # -------------------------------------------------------------------------------------- the model

    def log_sigma(self) -> Tensor | float | None:
        """The log sigma of the Gaussian likelihood, as the ops take it (`log_scale=`): for sigma='learned'
        the parameter `log_scale` above its floor, `floored_log_scale(log_scale)`, as a (D,) tensor (the
        flattened data_shape, which the ops take with x (B, D) and (B, *data_shape) alike; a `log_scale_shape`
        such as (C, 1, 1) is expanded to data_shape first) that carries the gradient; log(sigma), a float,
        for a fixed sigma; None for sigma 1 (unit variance) and for a Bernoulli likelihood. Not a
        log-variance: logvar = 2 * log sigma."""
        if self.log_scale is not None:
            log_sigma = floored_log_scale(self.log_scale)
            if log_sigma.shape != (self.dim,):
                log_sigma = log_sigma.expand(self.data_shape).reshape(self.dim)
            return log_sigma
        if self.likelihood == "gaussian" and self.sigma != 1.0:
            return math.log(self.sigma)
        return None

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, D) or (B, *data_shape) -> mu, logvar, each (B, *latent_shape), the parameters of q(z|x).
        Your own encoder gets x as (B, *data_shape), the built-in ones as (B, D)."""
        x = self._flat(x)
        h = self.encoder(x.reshape(len(x), *self.data_shape) if self.arch == "custom" else x)
        if isinstance(h, Tensor):
            mu, logvar = h.chunk(2, dim=1) if h.dim() >= 2 and h.shape[1] % 2 == 0 else (h, h)
            got = tuple(h.shape)
        elif isinstance(h, (tuple, list)) and len(h) == 2 and all(isinstance(t, Tensor) for t in h):
            mu, logvar = h
            got = [tuple(t.shape) for t in h]
        else:
            kind = f"a {type(h).__name__} of {len(h)}" if isinstance(h, (tuple, list)) else type(h).__name__
            raise TypeError(f"`encoder` must return a tensor (B, 2K) or a tuple (mu, logvar) of tensors, got {kind}")
        expected = (len(x), *self.latent_shape)
        if tuple(mu.shape) != expected or tuple(logvar.shape) != expected:
            both = (len(x), 2 * self.latent_shape[0], *self.latent_shape[1:])
            if len(self.latent_shape) == 1:
                shapes = f"(B, 2K) = {both} or a tuple of two (B, K) tensors"
            else:
                shapes = f"(B, 2C, ...) = {both} (mu, logvar along dim 1) or a tuple of two {expected} tensors"
            raise ValueError(f"`encoder` must return {shapes}, got {got}")
        if not (mu.is_floating_point() and logvar.is_floating_point()):
            raise TypeError(f"`encoder` must return floating-point tensors, got {mu.dtype} and {logvar.dtype}")
        if mu.dtype != logvar.dtype:
            raise TypeError(f"`encoder` must return mu and logvar of one dtype, got {mu.dtype} and {logvar.dtype}")
        if mu.device != x.device or logvar.device != x.device:
            raise ValueError(f"`encoder` returned tensors on {mu.device} and {logvar.device} for `x` on {x.device}")
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        """z (..., *latent_shape) -> out (..., D): the Gaussian mean or the Bernoulli logits."""
        z = checks.float_tensor("z", z)
        dims = len(self.latent_shape)
        latent = ", ".join(map(str, self.latent_shape))
        if z.dim() < dims + 1 or z.shape[-dims:] != self.latent_shape:
            raise ValueError(f"`z` must have shape (..., B, {latent}), got {tuple(z.shape)}")
        self._on_device("z", z)
        self._same_dtype("z", z)
        lead = z.shape[:-dims]
        n = lead.numel()
        out = self.decoder(z.reshape(n, *self.latent_shape))
        if not isinstance(out, Tensor):
            raise TypeError(f"`decoder` must return a tensor, got {type(out).__name__}")
        if out.shape not in (torch.Size([n, self.dim]), torch.Size([n, *self.data_shape])):
            raise ValueError(
                f"`decoder` must map (N, {latent}) to (N, {self.dim}) or (N, *{self.data_shape}), "
                f"got {tuple(out.shape)} for N = {n}"
            )
        if not out.is_floating_point():
            raise TypeError(f"`decoder` must return a floating-point tensor, got {out.dtype}")
        if out.device != z.device:
            raise ValueError(f"`decoder` returned a tensor on {out.device} for `z` on {z.device}")
        return out.reshape(*lead, self.dim)

    def log_likelihood(self, x: Tensor, out: Tensor) -> Tensor:
        """log p(x|z) per row, nats: x (B, D), out (B, D) or (S, B, D) -> (B,) or (S, B)."""
        return log_likelihood(x, out, dist=self.likelihood, log_scale=self.log_sigma(), impl=self.impl)

    def to_data_space(self, out: Tensor) -> Tensor:
        """Decoder output -> data space, float32: Bernoulli probabilities, or the Gaussian mean itself."""
        return torch.sigmoid(out.float()) if self.likelihood == "bernoulli" else out.float()

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """n draws z ~ N(0, I), decoded: (n, *data_shape) float32 probabilities (Bernoulli) or means."""
        n = checks.positive_int("n", n)
        param = next(self.parameters(), None)
        device = torch.device("cpu") if param is None else param.device
        dtype = torch.float32 if param is None or self.arch == "custom" else param.dtype
        z = torch.randn(n, *self.latent_shape, device=device, dtype=dtype)
        return self.to_data_space(self.decode(z)).reshape(n, *self.data_shape)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Decode the posterior mean of x: float32 in data space, shaped like x."""
        mu, _ = self.encode(x)
        return self.to_data_space(self.decode(mu)).reshape(x.shape)

    def log_px_and_kl(self, x: Tensor, samples: int = 1) -> tuple[Tensor, Tensor]:
        """Per-row log p(x|z) averaged over `samples` draws z ~ q(z|x), and the KL: (B,), (B,) nats."""
        x = self._flat(x)
        mu, logvar = self.encode(x)
        z, kl, _ = sample_latent_iw(mu, logvar, samples=samples, impl=self.impl)
        return self.log_likelihood(x, self.decode(z)).mean(0), kl

    def elbo(self, x: Tensor, samples: int = 1) -> Tensor:
        """Per-row ELBO (beta = 1), `log_px_and_kl`'s log p(x|z) minus the KL: (B,) nats."""
        log_px, kl = self.log_px_and_kl(x, samples)
        return log_px - kl

    def loss(self, x: Tensor, beta: float | Tensor | None = None, iw_samples: int = 1) -> LossOutput:
        """The training objective for a batch x (B, D) or (B, *data_shape); see `LossOutput`.

        beta: the KL weight, finite and >= 0 (default: the model's `beta`), or a one-element tensor on the
        model's device whose current value is used (a captured CUDA graph follows it). x must have at least one
        row, in the dtype of the model's parameters (or under torch.autocast). iw_samples = S > 1 trains on the
        importance-weighted bound IWAE_S, with beta weighting log p(z) - log q(z|x) in each log-weight
        (so S = 1 would give the beta-ELBO); the reported `iwae` always uses beta = 1.
        """
        x = self._flat(x)
        if beta is None:
            beta = self.beta
        elif not isinstance(beta, Tensor):  # a tensor is checked by the ops (its value is not read)
            beta = checks.finite_non_negative("beta", beta)
        samples = checks.positive_int("iw_samples", iw_samples)
        if len(x) == 0:
            raise ValueError(f"`x` is an empty batch (shape {tuple(x.shape)}); the loss is a mean over its rows")
        mu, logvar = self.encode(x)
        if samples == 1:
            z, kl = sample_latent(mu, logvar, impl=self.impl)
            out = self.decode(z)
            loss, terms = elbo_terms(
                x, out, kl, dist=self.likelihood, log_scale=self.log_sigma(), beta=beta, impl=self.impl
            )
            elbo, kl_mean, log_px = terms.unbind()
            return LossOutput(loss, elbo, kl_mean, log_px, elbo)
        z, kl, log_ratio = sample_latent_iw(mu, logvar, samples=samples, impl=self.impl)
        logp = self.log_likelihood(x, self.decode(z))  # (S, B)
        loss = -iwae_bound(logp, beta * log_ratio).mean()
        logp, kl = logp.detach(), kl.detach()
        iwae = iwae_bound(logp, log_ratio.detach()).mean()
        return LossOutput(loss, logp.mean() - kl.mean(), kl.mean(), logp.mean(), iwae)


@torch.no_grad()
def iwae_log_likelihood(model: VAE, x: Tensor, k: int, chunk: int = 100) -> Tensor:
    """The importance-weighted bound log p(x) >= IWAE_k per row: (B,) nats.

    IWAE_k = logsumexp_s(log p(x|z_s) + log p(z_s) - log q(z_s|x)) - log k, z_s ~ q(z|x), s = 1..k.
    The k samples are drawn `chunk` at a time and folded into a running logsumexp, so memory is
    O(chunk * B * D) whatever k. With impl "torch" the chunks draw the same noise as one draw of k
    samples whenever chunk * B * K is a multiple of 16 (how torch's CPU normal sampler fills blocks).
    """
    if not isinstance(model, VAE):
        raise TypeError(f"`model` must be a fastvae.VAE, got {type(model).__name__}")
    k = checks.positive_int("k", k)
    chunk = checks.positive_int("chunk", chunk)
    x = model._flat(x)
    mu, logvar = model.encode(x)
    total = None
    for start in range(0, k, chunk):
        z, _, log_ratio = sample_latent_iw(mu, logvar, samples=min(chunk, k - start), impl=model.impl)
        lse = torch.logsumexp(model.log_likelihood(x, model.decode(z)) + log_ratio, dim=0)
        total = lse if total is None else torch.logaddexp(total, lse)
    return total - math.log(k)
