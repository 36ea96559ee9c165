"""Bad arguments to `fastvae.VAE` and its methods: a TypeError/ValueError naming the argument (or the
module at fault), raised before any arithmetic. Complements tests/test_model.py and test_op_errors.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fastvae
from fastvae import VAE, iwae_log_likelihood

B, D, K = 4, 16, 3


def tiny(**kwargs) -> VAE:
    torch.manual_seed(0)
    return VAE((1, 4, 4), K, hidden=(8,), **kwargs)


def data(rows: int = B) -> torch.Tensor:
    return torch.rand(rows, D, generator=torch.Generator().manual_seed(1))


class Returns(nn.Module):
    """A module whose forward applies `fn` to a linear map of its input, to fake a faulty encoder/decoder."""

    def __init__(self, n_in: int, n_out: int, fn) -> None:
        super().__init__()
        self.linear, self.fn = nn.Linear(n_in, n_out), fn

    def forward(self, t):
        return self.fn(self.linear(t))


def custom(encoder_fn=lambda h: h, decoder_fn=lambda o: o) -> VAE:
    torch.manual_seed(0)
    return VAE(D, K, encoder=Returns(D, 2 * K, encoder_fn), decoder=Returns(K, D, decoder_fn))


# ------------------------------------------------------------------------------------ constructor

CONSTRUCTOR_ERRORS = [
    ({"data_shape": 0}, ValueError, "`data_shape` must be a positive int"),
    ({"data_shape": -3}, ValueError, "`data_shape` must be a positive int"),
    ({"data_shape": ()}, ValueError, "`data_shape` must be a positive int .* got \\(\\)"),
    ({"data_shape": (1, -4, 4)}, ValueError, "`data_shape` .* got \\(1, -4, 4\\)"),
    ({"data_shape": True}, ValueError, "`data_shape` .* got True"),
    ({"data_shape": (1, 4.0, 4)}, ValueError, "`data_shape`"),
    ({"data_shape": "16"}, ValueError, "`data_shape` .* got '16'"),
    ({"latent_dim": 0}, ValueError, "`latent_dim` must be >= 1, got 0"),
    ({"latent_dim": -2}, ValueError, "`latent_dim` must be >= 1"),
    ({"latent_dim": 2.0}, TypeError, "`latent_dim` must be an int, got float"),
    ({"hidden": 400}, TypeError, "`hidden` must be a sequence of layer sizes"),
    ({"hidden": "400"}, TypeError, "`hidden` must be a sequence of layer sizes"),
    ({"hidden": (8, -1)}, ValueError, "`hidden` must be >= 1, got -1"),
    ({"hidden": (8.5,)}, TypeError, "`hidden` must be an int"),
    ({"beta": float("nan")}, ValueError, "`beta` must be a finite number >= 0, got nan"),
    ({"beta": float("inf")}, ValueError, "`beta` must be a finite number >= 0, got inf"),
    ({"beta": -0.5}, ValueError, "`beta` must be a finite number >= 0, got -0.5"),
    ({"beta": True}, TypeError, "`beta` must be a real number, got bool"),
    ({"sigma": float("nan")}, ValueError, "`sigma` must be a finite number >= 1e-19"),
    ({"sigma": float("inf")}, ValueError, "`sigma` must be a finite number"),
    ({"sigma": 0.0}, ValueError, "`sigma` must be a finite number"),
    ({"sigma": 1e-30}, ValueError, "1/sigma\\^2 must fit in float32"),
    ({"sigma": torch.tensor(0.5)}, TypeError, "`sigma` must be a real number, got Tensor"),
    ({"likelihood": None}, ValueError, "`likelihood` must be one of"),
    ({"impl": "gpu"}, ValueError, "`impl` must be one of"),
    ({"encoder": nn.Linear(D, 2 * K), "decoder": nn.Linear(K, D), "arch": "conv"}, ValueError,
     "`arch`='conv' does not apply to your own `encoder` and `decoder`"),
    ({"encoder": lambda x: x, "decoder": nn.Linear(K, D)}, TypeError, "`encoder` must be a torch.nn.Module"),
    ({"decoder": nn.Linear(K, D)}, ValueError, "pass both `encoder` and `decoder`"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), CONSTRUCTOR_ERRORS)
def test_constructor_rejects(kwargs, error, message):
    kwargs = {"data_shape": (1, 4, 4), "latent_dim": K, "hidden": (8,), **kwargs}
    with pytest.raises(error, match=message):
        VAE(**kwargs)


def test_constructor_accepts_what_it_documents():
    assert VAE(np.int64(16), K, hidden=()).data_shape == (16,)  # numpy ints; () = linear maps
    assert VAE(torch.Size([1, 4, 4]), K, hidden=[8]).dim == 16
    assert VAE(D, K, sigma=1e-19).sigma == 1e-19 and VAE(D, K, beta=0).beta == 0.0


# ---------------------------------------------------------------------------------------- methods

METHOD_ERRORS = [
    (lambda m: m.loss([[0.0] * D] * B), TypeError, "`x` must be a torch.Tensor, got list"),
    (lambda m: m.encode(data().numpy()), TypeError, "`x` must be a torch.Tensor, got ndarray"),
    (lambda m: m.elbo(torch.ones(B, D, dtype=torch.uint8)), TypeError, "`x` must be a floating-point tensor"),
    (lambda m: m.reconstruct(torch.ones(B, D, dtype=torch.bool)), TypeError, "`x` must be a floating-point"),
    (lambda m: m.log_px_and_kl(data().double()), TypeError,
     "`x` has dtype torch.float64 but the model's parameters are torch.float32"),
    (lambda m: m.loss(data().half()), TypeError, "`x` has dtype torch.float16"),
    (lambda m: m.loss(torch.rand(D)), ValueError,
     r"`x` must have shape \(B, 16\) or \(B, \*\(1, 4, 4\)\), got \(16,\)"),
    (lambda m: m.loss(torch.tensor(0.5)), ValueError, r"`x` must have shape .* got \(\)"),
    (lambda m: m.encode(torch.rand(B, 4, 4)), ValueError, r"got \(4, 4, 4\)"),
    (lambda m: m.elbo(torch.rand(B, 1, D)), ValueError, r"got \(4, 1, 16\)"),
    (lambda m: m.loss(torch.rand(0, D)), ValueError, r"`x` is an empty batch \(shape \(0, 16\)\)"),
    (lambda m: m.loss(torch.rand(0, 1, 4, 4), iw_samples=3), ValueError, "`x` is an empty batch"),
    (lambda m: m.elbo(torch.rand(B, D, device="meta")), ValueError, "`x` is on meta but the model is on cpu"),
    (lambda m: m.loss(data(), beta=float("nan")), ValueError, "`beta` must be a finite number >= 0, got nan"),
    (lambda m: m.loss(data(), beta=float("-inf")), ValueError, "`beta` must be a finite number >= 0"),
    (lambda m: m.loss(data(), beta=-1), ValueError, "`beta` must be a finite number >= 0, got -1"),
    (lambda m: m.loss(data(), beta=torch.ones(2)), TypeError, "`beta` given as a tensor must have one floating"),
    (lambda m: m.loss(data(), beta=torch.ones((), dtype=torch.int64)), TypeError, "one floating-point element"),
    (lambda m: m.loss(data(), iw_samples=True), TypeError, "`iw_samples` must be an int, got bool"),
    (lambda m: m.elbo(data(), samples=0), ValueError, "`samples` must be >= 1"),
    (lambda m: m.decode(torch.zeros(B, K, dtype=torch.long)), TypeError, "`z` must be a floating-point tensor"),
    (lambda m: m.decode(torch.zeros(K)), ValueError, r"`z` must have shape \(\.\.\., B, 3\), got \(3,\)"),
    (lambda m: m.decode(torch.zeros(B, K, dtype=torch.float64)), TypeError, "`z` has dtype torch.float64"),
    (lambda m: m.decode(torch.zeros(B, K, device="meta")), ValueError, "`z` is on meta but the model is on cpu"),
    (lambda m: m.sample(2.0), TypeError, "`n` must be an int, got float"),
    (lambda m: m.sample(-1), ValueError, "`n` must be >= 1"),
    (lambda m: iwae_log_likelihood(m, data(), 0), ValueError, "`k` must be >= 1"),
    (lambda m: iwae_log_likelihood(m, data(), 4, chunk=0), ValueError, "`chunk` must be >= 1"),
    (lambda m: iwae_log_likelihood(m, data().long(), 4), TypeError, "`x` must be a floating-point tensor"),
    (lambda m: iwae_log_likelihood(m.encoder, data(), 4), TypeError, "`model` must be a fastvae.VAE, got Sequential"),
]


@pytest.mark.parametrize(("call", "error", "message"), METHOD_ERRORS)
def test_method_rejects(call, error, message):
    with pytest.raises(error, match=message):
        call(tiny())


def test_per_row_methods_take_an_empty_batch():
    """Only the scalar loss refuses no rows; per-row results over no rows are simply empty."""
    model, empty = tiny(), torch.rand(0, D)
    mu, logvar = model.encode(empty)
    assert mu.shape == logvar.shape == (0, K)
    assert model.elbo(empty).shape == (0,)
    assert model.reconstruct(empty.reshape(0, 1, 4, 4)).shape == (0, 1, 4, 4)
    assert iwae_log_likelihood(model, empty, 3).shape == (0,)


def test_a_model_in_another_dtype_takes_data_in_that_dtype():
    model = tiny().to(torch.float64)
    assert model.loss(data().double()).loss.isfinite()
    assert model.elbo(data().double()).dtype == torch.float64  # log-densities are fp32 or wider
    assert model.sample(2).shape == (2, 1, 4, 4)  # draws z in the model's dtype
    with pytest.raises(TypeError, match="`x` has dtype torch.float32 but the model's parameters are torch.float64"):
        model.elbo(data())


def test_autocast_lifts_the_dtype_check():
    model = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.loss(data().bfloat16())
    assert out.loss.isfinite()


# ------------------------------------------------------------------------ your own encoder / decoder

MODULE_ERRORS = [
    (dict(encoder_fn=lambda h: (h[:, :K], h[:, K:], h)), TypeError,
     "`encoder` must return a tensor \\(B, 2K\\) or a tuple \\(mu, logvar\\) of tensors, got a tuple of 3"),
    (dict(encoder_fn=lambda h: [h]), TypeError, "`encoder` must return .* got a list of 1"),
    (dict(encoder_fn=lambda h: {"mu": h}), TypeError, "`encoder` must return .* got dict"),
    (dict(encoder_fn=lambda h: h.detach().numpy()), TypeError, "`encoder` must return .* got ndarray"),
    (dict(encoder_fn=lambda h: torch.cat([h, h[:, :1]], 1)), ValueError,
     r"`encoder` must return \(B, 2K\) = \(4, 6\) or a tuple of two \(B, K\) tensors, got \(4, 7\)"),
    (dict(encoder_fn=lambda h: h[:1]), ValueError, r"`encoder` must return .* got \(1, 6\)"),
    (dict(encoder_fn=lambda h: (h[:, :K], h[:, :K - 1])), ValueError, r"got \[\(4, 3\), \(4, 2\)\]"),
    (dict(encoder_fn=lambda h: h.long()), TypeError, "`encoder` must return floating-point tensors, got torch.int64"),
    (dict(encoder_fn=lambda h: (h[:, :K], h[:, K:].half())), TypeError,
     "`encoder` must return mu and logvar of one dtype, got torch.float32 and torch.float16"),
    (dict(encoder_fn=lambda h: h.to("meta")), ValueError, "`encoder` returned tensors on meta and meta for `x` on cpu"),
    (dict(decoder_fn=lambda o: (o,)), TypeError, "`decoder` must return a tensor, got tuple"),
    (dict(decoder_fn=lambda o: o.long()), TypeError, "`decoder` must return a floating-point tensor, got torch.int64"),
    (dict(decoder_fn=lambda o: o.T.contiguous()), ValueError,
     r"`decoder` must map \(N, 3\) to \(N, 16\) or \(N, \*\(16,\)\), got \(16, 4\) for N = 4"),
    (dict(decoder_fn=lambda o: o[:, :-1]), ValueError, r"`decoder` must map .* got \(4, 15\)"),
    (dict(decoder_fn=lambda o: o.to("meta")), ValueError, "`decoder` returned a tensor on meta for `z` on cpu"),
]


@pytest.mark.parametrize(("fns", "error", "message"), MODULE_ERRORS)
def test_faulty_module_is_named(fns, error, message):
    with pytest.raises(error, match=message):
        custom(**fns).loss(data())


def test_custom_modules_may_cast_dtypes():
    """The dtype check is for the built-in modules; your own may take and return other float dtypes."""
    model = custom(decoder_fn=lambda o: o.double())
    assert model.loss(data()).loss.isfinite()
    assert model.decode(torch.zeros(2, 5, K)).shape == (2, 5, D)


# ----------------------------------------------------------------------------------- functional beta


@pytest.mark.parametrize("beta", [float("nan"), float("inf"), -1.0])
def test_elbo_loss_rejects_bad_beta(beta):
    x, out, kl = torch.rand(B, 5), torch.rand(B, 5), torch.rand(B)
    with pytest.raises(ValueError, match="`beta` must be a finite number >= 0"):
        fastvae.elbo_loss(x, out, kl, beta=beta)
