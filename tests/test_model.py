"""fastvae.VAE: argument checks, shapes, the loss against the reference maths, fused vs reference parity."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import KERNEL_DEVICE
from torch import nn

from fastvae import reference as ref
from fastvae.functional import sample_latent
from fastvae.model import VAE, floored_log_scale

B, D, K = 8, 16, 3


def tiny(**kwargs) -> VAE:
    torch.manual_seed(0)
    return VAE((1, 4, 4), K, hidden=(12,), **kwargs)


def data(rows: int = B) -> torch.Tensor:
    return torch.rand(rows, D, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"data_shape": (1, 0, 4)}, "data_shape"),
        ({"data_shape": "28x28"}, "data_shape"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"likelihood": "poisson"}, "likelihood"),
        ({"sigma": -1.0}, "sigma"),
        ({"sigma": "learnt"}, "sigma"),
        ({"sigma": 0.5, "likelihood": "bernoulli"}, "sigma"),
        ({"sigma": "learned", "likelihood": "bernoulli"}, "sigma"),
        ({"impl": "cuda"}, "impl"),
        ({"arch": "resnet"}, "arch"),
        ({"hidden": (400, 0)}, "hidden"),
        ({"arch": "conv", "data_shape": (784,)}, "arch"),
        ({"arch": "conv", "data_shape": (1, 30, 30)}, "arch"),
        ({"encoder": nn.Linear(16, 6)}, "encoder"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, name):
    kwargs = {"data_shape": (1, 4, 4), "latent_dim": K, **kwargs}
    with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
        VAE(**kwargs)


def test_method_errors_name_the_argument():
    model = tiny()
    with pytest.raises(ValueError, match="`x`"):
        model.loss(torch.rand(B, D + 1))
    with pytest.raises(TypeError, match="`x`"):
        model.encode(torch.ones(B, D, dtype=torch.long))
    with pytest.raises(ValueError, match="`x` is on meta"):
        model.loss(torch.empty(B, D, device="meta"))
    with pytest.raises(ValueError, match="`z`"):
        model.decode(torch.rand(B, K + 1))
    with pytest.raises(ValueError, match="`n`"):
        model.sample(0)
    with pytest.raises(ValueError, match="`iw_samples`"):
        model.loss(data(), iw_samples=0)
    with pytest.raises(TypeError, match="`beta`"):
        model.loss(data(), beta="1")


def test_bad_custom_modules_are_named():
    model = VAE(D, K, encoder=nn.Linear(D, 2 * K + 1), decoder=nn.Linear(K, D))
    with pytest.raises(ValueError, match="`encoder`"):
        model.encode(data())
    model = VAE(D, K, encoder=nn.Linear(D, 2 * K), decoder=nn.Linear(K, D - 1))
    with pytest.raises(ValueError, match="`decoder`"):
        model.decode(torch.zeros(B, K))


# ------------------------------------------------------------------------------------------- shapes


class TupleEncoder(nn.Module):
    """Takes (N, 1, 4, 4) images (your own encoder gets x in data_shape) and returns (mu, logvar) as a tuple, as
    the contract allows."""

    def __init__(self) -> None:
        super().__init__()
        self.mu, self.logvar = nn.Linear(D, K), nn.Linear(D, K)

    def forward(self, x):
        assert x.shape[1:] == (1, 4, 4)
        return self.mu(x.flatten(1)), self.logvar(x.flatten(1))


class ImageDecoder(nn.Module):
    """Returns (N, C, H, W) images, as the contract allows."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(K, D)

    def forward(self, z):
        return self.linear(z).reshape(-1, 1, 4, 4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"likelihood": "bernoulli"},
        {"sigma": "learned"},
        {"encoder": TupleEncoder(), "decoder": ImageDecoder()},
    ],
)
def test_shapes_and_detached_statistics(kwargs):
    model = tiny(**kwargs)
    images = data().reshape(B, 1, 4, 4)
    out = model.loss(images, iw_samples=3)
    assert out.loss.shape == () and out.loss.requires_grad
    for stat in out[1:]:
        assert stat.shape == () and not stat.requires_grad and torch.isfinite(stat)
    assert model.encode(images)[0].shape == (B, K)
    assert model.decode(torch.zeros(5, B, K)).shape == (5, B, D)
    assert model.reconstruct(images).shape == images.shape
    samples = model.sample(6)
    assert samples.shape == (6, 1, 4, 4)
    if model.likelihood == "bernoulli":
        assert samples.min() >= 0 and samples.max() <= 1


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_conv_architecture(shape):
    torch.manual_seed(0)
    model = VAE(shape, 4, arch="conv", hidden=(32,), likelihood="bernoulli")
    x = torch.rand(2, *shape)
    out = model.loss(x)
    out.loss.backward()
    assert model.decode(torch.zeros(3, 2, 4)).shape == (3, 2, math.prod(shape))
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------- the loss is the maths


def _reference_parts(model: VAE, x: torch.Tensor, eps: torch.Tensor, log_scale):
    """log p(x|z) (S, B), kl (B,), log_ratio (S, B) from the reference ops with the given noise."""
    mu, logvar = model.encode(x)
    z, kl, log_ratio = ref.latent_reference(mu, logvar, eps)
    logp = ref.log_likelihood_reference(x, model.decode(z), model.likelihood, log_scale)
    return logp, kl, log_ratio


@pytest.mark.parametrize(("likelihood", "sigma"), [("gaussian", 0.5), ("bernoulli", 1.0)])
def test_elbo_loss_matches_reference_with_same_noise(likelihood, sigma):
    model, x = tiny(likelihood=likelihood, sigma=sigma, beta=0.7), data()
    torch.manual_seed(3)
    out = model.loss(x)
    torch.manual_seed(3)  # the torch path draws eps = randn(1, B, K) right after encoding
    eps = torch.randn(1, B, K)
    logp, kl, _ = _reference_parts(model, x, eps, math.log(sigma) if likelihood == "gaussian" else None)
    torch.testing.assert_close(out.loss, -logp.mean() + 0.7 * kl.mean())
    torch.testing.assert_close(out.elbo, (logp.mean() - kl.mean()).detach())
    torch.testing.assert_close(out.log_px, logp.mean().detach())


@pytest.mark.parametrize("beta", [1.0, 0.25])
def test_iwae_loss_matches_reference_with_same_noise(beta):
    model, x, s = tiny(sigma="learned"), data(), 5
    with torch.no_grad():
        model.log_scale.normal_(0.0, 0.2)
    torch.manual_seed(4)
    out = model.loss(x, beta=beta, iw_samples=s)
    torch.manual_seed(4)
    logp, kl, log_ratio = _reference_parts(model, x, torch.randn(s, B, K), floored_log_scale(model.log_scale))
    expected = torch.logsumexp(logp + beta * log_ratio, 0) - math.log(s)
    torch.testing.assert_close(out.loss, -expected.mean())
    iwae = torch.logsumexp(logp + log_ratio, 0) - math.log(s)
    torch.testing.assert_close(out.iwae, iwae.mean().detach())
    assert out.iwae > out.elbo  # IWAE_5 beats the 5-sample average ELBO on this batch (not just in mean)
    out.loss.backward()
    assert model.log_scale.grad is not None and model.log_scale.grad.abs().sum() > 0


@pytest.mark.parametrize(("likelihood", "sigma"), [("gaussian", "learned"), ("bernoulli", 1.0)])
def test_fused_loss_and_grads_match_reference(likelihood, sigma):
    """model.loss through the Triton kernels (on the GPU, or the interpreter on the CPU) vs the reference with
    the kernel's eps."""
    fused = tiny(likelihood=likelihood, sigma=sigma, impl="triton").to(KERNEL_DEVICE)
    x = data().to(KERNEL_DEVICE)
    torch.manual_seed(5)
    loss = fused.loss(x).loss
    grads = torch.autograd.grad(loss, list(fused.parameters()))

    # The same seed makes the latent kernel draw the same noise; recover it from z.
    torch.manual_seed(5)
    mu, logvar = fused.encode(x)
    z, _ = sample_latent(mu.detach(), logvar.detach(), impl="triton")
    eps = ((z - mu) / torch.exp(0.5 * logvar)).detach().unsqueeze(0)
    log_scale = None if fused.log_scale is None else floored_log_scale(fused.log_scale)
    logp, kl, _ = _reference_parts(fused, x, eps, log_scale)
    ref_loss = -logp.mean() + kl.mean()
    ref_grads = torch.autograd.grad(ref_loss, list(fused.parameters()))

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    names = [name for name, _ in fused.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")
