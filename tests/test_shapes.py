"""The public ops on latents (B, *latent_shape) and data (B, *data_shape): the same values as the call on the
flattened tensors, gradients in the callers' shapes, contiguous inputs passed to the kernels as views, and
mismatched shapes refused with both shapes named. Both impls: the reference and the kernels (under the
interpreter on the CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from fastvae.kernels.launch import CachedKernel
from helpers import assert_close
from torch.distributions import Normal

import fastvae

IMPLS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16]
# Latent shapes after B: a feature map, one with odd sizes (tails of every block), and a single channel.
LATENT_SHAPES = [(4, 2, 2), (3, 5), (1, 3, 1, 2)]
# (data_shape, log-scale kind): None, a number, the flattened (D,), per channel (C, 1, 1), per column (W,),
# one per row (B, 1, 1, 1), a 0-dim tensor, per element of data_shape.
LIKELIHOOD_CASES = [
    ((3, 4, 4), None),
    ((3, 4, 4), "number"),
    ((3, 4, 4), "flat"),
    ((3, 4, 4), "channel"),
    ((2, 3, 5), "column"),
    ((2, 3, 5), "row"),
    ((1, 5, 3), "scalar"),
    ((2, 3, 5), "element"),
]
B = 3


def _leaves(*shapes: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * 0.5).to(dtype).requires_grad_() for shape in shapes]


def _flat_twins(*tensors: torch.Tensor, start: int) -> list[torch.Tensor]:
    """Detached copies flattened from dim `start` on, as leaves: the inputs of the flattened call."""
    return [t.detach().flatten(start).requires_grad_() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("samples", [1, 2])
@pytest.mark.parametrize("latent_shape", LATENT_SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_latent_ops_equal_the_flattened_call(impl, latent_shape, samples, dtype):
    mu, logvar = _leaves((B, *latent_shape), (B, *latent_shape), dtype=dtype)
    flat_mu, flat_logvar = _flat_twins(mu, logvar, start=1)
    for op in (fastvae.sample_latent, fastvae.sample_latent_iw):
        torch.manual_seed(3)
        got = op(mu, logvar, samples=samples, impl=impl)
        torch.manual_seed(3)
        want = op(flat_mu, flat_logvar, samples=samples, impl=impl)
        z_shape = (B, *latent_shape) if samples == 1 and op is fastvae.sample_latent else (samples, B, *latent_shape)
        assert got[0].shape == z_shape and got[0].dtype == dtype
        assert torch.equal(got[0].flatten(-len(latent_shape)), want[0])
        for g, w in zip(got[1:], want[1:], strict=True):  # kl (B,) and log_ratio (S, B)
            assert torch.equal(g, w)
        weight = torch.linspace(-1.0, 1.0, got[0].numel()).reshape(got[0].shape)
        (got[0].float() * weight).sum().add(got[1].sum()).backward()
        (want[0].float() * weight.flatten(-len(latent_shape))).sum().add(want[1].sum()).backward()
    for leaf, twin in ((mu, flat_mu), (logvar, flat_logvar)):
        assert leaf.grad.shape == leaf.shape
        assert torch.equal(leaf.grad.flatten(1), twin.grad)


def _likelihood_inputs(data_shape, kind, S, dtype):
    x = torch.rand(B, *data_shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out_shape = (B, *data_shape) if S == 1 else (S, B, *data_shape)
    (out,) = _leaves(out_shape, dtype=dtype, seed=2)
    c, h, w = data_shape
    shapes = {"flat": (c * h * w,), "channel": (c, 1, 1), "column": (w,), "row": (B, 1, 1, 1), "scalar": (),
              "element": data_shape}  # fmt: skip
    if kind in shapes:
        (log_scale,) = _leaves(shapes[kind], dtype=dtype, seed=4)
    else:
        log_scale = -0.4 if kind == "number" else None
    return x, out, log_scale


def _flat_log_scale(log_scale, data_shape):
    """The log-scale of the flattened call: expanded to data_shape (after any leading dims), then flattened."""
    if not isinstance(log_scale, torch.Tensor) or log_scale.shape == (math.prod(data_shape),):
        return log_scale
    lead = max(0, log_scale.dim() - len(data_shape))
    return log_scale.expand(*log_scale.shape[:lead], *data_shape).flatten(lead)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("S", [1, 2])
@pytest.mark.parametrize("data_shape,kind", LIKELIHOOD_CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_likelihood_ops_equal_the_flattened_call(impl, data_shape, kind, S, dtype):
    x, out, log_scale = _likelihood_inputs(data_shape, kind, S, dtype)
    tensors = [out] + ([log_scale] if isinstance(log_scale, torch.Tensor) else [])
    twins = [t.detach().clone().requires_grad_() for t in tensors]
    flat_out = twins[0].flatten(-len(data_shape))
    flat_ls = _flat_log_scale(twins[1], data_shape) if len(twins) > 1 else log_scale
    flat_x = x.flatten(1)
    kl = torch.rand(B)

    logp = fastvae.log_likelihood(x, out, log_scale=log_scale, impl=impl)
    want = fastvae.log_likelihood(flat_x, flat_out, log_scale=flat_ls, impl=impl)
    assert logp.shape == want.shape == ((B,) if S == 1 else (S, B))
    assert torch.equal(logp, want)
    loss, terms = fastvae.elbo_terms(x, out, kl, log_scale=log_scale, beta=0.5, impl=impl)
    flat_loss, flat_terms = fastvae.elbo_terms(flat_x, flat_out, kl, log_scale=flat_ls, beta=0.5, impl=impl)
    assert torch.equal(loss, flat_loss) and torch.equal(terms, flat_terms)
    assert torch.equal(fastvae.elbo_loss(x, out, kl, log_scale=log_scale, beta=0.5, impl=impl), loss)
    (loss + logp.sum()).backward()
    (flat_loss + want.sum()).backward()
    for leaf, twin in zip(tensors, twins, strict=True):
        assert leaf.grad.shape == leaf.shape
        assert_close(leaf.grad, twin.grad, dtype)  # the same sums, perhaps in another order


@pytest.mark.parametrize("impl", IMPLS)
def test_per_channel_scale_is_torch_distributions_normal(impl):
    """An independent check of the per-channel case: Normal(out, exp(log_scale)) over (C, H, W), summed."""
    x, out, log_scale = _likelihood_inputs((3, 4, 4), "channel", 2, torch.float32)
    want = Normal(out.detach().double(), log_scale.detach().double().exp()).log_prob(x.double()).sum((-3, -2, -1))
    assert_close(fastvae.log_likelihood(x, out, log_scale=log_scale, impl=impl), want, torch.float32, scale=7)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_shaped_inputs_equal_their_contiguous_copies(impl):
    """Channels-last latents and images cannot be viewed flat: they are copied, with the same results."""
    mu, logvar = (t.detach().to(memory_format=torch.channels_last) for t in _leaves((B, 4, 2, 3), (B, 4, 2, 3)))
    x, out, log_scale = _likelihood_inputs((3, 4, 4), "channel", 1, torch.float32)
    x, out = x.to(memory_format=torch.channels_last), out.detach().to(memory_format=torch.channels_last)
    results = []
    for prepare in (lambda t: t, lambda t: t.contiguous()):
        torch.manual_seed(3)
        z, kl = fastvae.sample_latent(prepare(mu), prepare(logvar), impl=impl)
        loss = fastvae.elbo_loss(prepare(x), prepare(out), kl, log_scale=log_scale, impl=impl)
        results.append((z, kl, loss))
    assert not mu.is_contiguous() and not out.is_contiguous()
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


@pytest.fixture
def launched_pointers(monkeypatch) -> list[int]:
    """The data_ptr of every tensor the kernels are launched with, in order."""
    seen: list[int] = []
    launch = CachedKernel.launch

    def recording(self, plan, pointers, values=()):
        seen.extend(p.data_ptr() for p in pointers if isinstance(p, torch.Tensor))
        return launch(self, plan, pointers, values)

    monkeypatch.setattr(CachedKernel, "launch", recording)
    return seen


def test_contiguous_inputs_reach_the_kernels_as_views(launched_pointers):
    """The fused path reads the callers' own memory: no copy of mu, logvar, x, out or a flattened log-scale."""
    mu, logvar = _leaves((B, 4, 2, 2), (B, 4, 2, 2))
    x, out, log_scale = _likelihood_inputs((3, 4, 4), "flat", 2, torch.float32)
    z, kl = fastvae.sample_latent(mu, logvar, impl="triton")
    loss = fastvae.elbo_loss(x, out, kl.detach(), log_scale=log_scale, impl="triton")
    fastvae.log_likelihood(x, out, log_scale=log_scale, impl="triton")
    (loss + z.sum()).backward()
    for t in (mu, logvar, x, out, log_scale):
        assert t.data_ptr() in launched_pointers


MISMATCHES = [
    (lambda: fastvae.sample_latent(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 2)),
     r"`logvar` must have the shape of `mu` \(2, 4, 3, 3\), got \(2, 4, 3, 2\)"),
    (lambda: fastvae.sample_latent_iw(torch.zeros(2, 4, 3, 3), torch.zeros(2, 36)),
     r"`logvar` must have the shape of `mu` \(2, 4, 3, 3\), got \(2, 36\)"),
    (lambda: fastvae.log_likelihood(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 5)),
     r"`out` must have shape .* matching x \(2, 3, 4, 4\), got \(2, 3, 4, 5\)"),
    (lambda: fastvae.log_likelihood(torch.rand(2, 3, 4, 4), torch.rand(2, 48)),
     r"matching x \(2, 3, 4, 4\), got \(2, 48\)"),
    (lambda: fastvae.elbo_loss(torch.rand(2, 3, 4, 4), torch.rand(5, 2, 2, 4, 4), torch.rand(2)),
     r"matching x \(2, 3, 4, 4\), got \(5, 2, 2, 4, 4\)"),
    (lambda: fastvae.log_likelihood(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), log_scale=torch.zeros(2, 1, 1)),
     r"`log_scale` of shape \(2, 1, 1\) does not broadcast to out's shape \(2, 3, 4, 4\), nor is it the "
     r"flattened \(D,\) = \(48,\)"),
]


@pytest.mark.parametrize("call,message", MISMATCHES)
def test_mismatched_shapes_name_both(call, message):
    with pytest.raises(ValueError, match=message):
        call()
