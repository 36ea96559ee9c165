"""`fastvae.VAE` with a feature-map latent, as latent diffusion's KL autoencoder has: your own conv encoder gets
images (N, C, H, W) and returns its moments (N, 2c, h, w), your own decoder gets z (N, c, h, w). Every method,
the evaluation and the pictures work on it, and give what the same modules give behind flattening adapters
with an int latent_dim (the model as it was before latent shapes)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastvae
from fastvae import VAE, engine, iwae_log_likelihood
from fastvae.data import DeviceBatches, to_float
from fastvae.evaluate import per_sample_bounds
from fastvae.images import interpolations, latent_manifold
from fastvae.model import floored_log_scale
from fastvae.pictures import RunRecord, draw, pictures_of

DATA_SHAPE = (3, 8, 8)
LATENT_SHAPE = (2, 4, 4)
K = math.prod(LATENT_SHAPE)
B = 4


class MomentsEncoder(nn.Module):
    """(N, 3, 8, 8) -> moments (N, 4, 4, 4): mu and logvar along dim 1; records the shapes it was given."""

    def __init__(self, tuple_output: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(DATA_SHAPE[0], 2 * LATENT_SHAPE[0], 3, stride=2, padding=1)
        self.tuple_output = tuple_output
        self.inputs: list[tuple[int, ...]] = []

    def forward(self, x):
        self.inputs.append(tuple(x.shape))
        moments = self.conv(x.reshape(len(x), *DATA_SHAPE))
        return moments.chunk(2, dim=1) if self.tuple_output else moments


class MapDecoder(nn.Module):
    """z (N, 2, 4, 4) -> images (N, 3, 8, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose2d(LATENT_SHAPE[0], DATA_SHAPE[0], 4, stride=2, padding=1)

    def forward(self, z):
        return self.deconv(z.reshape(len(z), *LATENT_SHAPE))


class Flattened(nn.Module):
    """The adapters of a model with an int latent_dim: moments -> (N, 2K), z (N, K) -> the wrapped decoder."""

    def __init__(self, module: nn.Module, encoder: bool) -> None:
        super().__init__()
        self.module, self.encoder = module, encoder

    def forward(self, t):
        if self.encoder:
            mu, logvar = self.module(t).chunk(2, dim=1)
            return torch.cat([mu.flatten(1), logvar.flatten(1)], dim=1)
        return self.module(t)


def models(impl: str, **kwargs) -> tuple[VAE, VAE]:
    """The feature-map model and its flattened twin, with the same weights."""
    torch.manual_seed(0)
    encoder, decoder = MomentsEncoder(), MapDecoder()
    shaped = VAE(DATA_SHAPE, LATENT_SHAPE, encoder=encoder, decoder=decoder, impl=impl, **kwargs)
    twin_modules = [Flattened(m, enc) for m, enc in ((encoder, True), (decoder, False))]
    flat = VAE(DATA_SHAPE, K, encoder=twin_modules[0], decoder=twin_modules[1], impl=impl, **kwargs)
    if shaped.log_scale is not None:
        with torch.no_grad():
            shaped.log_scale.normal_(0.0, 0.3)
        flat.log_scale = shaped.log_scale
    return shaped, flat


def images(n: int = B) -> torch.Tensor:
    return torch.rand(n, *DATA_SHAPE, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("sigma", [1.0, "learned"])
@pytest.mark.parametrize("iw_samples", [1, 3])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_loss_and_gradients_equal_the_flattened_model(impl, iw_samples, sigma):
    shaped, flat = models(impl, sigma=sigma)
    x = images()
    results, grads = [], []
    for model in (shaped, flat):
        torch.manual_seed(1)
        out = model.loss(x, iw_samples=iw_samples)
        out.loss.backward()
        results.append(torch.stack(list(out)).detach())
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    assert torch.equal(results[0], results[1])
    for g, w in zip(*grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)  # conv weight grads: the same sums


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_methods_give_latent_shapes_and_equal_the_flattened_model(impl):
    shaped, flat = models(impl, likelihood="bernoulli")
    x = images()
    mu, logvar = shaped.encode(x.flatten(1))
    assert mu.shape == logvar.shape == (B, *LATENT_SHAPE)
    assert shaped.encoder.inputs[-1] == (B, *DATA_SHAPE)  # your own encoder gets x in data_shape
    assert torch.equal(torch.cat([mu.flatten(1), logvar.flatten(1)], 1), torch.cat(flat.encode(x), 1))
    z = torch.randn(5, B, *LATENT_SHAPE)
    assert shaped.decode(z).shape == (5, B, math.prod(DATA_SHAPE))
    assert torch.equal(shaped.decode(z), flat.decode(z.flatten(2)))
    assert torch.equal(shaped.reconstruct(x), flat.reconstruct(x))
    for method in (VAE.sample, VAE.elbo, iwae_log_likelihood):
        args = (6,) if method is VAE.sample else (x, 4) if method is iwae_log_likelihood else (x,)
        values = []
        for model in (shaped, flat):
            torch.manual_seed(2)
            values.append(method(model, *args))
        assert torch.equal(*values)
    assert shaped.sample(6).shape == (6, *DATA_SHAPE)


def test_evaluation_and_pictures_work_on_a_feature_map_latent(tmp_path):
    shaped, flat = models("torch", likelihood="bernoulli")
    data = (images(6) * 255).to(torch.uint8)
    for evaluate in (lambda m, t: engine.test_statistics(m, t, "off"), lambda m, t: per_sample_bounds(m, t, 3, 2)):
        values = []
        for model in (shaped, flat):
            torch.manual_seed(3)
            values.append(evaluate(model, DeviceBatches(data, 3, device="cpu", seed=0, drop_last=False)))
        assert values[0] == values[1] if isinstance(values[0], dict) else all(map(torch.equal, *values))
    torch.manual_seed(4)
    assert torch.equal(interpolations(shaped, to_float(data[:4]), 5), interpolations(flat, to_float(data[:4]), 5))
    names, _ = pictures_of(DATA_SHAPE, shaped.latent_dim, len(data))
    assert "manifold.png" not in names  # K = 32: the manifold is for K = 2 only
    history = [{"kind": "eval", "step": 1, "epoch": 0, "test_elbo": -1.0}]
    grids = [name for name in names if name != "loss.png"]  # the pictures of the model
    paths = draw(grids, RunRecord(shaped, data, history, "tiny"), tmp_path)
    assert len(grids) == 3 and all(p.stat().st_size > 0 for p in paths)
    with pytest.raises(ValueError, match="latent_dim 2, got 32"):
        latent_manifold(shaped)


def test_the_manifold_takes_any_latent_shape_of_two_dimensions():
    torch.manual_seed(0)
    model = VAE(4, (1, 2), encoder=nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (2, 1, 2))),
                decoder=nn.Sequential(nn.Flatten(), nn.Linear(2, 4)), likelihood="bernoulli")  # fmt: skip
    flat = VAE(4, 2, encoder=nn.Linear(4, 4), decoder=nn.Linear(2, 4), likelihood="bernoulli")
    encoder, decoder = model.encoder[0], model.decoder[1]
    flat.load_state_dict({"encoder.weight": encoder.weight, "encoder.bias": encoder.bias,
                          "decoder.weight": decoder.weight, "decoder.bias": decoder.bias})  # fmt: skip
    assert torch.equal(latent_manifold(model, 3), latent_manifold(flat, 3))


def test_a_tuple_of_latent_maps_is_accepted():
    torch.manual_seed(0)
    model = VAE(DATA_SHAPE, LATENT_SHAPE, encoder=MomentsEncoder(tuple_output=True), decoder=MapDecoder())
    mu, logvar = model.encode(images())
    assert mu.shape == logvar.shape == (B, *LATENT_SHAPE)


def test_log_sigma_is_what_the_likelihood_uses():
    shaped, _ = models("torch", sigma="learned")
    x = images()
    log_sigma = shaped.log_sigma()
    assert log_sigma.shape == (math.prod(DATA_SHAPE),) and log_sigma.requires_grad
    assert torch.equal(log_sigma, floored_log_scale(shaped.log_scale))
    mu, logvar = shaped.encode(x)
    torch.manual_seed(1)
    z, kl = fastvae.sample_latent(mu, logvar)
    loss = fastvae.elbo_loss(x.flatten(1), shaped.decode(z), kl, log_scale=log_sigma)  # decode gives (B, D)
    torch.manual_seed(1)
    assert torch.equal(loss, shaped.loss(x).loss)
    assert VAE(4, 2, sigma=0.5).log_sigma() == math.log(0.5)
    assert VAE(4, 2).log_sigma() is None and VAE(4, 2, likelihood="bernoulli").log_sigma() is None


BAD = [
    (lambda: VAE(DATA_SHAPE, LATENT_SHAPE), ValueError,
     r"`latent_dim`=\(2, 4, 4\), a latent shape, needs your own `encoder` and `decoder`; arch='mlp' takes an int K"),
    (lambda: VAE(DATA_SHAPE, (2, 0, 4), encoder=MomentsEncoder(), decoder=MapDecoder()), ValueError,
     "`latent_dim` must be a positive int or a sequence of them"),
    (lambda: VAE(DATA_SHAPE, (2, 4, 2), encoder=MomentsEncoder(), decoder=MapDecoder()).encode(images()),
     ValueError, r"`encoder` must return \(B, 2C, \.\.\.\) = \(4, 4, 4, 2\) \(mu, logvar along dim 1\) or a tuple of "
     r"two \(4, 2, 4, 2\) tensors, got \(4, 4, 4, 4\)"),
    (lambda: models("torch")[0].decode(torch.zeros(B, 2, 4, 3)), ValueError,
     r"`z` must have shape \(\.\.\., B, 2, 4, 4\), got \(4, 2, 4, 3\)"),
]


@pytest.mark.parametrize("call,error,message", BAD)
def test_bad_latent_shapes_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_a_learned_scale_per_channel_is_the_per_dimension_scale_with_its_values_repeated(impl):
    """log_scale_shape (C, 1, 1): the loss of a (D,) scale holding each channel's value at each of its pixels,
    and the gradient of each channel the sum of that scale's gradients over the channel's pixels."""
    torch.manual_seed(0)
    channel = VAE(DATA_SHAPE, LATENT_SHAPE, encoder=MomentsEncoder(), decoder=MapDecoder(), impl=impl,
                  sigma="learned", log_scale_shape=(DATA_SHAPE[0], 1, 1))  # fmt: skip
    flat = VAE(DATA_SHAPE, LATENT_SHAPE, encoder=channel.encoder, decoder=channel.decoder, impl=impl, sigma="learned")
    assert channel.log_scale.shape == (DATA_SHAPE[0], 1, 1) and flat.log_scale.shape == (math.prod(DATA_SHAPE),)
    with torch.no_grad():
        channel.log_scale.copy_(torch.tensor([-0.5, 0.0, 0.7]).view(-1, 1, 1))
        flat.log_scale.copy_(channel.log_scale.expand(DATA_SHAPE).flatten())
    assert torch.equal(channel.log_sigma(), flat.log_sigma()) and channel.log_sigma().shape == flat.log_scale.shape
    losses = []
    for model in (channel, flat):
        torch.manual_seed(1)
        losses.append(model.loss(images()).loss)
        losses[-1].backward()
    assert torch.equal(losses[0], losses[1])
    per_channel = flat.log_scale.grad.view(DATA_SHAPE).sum(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(channel.log_scale.grad, per_channel, rtol=1e-5, atol=1e-6)
    assert VAE(DATA_SHAPE, 2, sigma="learned", log_scale_shape=(1, 8, 1)).log_sigma().shape == (192,)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"log_scale_shape": (3, 1, 1)}, r"`log_scale_shape` applies to sigma='learned' only, got sigma=1\.0"),
        ({"sigma": "learned", "log_scale_shape": (2, 1, 1)},
         r"`log_scale_shape` \(2, 1, 1\) must broadcast to data_shape \(3, 8, 8\), e\.g\. \(3, 1, 1\) per channel, "
         r"or be the flattened \(192,\)"),
        ({"sigma": "learned", "log_scale_shape": (1, 3, 1, 1)}, r"`log_scale_shape` \(1, 3, 1, 1\) must broadcast"),
        ({"sigma": "learned", "log_scale_shape": (3, 0, 1)}, r"`log_scale_shape` must be a positive int or a sequence"),
    ],
    ids=["fixed-sigma", "channels", "more-dims", "zero"],
)  # fmt: skip
def test_a_bad_log_scale_shape_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VAE(DATA_SHAPE, 2, **kwargs)
