"""The fused likelihood ops (`log_likelihood`, `elbo_loss`, impl="triton") against the reference and oracles."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DTYPES, assert_close
from torch.distributions import Bernoulli, Normal

import fastvae
from fastvae import reference as ref

# (dist, log-scale kind): None = unit variance, "fixed" = a float, the rest learned tensors.
VARIANTS = [
    ("gaussian", None),
    ("gaussian", "fixed"),
    ("gaussian", "scalar"),
    ("gaussian", "per-dim"),
    ("gaussian", "per-element"),
    ("bernoulli", None),
]


def _make(B, D, S, dtype, dist, scale_kind, device, seed):
    """Fresh inputs: x (B, D), out (B, D) or (S, B, D), log_scale per `scale_kind`, kl (B,)."""
    g = torch.Generator().manual_seed(seed)
    out_shape = (B, D) if S == 1 else (S, B, D)
    if dist == "bernoulli":
        x = torch.rand(B, D, generator=g).round()  # binary data, as Bernoulli expects
        out = torch.randn(out_shape, generator=g) * 3.0  # logits
    else:
        x = torch.rand(B, D, generator=g)
        out = torch.rand(out_shape, generator=g)
    ls_shapes = {"scalar": (), "per-dim": (D,), "per-element": out_shape}
    if scale_kind == "fixed":
        log_scale = -0.7
    elif scale_kind in ls_shapes:
        log_scale = (torch.randn(ls_shapes[scale_kind], generator=g) * 0.3).to(device=device, dtype=dtype)
        log_scale.requires_grad_(True)
    else:
        log_scale = None
    kl = (torch.rand(B, generator=g) * 5).to(device).requires_grad_(True)
    out = out.to(device=device, dtype=dtype).requires_grad_(True)
    return x.to(device=device, dtype=dtype), out, log_scale, kl


def _as64(t):
    return t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t


def _leaves(*ts):
    return [t for t in ts if isinstance(t, torch.Tensor) and t.requires_grad]


PARITY_CASES = [
    pytest.param(B, D, S, dtype, dist, kind, id=f"B{B}-D{D}-S{S}-{str(dtype)[6:]}-{dist}-{kind}")
    for B in (1, 7, 64)
    for D in (1, 3, 784, 3073)
    for S in (1, 4)
    for dtype in DTYPES
    for dist, kind in VARIANTS
    # The full product for fp32; for bf16/fp16 every shape with a rotating subset of variants.
    if dtype == torch.float32 or VARIANTS.index((dist, kind)) % 3 == (B + D + S) % 3
]


@pytest.mark.parametrize("B,D,S,dtype,dist,kind", PARITY_CASES)
def test_log_likelihood_values_and_gradients(B, D, S, dtype, dist, kind, kernel_device, poisoned_empty):
    x, out, log_scale, _ = _make(B, D, S, dtype, dist, kind, kernel_device, seed=B * 7919 + D * 31 + S)
    logp = fastvae.log_likelihood(x, out, dist=dist, log_scale=log_scale, impl="triton")
    x64, out64, ls64 = _as64(x), _as64(out), _as64(log_scale)
    logp_ref = ref.log_likelihood_reference(x64, out64, dist, ls64)
    assert logp.shape == out.shape[:-1] and logp.dtype == torch.float32
    assert_close(logp, logp_ref, torch.float32, scale=math.sqrt(D))

    upstream = torch.randn(logp.shape, generator=torch.Generator().manual_seed(D), dtype=torch.float64)
    upstream = upstream.to(kernel_device)
    grads = torch.autograd.grad((logp.double() * upstream).sum(), _leaves(out, log_scale))
    grads_ref = torch.autograd.grad((logp_ref * upstream).sum(), _leaves(out64, ls64))
    for got, want, leaf in zip(grads, grads_ref, _leaves(out, log_scale), strict=True):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        # A reduced log-scale gradient sums up to S*B*D terms.
        assert_close(got, want, dtype, scale=math.sqrt(want.numel() and out.numel() / want.numel()))


@pytest.mark.parametrize("upstream", [1.0, 2.5])
@pytest.mark.parametrize("B,D,S,dtype,dist,kind", PARITY_CASES[::4])
def test_elbo_loss_values_and_gradients(B, D, S, dtype, dist, kind, upstream, kernel_device, poisoned_empty):
    x, out, log_scale, kl = _make(B, D, S, dtype, dist, kind, kernel_device, seed=B * 13 + D * 17 + S)
    loss = fastvae.elbo_loss(x, out, kl, dist=dist, log_scale=log_scale, beta=0.7, impl="triton")
    x64, out64, ls64, kl64 = _as64(x), _as64(out), _as64(log_scale), _as64(kl)
    loss_ref, _ = ref.elbo_loss_reference(x64, out64, kl64, dist, ls64, beta=0.7)
    assert loss.shape == () and loss.dtype == torch.float32
    assert_close(loss, loss_ref, torch.float32, scale=math.sqrt(D))

    grads = torch.autograd.grad(loss * upstream, _leaves(out, log_scale, kl))
    grads_ref = torch.autograd.grad(loss_ref * upstream, _leaves(out64, ls64, kl64))
    for got, want, leaf in zip(grads, grads_ref, _leaves(out, log_scale, kl), strict=True):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        assert_close(got, want, dtype, scale=math.sqrt(want.numel() and out.numel() / want.numel()))


def test_elbo_loss_second_backward_with_retain_graph(kernel_device):
    """The fused loss stashes its gradient and rescales it in place; a second backward must still be right."""
    x, out, log_scale, kl = _make(5, 9, 1, torch.float32, "gaussian", "per-dim", kernel_device, seed=1)
    loss = fastvae.elbo_loss(x, out, kl, log_scale=log_scale, impl="triton")
    first = torch.autograd.grad(loss * 3.0, (out, log_scale), retain_graph=True)
    first = [g.clone() for g in first]
    second = torch.autograd.grad(loss * 0.5, (out, log_scale))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a / 6.0, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dist", ["gaussian", "bernoulli"])
def test_gradient_wrt_x(dist, kernel_device):
    x, out, _, kl = _make(4, 6, 3, torch.float32, dist, None, kernel_device, seed=2)
    x.requires_grad_(True)
    x64, out64 = _as64(x), _as64(out)
    for fn, fn_ref in (
        (lambda: fastvae.log_likelihood(x, out, dist=dist, impl="triton").sum() * 1.5,
         lambda: ref.log_likelihood_reference(x64, out64, dist).sum() * 1.5),
        (lambda: fastvae.elbo_loss(x, out, kl, dist=dist, impl="triton") * 1.5,
         lambda: ref.elbo_loss_reference(x64, out64, kl.double(), dist)[0] * 1.5),
    ):
        (dx,) = torch.autograd.grad(fn(), x)
        (dx_ref,) = torch.autograd.grad(fn_ref(), x64)
        assert_close(dx, dx_ref, torch.float32)


def test_gaussian_matches_torch_distributions(kernel_device):
    x, out, _, _ = _make(6, 10, 2, torch.float32, "gaussian", None, kernel_device, seed=3)
    for log_scale in (None, 0.4, torch.linspace(-1, 1, 10, device=kernel_device)):
        logp = fastvae.log_likelihood(x, out, log_scale=log_scale, impl="triton")
        scale = torch.exp(torch.as_tensor(0.0 if log_scale is None else log_scale, dtype=torch.float64))
        expected = Normal(out.detach().double(), scale.to(kernel_device)).log_prob(x.double()).sum(-1)
        assert_close(logp, expected, torch.float32, scale=3.0)


def test_bernoulli_matches_torch_distributions(kernel_device):
    x, out, _, _ = _make(6, 10, 2, torch.float32, "bernoulli", None, kernel_device, seed=4)
    logp = fastvae.log_likelihood(x, out, dist="bernoulli", impl="triton")
    expected = Bernoulli(logits=out.detach().double()).log_prob(x.double()).sum(-1)
    assert_close(logp, expected, torch.float32, scale=3.0)


def test_bernoulli_is_stable_for_large_logits(kernel_device):
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0]], device=kernel_device)
    logits = torch.tensor([[200.0, -200.0, -200.0, 200.0]], device=kernel_device, requires_grad=True)
    for impl in ("triton", "torch"):
        logp = fastvae.log_likelihood(x, logits, dist="bernoulli", impl=impl)
        # Two near-certain hits (0 nats) and two near-certain misses (-200 nats each).
        torch.testing.assert_close(logp.double().cpu(), torch.tensor([-400.0], dtype=torch.float64))
        (grad,) = torch.autograd.grad(logp.sum(), logits)
        torch.testing.assert_close(grad.cpu(), torch.tensor([[0.0, 0.0, 1.0, -1.0]]))


def test_large_width_loops_over_blocks(kernel_device):
    x, out, _, _ = _make(2, 65536, 1, torch.float32, "gaussian", None, kernel_device, seed=5)
    logp = fastvae.log_likelihood(x, out, impl="triton")
    assert_close(logp, ref.gaussian_log_prob(x.double(), out.double()), torch.float32, scale=256.0)


def test_non_contiguous_inputs(kernel_device):
    x, out, _, kl = _make(5, 12, 3, torch.float32, "gaussian", None, kernel_device, seed=6)
    out_t = out.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)  # (S, B, D) strided
    x_t = x.t().contiguous().t()
    ls = torch.randn(12, 1, device=kernel_device).expand(12, 5).t()  # (5, 12) with a zero stride
    assert not (out_t.is_contiguous() or x_t.is_contiguous() or ls.is_contiguous())
    got = fastvae.log_likelihood(x_t, out_t, log_scale=ls, impl="triton")
    want = ref.gaussian_log_prob(x.double(), out.detach().double(), ls.double())
    assert_close(got, want, torch.float32, scale=4.0)
    loss = fastvae.elbo_loss(x_t, out_t, kl, log_scale=ls, impl="triton")
    (grad,) = torch.autograd.grad(loss, out_t)
    out64 = out.detach().double().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(ref.elbo_loss_reference(x.double(), out64, kl.double(), "gaussian", ls)[0], out64)
    assert_close(grad, grad_ref, torch.float32)


def test_mixed_dtypes_as_under_autocast(kernel_device):
    """Under bf16 autocast the decoder emits bf16 while the data stays fp32: both are accepted."""
    x, out, _, kl = _make(4, 20, 1, torch.float32, "bernoulli", None, kernel_device, seed=7)
    out16 = out.detach().bfloat16().requires_grad_(True)
    loss = fastvae.elbo_loss(x, out16, kl, dist="bernoulli", impl="triton")
    want, _ = ref.elbo_loss_reference(x.double(), out16.detach().double(), kl.double(), "bernoulli")
    assert_close(loss, want, torch.float32, scale=4.0)
    (grad,) = torch.autograd.grad(loss, out16)
    assert grad.dtype == torch.bfloat16


def test_empty_batch(kernel_device):
    x = torch.zeros(0, 5, device=kernel_device)
    out = torch.zeros(2, 0, 5, device=kernel_device)
    kl = torch.zeros(0, device=kernel_device)
    for impl in ("triton", "torch"):
        assert fastvae.log_likelihood(x, out, impl=impl).shape == (2, 0)
        assert torch.isnan(fastvae.elbo_loss(x, out, kl, impl=impl))


def test_nan_inputs_give_nan_rows(kernel_device):
    x, out, _, kl = _make(3, 8, 1, torch.float32, "gaussian", None, kernel_device, seed=8)
    x[1, 4] = float("nan")
    for impl in ("triton", "torch"):
        logp = fastvae.log_likelihood(x, out, impl=impl)
        assert torch.isnan(logp[1]) and torch.isfinite(logp[[0, 2]]).all()
        assert torch.isnan(fastvae.elbo_loss(x, out, kl, impl=impl))


def test_far_out_of_range_data_agrees_between_paths(kernel_device):
    x = torch.tensor([[1e4, -1e4, 0.5, 3.0]], device=kernel_device)
    out = torch.tensor([[0.0, 0.0, 1e3, -50.0]], device=kernel_device)
    for dist in ("gaussian", "bernoulli"):
        fused = fastvae.log_likelihood(x, out, dist=dist, impl="triton")
        reference = ref.log_likelihood_reference(x.double(), out.double(), dist)
        assert torch.isfinite(fused).all()
        assert_close(fused, reference, torch.float32)


def test_reference_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 4, dtype=torch.float64, generator=g)
    out = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    ls = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    kl = torch.rand(3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda o, s: ref.gaussian_log_prob(x, o, s), (out, ls))
    assert torch.autograd.gradcheck(lambda o: ref.bernoulli_log_prob(x, o), (out,))
    assert torch.autograd.gradcheck(
        lambda o, s, k: ref.elbo_loss_reference(x, o, k, "gaussian", s, beta=0.3)[0], (out, ls, kl)
    )


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_beta_as_a_device_tensor_is_the_float(impl, kernel_device):
    """A tensor beta (what a captured CUDA graph reads anew at each replay) gives the float's loss and gradients,
    also in a second backward; the value is read, not baked in."""
    x, out, log_scale, kl = _make(5, 9, 1, torch.float32, "gaussian", "per-dim", kernel_device, seed=9)
    leaves = (out, log_scale, kl)
    beta = torch.tensor(0.25, device=kernel_device)
    for value in (0.25, 3.0):
        beta.fill_(value)
        want = fastvae.elbo_loss(x, out, kl, log_scale=log_scale, beta=value, impl=impl)
        got = fastvae.elbo_loss(x, out, kl, log_scale=log_scale, beta=beta, impl=impl)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        for _ in range(2):  # the second backward rescales the stash again
            grads = torch.autograd.grad(got * 2.0, leaves, retain_graph=True)
            for g, w in zip(grads, torch.autograd.grad(want * 2.0, leaves, retain_graph=True), strict=True):
                torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_a_bad_beta_tensor_is_named(kernel_device):
    x, out, _, kl = _make(3, 4, 1, torch.float32, "bernoulli", None, kernel_device, seed=10)
    for beta, error, message in (
        (torch.ones(2, device=kernel_device), TypeError, "`beta` given as a tensor must have one floating-point"),
        (torch.ones((), dtype=torch.int64, device=kernel_device), TypeError, "one floating-point element"),
        (torch.ones((), device="meta"), ValueError, "`beta` is on meta but the data are on"),
        (torch.ones((), device=kernel_device, requires_grad=True), ValueError, "`beta` must not require grad"),
    ):
        with pytest.raises(error, match=message):
            fastvae.elbo_loss(x, out, kl, dist="bernoulli", beta=beta, impl="triton")
