"""The fused latent step (`fastvae.sample_latent[_iw]`, impl="triton") against the reference and oracles."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from helpers import DTYPES, TOLERANCES, assert_close
from torch.distributions import Normal, kl_divergence

import fastvae
from fastvae import functional
from fastvae import reference as ref


def _inputs(B: int, K: int, dtype: torch.dtype, device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(B, K, generator=g).to(device=device, dtype=dtype)
    logvar = (torch.randn(B, K, generator=g) * 0.8).to(device=device, dtype=dtype)
    return mu, logvar


def _fused_with_eps(mu, logvar, samples, seed=1234):
    """Run the fused op, and recover its eps (float64) from an fp32 run with the same seed.

    The noise depends only on the seed and the element's index, not on the dtype, so the fp32 run
    draws the same eps and its z is precise enough to recover eps exactly.
    """
    torch.manual_seed(seed)
    z, kl, lr = fastvae.sample_latent_iw(mu, logvar, samples=samples, impl="triton")
    torch.manual_seed(seed)
    z32, _, _ = fastvae.sample_latent_iw(mu.float(), logvar.float(), samples=samples, impl="triton")
    eps = (z32.double() - mu.double()) / torch.exp(0.5 * logvar.double())
    return z, kl, lr, eps


SHAPES = [(1, 1), (7, 3), (64, 20), (7, 129), (1, 129), (64, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("samples", [1, 4])
@pytest.mark.parametrize("B,K", SHAPES)
def test_values_and_gradients_match_reference(B, K, samples, dtype, kernel_device, poisoned_empty):
    mu, logvar = _inputs(B, K, dtype, kernel_device, seed=B * 1000 + K * 10 + samples)
    mu.requires_grad_(True)
    logvar.requires_grad_(True)
    z, kl, lr, eps = _fused_with_eps(mu, logvar, samples)
    assert z.shape == (samples, B, K) and z.dtype == dtype
    assert kl.shape == (B,) and kl.dtype == torch.float32
    assert lr.shape == (samples, B) and lr.dtype == torch.float32

    mu64 = mu.detach().double().requires_grad_(True)
    lv64 = logvar.detach().double().requires_grad_(True)
    z_ref, kl_ref, lr_ref = ref.latent_reference(mu64, lv64, eps)
    assert_close(z, z_ref, dtype)
    assert_close(kl, kl_ref, torch.float32, scale=math.sqrt(K))
    assert_close(lr, lr_ref, torch.float32, scale=math.sqrt(K))

    # Upstream gradients on all three outputs at once, drawn fresh. z's reaches the kernel in z's dtype, so
    # the reference gets it rounded the same way (with a 16-bit z, large terms of dlogvar can cancel).
    g = torch.Generator().manual_seed(7)
    gz = torch.randn(z.shape, generator=g, dtype=torch.float64).to(dtype).double()
    gkl = torch.randn(kl.shape, generator=g, dtype=torch.float64)
    glr = torch.randn(lr.shape, generator=g, dtype=torch.float64)
    dev = kernel_device
    dmu, dlv = torch.autograd.grad(
        (z.double() * gz.to(dev)).sum() + (kl.double() * gkl.to(dev)).sum() + (lr.double() * glr.to(dev)).sum(),
        (mu, logvar),
    )
    dmu_ref, dlv_ref = torch.autograd.grad(
        (z_ref * gz.to(dev)).sum() + (kl_ref * gkl.to(dev)).sum() + (lr_ref * glr.to(dev)).sum(), (mu64, lv64)
    )
    assert dmu.dtype == dtype and dlv.dtype == dtype
    assert_close(dmu, dmu_ref, dtype, scale=samples)
    assert_close(dlv, dlv_ref, dtype, scale=samples)


def test_public_shapes_and_reference_impl(kernel_device):
    mu, logvar = _inputs(5, 3, torch.float32, kernel_device, seed=0)
    for impl in ("triton", "torch"):
        z, kl = fastvae.sample_latent(mu, logvar, impl=impl)
        assert z.shape == (5, 3) and kl.shape == (5,)
        z, kl = fastvae.sample_latent(mu, logvar, samples=3, impl=impl)
        assert z.shape == (3, 5, 3) and kl.shape == (5,)


def test_kl_matches_torch_distributions(kernel_device):
    mu, logvar = _inputs(33, 17, torch.float32, kernel_device, seed=3)
    _, kl = fastvae.sample_latent(mu, logvar, impl="triton")
    q = Normal(mu.double(), torch.exp(0.5 * logvar.double()))
    p = Normal(torch.zeros_like(q.loc), torch.ones_like(q.scale))
    expected = kl_divergence(q, p).sum(-1)
    assert_close(kl, expected, torch.float32, scale=math.sqrt(17))


def test_log_ratio_matches_torch_distributions(kernel_device):
    mu, logvar = _inputs(9, 6, torch.float32, kernel_device, seed=4)
    z, _, lr = fastvae.sample_latent_iw(mu, logvar, samples=5, impl="triton")
    zd = z.double()
    q = Normal(mu.double(), torch.exp(0.5 * logvar.double()))
    log_q = q.log_prob(zd).sum(-1)
    log_p = Normal(0.0, 1.0).log_prob(zd).sum(-1)
    assert_close(lr, log_p - log_q, torch.float32, scale=10.0)


def test_eps_is_standard_normal(kernel_device):
    S, B, K = 4, 64, 129
    mu = torch.zeros(B, K, device=kernel_device)
    logvar = torch.zeros(B, K, device=kernel_device)
    z, _ = fastvae.sample_latent(mu, logvar, samples=S, impl="triton")
    eps = z.double().flatten()
    n = eps.numel()
    # Mean: standard error 1/sqrt(n). Variance: standard error sqrt(2/n). Five standard errors each.
    assert abs(eps.mean().item()) < 5 / math.sqrt(n)
    assert abs(eps.var().item() - 1.0) < 5 * math.sqrt(2 / n)
    # Fourth moment 3 (normal, not e.g. uniform): standard error sqrt(96/n).
    assert abs((eps**4).mean().item() - 3.0) < 5 * math.sqrt(96 / n)
    # Samples and rows draw distinct noise: correlation between sample 0 and 1, and row 0 and 1.
    zs = z.double()
    for a, b in ((zs[0].flatten(), zs[1].flatten()), (zs[:, 0].flatten(), zs[:, 1].flatten())):
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(a.numel())


def test_same_seed_same_noise_and_fresh_noise_per_call(kernel_device):
    mu, logvar = _inputs(8, 5, torch.float32, kernel_device, seed=5)
    torch.manual_seed(0)
    z1, _ = fastvae.sample_latent(mu, logvar, impl="triton")
    z2, _ = fastvae.sample_latent(mu, logvar, impl="triton")
    torch.manual_seed(0)
    z1_again, _ = fastvae.sample_latent(mu, logvar, impl="triton")
    torch.testing.assert_close(z1, z1_again, rtol=0, atol=0)
    assert not torch.equal(z1, z2)


def test_seed_is_torch_randint_draw():
    """The seed is drawn into a per-thread buffer: the value (and the generator's state after it) is what
    torch.randint would have drawn, so `torch.manual_seed` and a restored RNG state reproduce it."""
    cpu = torch.device("cpu")
    torch.manual_seed(11)
    seeds = [functional._draw_seed(cpu) for _ in range(3)]
    after = torch.rand(())
    torch.manual_seed(11)
    expected = [torch.randint(2**31, 2**62, ()).item() for _ in range(3)]
    assert seeds == expected and len(set(seeds)) == 3
    assert torch.equal(after, torch.rand(()))


def test_seed_buffer_per_thread_under_inference_mode_and_default_device():
    """A thread whose first draw is under inference mode and a default-device context still draws after
    leaving them (its buffer is a normal CPU tensor), and threads do not share a buffer."""
    cpu = torch.device("cpu")
    found: dict[str, object] = {}

    def first_draw_in_modes() -> None:
        with torch.inference_mode(), torch.device("meta"):
            found["inside"] = functional._draw_seed(cpu)
        found["outside"] = functional._draw_seed(cpu)
        found["buffer"] = functional._SEED_BUFFER.tensor

    thread = threading.Thread(target=first_draw_in_modes)
    thread.start()
    thread.join()
    assert all(type(found[k]) is int and 2**31 <= found[k] < 2**62 for k in ("inside", "outside"))
    assert found["buffer"].device.type == "cpu" and not found["buffer"].is_inference()
    assert found["buffer"] is not functional._SEED_BUFFER.tensor


def test_backward_uses_the_forward_noise(kernel_device):
    mu, logvar = _inputs(6, 11, torch.float32, kernel_device, seed=6)
    logvar.requires_grad_(True)
    torch.manual_seed(1)
    z, _ = fastvae.sample_latent(mu, logvar, impl="triton")
    # Draw more random numbers between forward and backward: the backward must not depend on them.
    torch.randn(100)
    (dlv,) = torch.autograd.grad(z.sum(), logvar)
    eps = (z.double() - mu.double()) / torch.exp(0.5 * logvar.detach().double())
    expected = 0.5 * torch.exp(0.5 * logvar.detach().double()) * eps  # d z / d logvar
    assert_close(dlv, expected, torch.float32)


def test_empty_batch(kernel_device):
    mu = torch.zeros(0, 4, device=kernel_device)
    for impl in ("triton", "torch"):
        z, kl = fastvae.sample_latent(mu, mu, samples=2, impl=impl)
        assert z.shape == (2, 0, 4) and kl.shape == (0,)


def test_nan_inputs_propagate_to_their_rows_only(kernel_device):
    mu, logvar = _inputs(4, 3, torch.float32, kernel_device, seed=8)
    mu[1, 2] = float("nan")
    for impl in ("triton", "torch"):
        z, kl = fastvae.sample_latent(mu, logvar, impl=impl)
        assert torch.isnan(kl[1]) and torch.isnan(z[1, 2])
        assert torch.isfinite(kl[[0, 2, 3]]).all() and torch.isfinite(z[[0, 2, 3]]).all()


def test_non_contiguous_inputs(kernel_device):
    base_mu, base_lv = _inputs(6, 10, torch.float32, kernel_device, seed=9)
    mu, logvar = base_mu.t().contiguous().t(), base_lv[:, ::1]  # column-major mu
    mu_strided = torch.randn(10, 12, device=kernel_device)[:, ::2].t()  # (6, 10) with odd strides
    mu_strided.copy_(base_mu)
    for m in (mu, mu_strided):
        assert not m.is_contiguous()
        torch.manual_seed(3)
        z, kl = fastvae.sample_latent(m, logvar, impl="triton")
        torch.manual_seed(3)
        z_c, kl_c = fastvae.sample_latent(base_mu, base_lv, impl="triton")
        torch.testing.assert_close(z, z_c, rtol=0, atol=0)
        torch.testing.assert_close(kl, kl_c, rtol=0, atol=0)


def test_extreme_logvar_is_finite_and_matches_reference(kernel_device):
    mu = torch.zeros(2, 4, device=kernel_device)
    logvar = torch.tensor([[80.0, -80.0, 0.0, 1.0], [-80.0, 80.0, 2.0, -3.0]], device=kernel_device)
    z, kl, lr, eps = _fused_with_eps(mu, logvar, samples=1)
    z_ref, kl_ref, lr_ref = ref.latent_reference(mu.double(), logvar.double(), eps)
    assert torch.isfinite(z).all() and torch.isfinite(kl).all()
    torch.testing.assert_close(kl.double(), kl_ref, rtol=TOLERANCES[torch.float32]["rtol"], atol=0)


def test_reference_gradcheck():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    logvar = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    eps = torch.randn(2, 3, 4, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda m, lv: ref.latent_reference(m, lv, eps), (mu, logvar))


@pytest.mark.gpu
def test_cuda_graph_replay_draws_fresh_noise():
    mu, logvar = _inputs(32, 16, torch.float32, "cuda", seed=10)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles the kernel) outside the capture
        fastvae.sample_latent(mu, logvar, impl="triton")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z, kl = fastvae.sample_latent(mu, logvar, impl="triton")
    graph.replay()
    first = z.clone()
    graph.replay()
    assert not torch.equal(first, z)
    eps = (z.double() - mu.double()) / torch.exp(0.5 * logvar.double())
    assert abs(eps.mean().item()) < 5 / math.sqrt(eps.numel())
    assert_close(kl, ref.kl_standard_normal(mu.double(), logvar.double()), torch.float32, scale=4.0)
