"""Bad input to the public ops: a clear ValueError/TypeError naming the argument, before any kernel runs."""

from __future__ import annotations

import pytest
import torch
from helpers import KERNEL_DEVICE

import fastvae

F32 = torch.float32


def _latent(B=4, K=3, dtype=F32):
    return torch.zeros(B, K, dtype=dtype), torch.zeros(B, K, dtype=dtype)


def _data(B=4, D=5):
    return torch.rand(B, D), torch.rand(B, D), torch.rand(B)


LATENT_ERRORS = [
    (lambda: fastvae.sample_latent(torch.zeros(4, 3), torch.zeros(4, 2)), ValueError, "`logvar` must have the shape"),
    (lambda: fastvae.sample_latent(torch.zeros(4), torch.zeros(4)), ValueError, r"`mu` must have shape \(B, K\)"),
    (lambda: fastvae.sample_latent(torch.zeros(4, 3, dtype=torch.int64), torch.zeros(4, 3)), TypeError,
     "`mu` must be a floating-point tensor"),
    (lambda: fastvae.sample_latent(torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.bool)), TypeError,
     "`logvar` must be a floating-point tensor"),
    (lambda: fastvae.sample_latent([[0.0]], torch.zeros(1, 1)), TypeError, "`mu` must be a torch.Tensor"),
    (lambda: fastvae.sample_latent(*_latent(), samples=0), ValueError, "`samples` must be >= 1"),
    (lambda: fastvae.sample_latent(*_latent(), samples=2.0), TypeError, "`samples` must be an int"),
    (lambda: fastvae.sample_latent(torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.float16)), TypeError,
     "`logvar` has dtype torch.float16 but `mu` has torch.float32"),
    (lambda: fastvae.sample_latent(*_latent(), impl="cuda"), ValueError, "`impl` must be one of"),
    (lambda: fastvae.sample_latent(*(t.to(KERNEL_DEVICE) for t in _latent(dtype=torch.float64)), impl="triton"),
     TypeError,
     "impl='triton' takes float32, bfloat16 or float16 for `mu`"),
    (lambda: fastvae.sample_latent(torch.zeros(4, 3), torch.zeros(4, 3, device="meta")), ValueError,
     "`logvar` is on meta but `mu` is on cpu"),
]

LIKELIHOOD_ERRORS = [
    (lambda: fastvae.log_likelihood(torch.rand(4, 5), torch.rand(4, 6)), ValueError, "`out` must have shape"),
    (lambda: fastvae.log_likelihood(torch.rand(5), torch.rand(5)), ValueError,
     r"`x` must have shape \(B, D\) or \(B, \*data_shape\), got \(5,\)"),
    (lambda: fastvae.log_likelihood(torch.rand(4, 5), torch.rand(2, 3, 5)), ValueError, "`out` must have shape"),
    (lambda: fastvae.log_likelihood(torch.ones(4, 5, dtype=torch.uint8), torch.rand(4, 5)), TypeError,
     "`x` must be a floating-point tensor"),
    (lambda: fastvae.log_likelihood(torch.rand(4, 5), torch.rand(4, 5), dist="poisson"), ValueError,
     "`dist` must be one of 'gaussian', 'bernoulli'"),
    (lambda: fastvae.log_likelihood(torch.rand(4, 5), torch.rand(4, 5), dist="bernoulli", log_scale=0.0),
     ValueError, "`log_scale` applies to dist='gaussian' only"),
    (lambda: fastvae.log_likelihood(torch.rand(4, 5), torch.rand(4, 5), log_scale=torch.zeros(4)), ValueError,
     r"`log_scale` of shape \(4,\) does not broadcast to out's shape \(4, 5\)"),
    (lambda: fastvae.log_likelihood(torch.rand(4, 5), torch.rand(4, 5), log_scale=torch.zeros(3, 4, 5)),
     ValueError, "does not broadcast"),
    (lambda: fastvae.log_likelihood(torch.rand(4, 5), torch.rand(4, 5), log_scale="learned"), TypeError,
     "`log_scale` must be a real number"),
    (lambda: fastvae.log_likelihood(torch.rand(4, 5), torch.rand(4, 5, device="meta")), ValueError,
     "`out` is on meta but `x` is on cpu"),
    (lambda: fastvae.elbo_loss(*_data()[:2], torch.rand(3)), ValueError, r"`kl` must have shape \(B,\)"),
    (lambda: fastvae.elbo_loss(*_data()[:2], torch.ones(4, dtype=torch.int32)), TypeError,
     "`kl` must be a floating-point tensor"),
    (lambda: fastvae.elbo_loss(*_data(), beta="1"), TypeError, "`beta` must be a real number"),
    (lambda: fastvae.elbo_loss(*_data(), dist="gauss"), ValueError, "`dist` must be one of"),
    (lambda: fastvae.iwae_bound(torch.rand(3, 4), torch.rand(4, 3)), ValueError, r"must both have shape \(S, B\)"),
]


@pytest.mark.parametrize("call,error,message", LATENT_ERRORS + LIKELIHOOD_ERRORS)
def test_bad_input_is_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors.*TRITON_INTERPRET=1"):
        fastvae.sample_latent(*_latent(), impl="triton")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        fastvae.elbo_loss(*_data(), impl="triton")


def test_auto_runs_the_reference_on_cpu_tensors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # "auto" must not need the interpreter on the CPU
    z, kl = fastvae.sample_latent(*_latent(), impl="auto")
    assert z.shape == (4, 3) and kl.shape == (4,)
    assert fastvae.elbo_loss(*_data(), impl="auto").isfinite()
