"""The fused loss's fp16 gradients under loss scaling (torch.amp.GradScaler's default scale, 65536).

The unscaled gradient of the mean loss is tiny: d loss / d out = -(x - out) / R for R = S*B rows, about
5e-7 for residuals of 1e-3 at B = 2048, below fp16's smallest normal (6e-5). A scale applied in the backward
saves it only if the gradient was not rounded to fp16 before it: the fused path must round once, after
scaling, as the reference (impl="torch", fp32 arithmetic then one rounding) does. Each case compares both
paths' fp16 gradients with a float64 computation from the same fp16 inputs: the fused path's median
relative error may be at most twice the reference's, and it may flush no more gradients to zero.
"""

from __future__ import annotations

import pytest
import torch
from helpers import KERNEL_DEVICE

import fastvae
from fastvae import reference as ref

SCALE = 65536.0  # torch.amp.GradScaler's initial scale
# Rows: not a power of two, so that -1/R is inexact and the reference path rounds its gradient too.
BATCH, WIDTH = 2000, 16
F16 = torch.float16


def _inputs(dist: str, learned: bool, B: int = BATCH, D: int = WIDTH, S: int = 1) -> tuple:
    """fp16 x (B, D), out (B, D) or (S, B, D) requiring grad, a per-element fp16 log-scale requiring grad
    (with `learned`) or None, and kl (B,) fp32, on the kernels' device. Gaussian: residuals x - out of about
    1e-3 (N(0, 1e-3), or with `learned` within a few % of the scale exp(log_scale) ~ 1e-3, so that the
    log-scale's gradient -((x - out)^2 exp(-2 ls) - 1) / R is small too); x in [-1/64, 1/64] so that
    fp16's rounding keeps them. Bernoulli: binary x and logits of magnitude 5 to 12 on x's side, so that
    x - sigmoid(logits) lies between 6e-6 and 7e-3."""
    g = torch.Generator().manual_seed(0)
    shape = (B, D) if S == 1 else (S, B, D)
    log_scale = None
    if dist == "bernoulli":
        x = torch.rand(B, D, generator=g).round()
        out = (2 * x - 1) * (5 + 7 * torch.rand(shape, generator=g))
    else:
        x = (torch.rand(B, D, generator=g) * 2 - 1) / 64
        if learned:
            log_scale = (-6.9 + 0.1 * torch.randn(shape, generator=g)).to(F16)
            sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
            spread = 1 + 0.02 * torch.randn(shape, generator=g, dtype=torch.float64)
            residual = sign * log_scale.double().exp() * spread
        else:
            residual = 1e-3 * torch.randn(shape, generator=g, dtype=torch.float64)
        out = x - residual
    dev = KERNEL_DEVICE
    x, out = x.to(dev, F16), out.to(dev, F16).requires_grad_(True)
    if log_scale is not None:
        log_scale = log_scale.to(dev).requires_grad_(True)
    return x, out, log_scale, (torch.rand(B, generator=g) * 5).to(dev).requires_grad_(True)


def _leaves(out: torch.Tensor, log_scale: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    return (out,) if log_scale is None else (out, log_scale)


def _truth(x, out, log_scale, kl, dist: str, upstream: float) -> tuple[torch.Tensor, ...]:
    """The float64 gradients of upstream * loss with respect to out (and the log-scale), from the fp16 inputs."""
    leaves64 = [t.detach().double().requires_grad_(True) for t in _leaves(out, log_scale)]
    ls64 = leaves64[1] if log_scale is not None else None
    loss, _ = ref.elbo_loss_reference(x.double(), leaves64[0], kl.detach().double(), dist, ls64)
    return torch.autograd.grad(loss * upstream, leaves64)


def _errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, int]:
    """(median relative error, gradients flushed to zero) over the elements whose true gradient is nonzero."""
    assert got.shape == want.shape
    nonzero = want != 0
    assert nonzero.float().mean() > 0.9, "the case should have few exact zeros"
    got, want = got.double()[nonzero], want[nonzero]
    return ((got - want).abs() / want.abs()).median().item(), int((got == 0).sum())


def _scaled_grads(impl: str, x, out, log_scale, kl, dist: str, upstream: float = SCALE) -> tuple:
    loss = fastvae.elbo_loss(x, out, kl, dist=dist, log_scale=log_scale, impl=impl)
    return torch.autograd.grad(loss * upstream, _leaves(out, log_scale))


def _assert_as_accurate(fused: tuple, reference: tuple, truth: tuple) -> None:
    for name, f, r, t in zip(("out", "log_scale")[: len(truth)], fused, reference, truth, strict=True):
        assert f.dtype == r.dtype == F16
        (f_err, f_zeros), (r_err, r_zeros) = _errors(f, t), _errors(r, t)
        assert r_err < 1e-3, f"{name}: the reference itself is off ({r_err:.2e})"
        assert f_err <= 2 * r_err, f"{name}: fused median relative error {f_err:.2e}, reference {r_err:.2e}"
        assert f_zeros <= r_zeros, f"{name}: fused flushed {f_zeros} gradients to zero, reference {r_zeros}"


@pytest.mark.parametrize(
    "dist,learned,S", [("gaussian", False, 1), ("bernoulli", False, 1), ("gaussian", True, 1), ("gaussian", False, 3)]
)
def test_fp16_gradients_keep_their_accuracy_under_a_loss_scale(dist, learned, S):
    x, out, log_scale, kl = _inputs(dist, learned, BATCH // S, S=S)
    truth = _truth(x, out, log_scale, kl, dist, SCALE)
    fused = _scaled_grads("triton", x, out, log_scale, kl, dist)
    reference = _scaled_grads("torch", x, out, log_scale, kl, dist)
    _assert_as_accurate(fused, reference, truth)


@pytest.mark.parametrize("x_dtype", [F16, torch.float32], ids=["fp16", "fp32"])
def test_data_gradient_under_a_loss_scale(x_dtype):
    """The Gaussian's d/dx (= -d/dout) of fp16 out, for data in fp16 or fp32 (as under autocast): as accurate
    as the reference's, which computes it in fp32 and rounds it once to x's dtype."""
    x, out, _, kl = _inputs("gaussian", False)
    x = x.to(x_dtype).requires_grad_(True)
    grads = {}
    for impl in ("triton", "torch"):
        (grads[impl],) = torch.autograd.grad(fastvae.elbo_loss(x, out, kl, impl=impl) * SCALE, x)
    x64 = x.detach().double().requires_grad_(True)
    (truth,) = torch.autograd.grad(ref.elbo_loss_reference(x64, out.double(), kl.double(), "gaussian")[0] * SCALE, x64)
    (f_err, f_zeros), (r_err, r_zeros) = _errors(grads["triton"], truth), _errors(grads["torch"], truth)
    assert grads["triton"].dtype == grads["torch"].dtype == x_dtype
    assert f_err <= 2 * r_err and f_zeros <= r_zeros, (f_err, r_err, f_zeros, r_zeros)


def test_fp16_second_backward_with_retain_graph():
    """Two scaled backwards of one loss (retain_graph), the second at another scale: both as accurate as the
    reference's, and the KL's gradient follows each upstream gradient."""
    x, out, log_scale, kl = _inputs("gaussian", True)
    loss = fastvae.elbo_loss(x, out, kl, log_scale=log_scale, beta=0.5, impl="triton")
    for upstream in (0.75 * SCALE, SCALE / 3):
        *fused, dkl = torch.autograd.grad(loss * upstream, (out, log_scale, kl), retain_graph=True)
        reference = _scaled_grads("torch", x, out, log_scale, kl, "gaussian", upstream)
        _assert_as_accurate(fused, reference, _truth(x, out, log_scale, kl, "gaussian", upstream))
        torch.testing.assert_close(dkl, torch.full_like(dkl, upstream * 0.5 / BATCH), rtol=1e-6, atol=0)


@pytest.mark.slow
def test_fp16_gradients_under_torch_compile():
    """The custom ops' path (`fastvae::elbo_loss`, `fastvae::elbo_rescale`), traced with aot_eager (the
    functionalised graph without Inductor's code generation, which would only add minutes on the CPU): the
    loss with its terms (a view of the state, which the traced backward must not mutate), and two scaled
    backwards under retain_graph."""
    torch._dynamo.reset()
    x, out, log_scale, kl = _inputs("gaussian", True)

    def loss_and_terms(x, out, kl, log_scale):
        return fastvae.elbo_terms(x, out, kl, log_scale=log_scale, impl="triton")

    loss, terms = torch.compile(loss_and_terms, backend="aot_eager", fullgraph=True)(x, out, kl, log_scale)
    eager_loss, eager_terms = loss_and_terms(x, out, kl, log_scale)
    torch.testing.assert_close((loss, terms), (eager_loss, eager_terms), rtol=0, atol=0)
    for upstream in (0.75 * SCALE, SCALE / 3):
        grad_output = torch.tensor(upstream, device=KERNEL_DEVICE)
        fused = torch.autograd.grad(loss, (out, log_scale), grad_output, retain_graph=True)
        reference = _scaled_grads("torch", x, out, log_scale, kl, "gaussian", upstream)
        _assert_as_accurate(fused, reference, _truth(x, out, log_scale, kl, "gaussian", upstream))
    torch.testing.assert_close(terms, eager_terms, rtol=0, atol=0)  # the backwards left the terms alone
