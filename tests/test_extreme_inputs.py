"""Extreme inputs on both paths: the fused kernels (impl="triton", on the GPU, or under the interpreter on
the CPU) and the reference (impl="torch") give the same finiteness pattern and close values, on the kernels'
device. See docs/maths.md,
"Extreme inputs", for the table these tests check.

The latent step draws its noise differently on the two paths, so the reference path is fed the
kernel's noise: the kernel's eps is read back from a run with mu = 0, logvar = 0 and the same seed,
and the reference path's `torch.randn` returns it (rounded to the input dtype, as its own draw would be).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import KERNEL_DEVICE as DEVICE

import fastvae

K, SEED = 4, 1234
F32, BF16 = torch.float32, torch.bfloat16
RTOL = {F32: 1e-5, BF16: 3e-2}


def _kernel_eps(shape: tuple[int, int, int]) -> torch.Tensor:
    S, B, K_ = shape
    torch.manual_seed(SEED)
    zeros = torch.zeros(B, K_, device=DEVICE)
    eps, _, _ = fastvae.sample_latent_iw(zeros, zeros, samples=S, impl="triton")
    return eps


def _sample(impl, mu, logvar, samples, monkeypatch):
    """`fastvae.sample_latent_iw` on one path, with the kernel's noise (seeded by SEED) on both."""
    if impl == "triton":
        torch.manual_seed(SEED)
        return fastvae.sample_latent_iw(mu, logvar, samples=samples, impl="triton")
    eps = _kernel_eps((samples, *mu.shape))
    with monkeypatch.context() as patch:
        patch.setattr(torch, "randn", lambda shape, dtype, device: eps.to(dtype))
        return fastvae.sample_latent_iw(mu, logvar, samples=samples, impl="torch")


def _latent(impl, mu, logvar, samples, monkeypatch, grads=("z", "kl")):
    """z, kl, log_ratio and d/d(mu, logvar) of sum(z) + sum(kl) + sum(log_ratio) over the used `grads`."""
    mu = mu.clone().requires_grad_(True)
    logvar = logvar.clone().requires_grad_(True)
    z, kl, lr = _sample(impl, mu, logvar, samples, monkeypatch)
    used = {"z": z.float().sum(), "kl": kl.sum(), "lr": lr.sum()}
    dmu, dlv = torch.autograd.grad(sum(used[g] for g in grads), (mu, logvar))
    return {"z": z, "kl": kl, "lr": lr, "dmu": dmu, "dlv": dlv}


def _same(name: str, a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    """Same NaN / +inf / -inf positions, and finite values close relative to the largest of them."""
    a, b = a.detach().double(), b.detach().double()
    for test in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(test(a), test(b)), f"{name}: {test.__name__} differs\n{a}\n{b}"
    finite = torch.isfinite(a)
    if finite.any():
        scale = a[finite].abs().max().item()
        atol = max(rtol * scale, 1e-30)  # fp32 subnormals (< 1.2e-38) carry few significant bits
        torch.testing.assert_close(a[finite], b[finite], rtol=rtol, atol=atol, msg=name)


def _both(mu, logvar, samples, monkeypatch, grads=("z", "kl")):
    ref = _latent("torch", mu, logvar, samples, monkeypatch, grads)
    fused = _latent("triton", mu, logvar, samples, monkeypatch, grads)
    for name in ref:
        _same(name, ref[name], fused[name], RTOL[mu.dtype])
    return ref


def _rows(logvars, mus, dtype):
    """One row per (logvar, mu) pair, constant along K, on the kernels' device."""
    pairs = list(itertools.product(logvars, mus))
    lv = torch.tensor([p[0] for p in pairs]).repeat_interleave(K).reshape(-1, K)
    mu = torch.tensor([p[1] for p in pairs]).repeat_interleave(K).reshape(-1, K)
    return mu.to(DEVICE, dtype), lv.to(DEVICE, dtype)


# ------------------------------------------------------------------------------------ latent step


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("samples,grads", [(1, ("z", "kl")), (3, ("z", "kl", "lr"))], ids=["elbo", "iwae"])
def test_large_logvar_and_mu_stay_finite_and_agree(dtype, samples, grads, monkeypatch):
    """|logvar| up to 80 (and -1000), |mu| up to 1e4: everything finite, the two paths agree."""
    mu, logvar = _rows([-1000.0, -100.0, -80.0, 0.0, 80.0], [0.0, 1e4, -1e4], dtype)
    out = _both(mu, logvar, samples, monkeypatch, grads)
    for name, value in out.items():
        assert torch.isfinite(value).all(), name
    # KL = 0.5*(exp(lv) + mu^2 - 1 - lv) per element: exp(-1000) = 0 gives (1000 - 1 + mu^2)/2 exactly.
    assert out["kl"][0].item() == pytest.approx(K * 0.5 * 999.0)
    assert out["kl"][-3].item() == pytest.approx(K * 0.5 * (torch.tensor(80.0).exp().item() - 81.0), rel=1e-5)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_logvar_past_the_exp_overflow_gives_infinite_kl_on_both_paths(dtype, monkeypatch):
    """logvar = 100: exp(logvar) overflows fp32, so KL = +inf (the right limit) and log p(z) - log q(z|x)
    = -inf (z^2 overflows); z is still finite. The ELBO's gradient wrt logvar is +inf, wrt mu finite."""
    mu, logvar = _rows([100.0], [0.0, 1e4], dtype)
    out = _both(mu, logvar, 1, monkeypatch)
    assert torch.isposinf(out["kl"]).all() and torch.isneginf(out["lr"]).all()
    assert torch.isfinite(out["z"]).all() and torch.isfinite(out["dmu"]).all()
    assert torch.isposinf(out["dlv"]).all()


@pytest.mark.parametrize("logvar_value", [200.0, 1000.0])
def test_logvar_past_the_std_overflow_gives_infinite_z_on_both_paths(logvar_value, monkeypatch):
    """logvar > ~177: exp(0.5*logvar) overflows too, so z = +-inf with the sign of eps; dmu stays finite
    (an unused log-ratio contributes 0, not 0*inf), dlogvar is +inf where eps > 0 and NaN (inf - inf)
    where eps < 0, on both paths."""
    mu, logvar = _rows([logvar_value], [0.0, 5.0], F32)
    out = _both(mu, logvar, 1, monkeypatch)
    eps = _kernel_eps((1, *mu.shape))[0]
    assert torch.equal(out["z"][0], torch.where(eps > 0, float("inf"), float("-inf")))
    assert torch.isposinf(out["kl"]).all() and torch.isneginf(out["lr"]).all()
    torch.testing.assert_close(out["dmu"], 1.0 + mu)
    assert torch.equal(torch.isnan(out["dlv"]), eps < 0) and torch.isposinf(out["dlv"][eps > 0]).all()


@pytest.mark.parametrize("samples,grads", [(1, ("z", "kl")), (2, ("z", "lr"))], ids=["elbo", "iwae"])
def test_mu_past_the_square_overflow(samples, grads, monkeypatch):
    """|mu| = 1e20: z finite, mu^2 and z^2 overflow so KL = +inf and log_ratio = -inf; gradients finite."""
    mu, logvar = _rows([0.0, -80.0], [1e20, -1e20], F32)
    out = _both(mu, logvar, samples, monkeypatch, grads)
    assert torch.isfinite(out["z"]).all() and torch.isposinf(out["kl"]).all() and torch.isneginf(out["lr"]).all()
    assert torch.isfinite(out["dmu"]).all() and torch.isfinite(out["dlv"]).all()


def test_iwae_gradients_past_the_exp_overflow_agree(monkeypatch):
    """IWAE-style use (z and the log-ratio, KL unused) at logvar = 100: an unused KL must contribute 0,
    not 0 * inf = NaN, so dlogvar is the log-ratio's -inf on both paths."""
    mu, logvar = _rows([100.0], [0.0, 3.0], F32)
    out = _both(mu, logvar, 2, monkeypatch, grads=("z", "lr"))
    assert torch.isneginf(out["dlv"]).all() and torch.isfinite(out["dmu"]).all()


def test_log_ratio_near_the_overflow_is_halved_before_the_sum(monkeypatch):
    """logvar = 88.5: each 0.5*z^2 fits in fp32 (z ~ 1e19) but a row's sum of z^2 does not. The fused
    kernel used to sum (eps^2 - z^2 + logvar) and halve at the end, giving -inf where the reference
    (halving each term) is finite."""
    g = torch.Generator().manual_seed(3)
    mu = torch.zeros(64, 3, device=DEVICE)
    logvar = (torch.full((64, 3), 88.5) + 0.01 * torch.rand(64, 3, generator=g)).to(DEVICE)
    out = _both(mu, logvar, 1, monkeypatch)
    finite = torch.isfinite(out["lr"])
    assert finite.any() and (~finite).any(), "the rows straddle the overflow"
    assert (out["lr"][finite] < -1e38).any(), "some finite rows exceed the fp32 range before halving"


# ------------------------------------------------------------------------------------ likelihood


def _likelihood(impl, x, out, dist, log_scale):
    x = x.clone().requires_grad_(True)
    out = out.clone().requires_grad_(True)
    logp = fastvae.log_likelihood(x, out, dist=dist, log_scale=log_scale, impl=impl)
    dx, dout = torch.autograd.grad(logp.sum(), (x, out))
    kl = torch.zeros(x.shape[0], device=x.device)
    out2 = out.detach().clone().requires_grad_(True)
    loss = fastvae.elbo_loss(x.detach(), out2, kl, dist=dist, log_scale=log_scale, impl=impl)
    (dloss,) = torch.autograd.grad(loss, (out2,))
    return {"logp": logp, "dx": dx, "dout": dout, "loss": loss, "dloss": dloss}


def _fill(value: float, rows: int = 2, cols: int = 4) -> torch.Tensor:
    return torch.full((rows, cols), value)


LIKELIHOOD_CASES = [
    # id, dist, x, out, log_scale, expected logp: "finite", "-inf" (per row) or "nan"
    ("gauss-x-1e4", "gaussian", _fill(1e4), _fill(0.0), None, "finite"),
    ("gauss-x-minus-1e4", "gaussian", _fill(-1e4), _fill(0.3), None, "finite"),
    ("gauss-mean-1e4", "gaussian", _fill(0.5), _fill(1e4), 0.7, "finite"),
    ("gauss-x-1e20", "gaussian", _fill(1e20), _fill(0.0), None, "-inf"),
    ("gauss-log-scale-50", "gaussian", _fill(1e4), _fill(0.0), 50.0, "finite"),
    ("gauss-log-scale-minus-50", "gaussian", _fill(0.5), _fill(0.3), torch.full((4,), -50.0), "-inf"),
    ("gauss-log-scale-minus-50-exact", "gaussian", _fill(0.5), _fill(0.5), -50.0, "nan"),
    ("bern-logits-1e4", "bernoulli", torch.tensor([[0.0, 1.0, 0.0, 1.0]] * 2), _fill(1e4), None, "finite"),
    ("bern-logits-minus-1e4", "bernoulli", torch.tensor([[0.0, 1.0, 0.3, 1.0]] * 2), _fill(-1e4), None, "finite"),
    ("bern-x-outside-0-1", "bernoulli", torch.tensor([[2.0, -1.0, 5.0, -3.0]] * 2), _fill(30.0), None, "finite"),
    ("bern-x-1e4", "bernoulli", _fill(1e4), _fill(-20.0), None, "finite"),
    ("bern-logits-1e30", "bernoulli", _fill(0.5), _fill(1e30), None, "finite"),
    ("bern-logits-3e38", "bernoulli", _fill(0.3), _fill(3e38), None, "-inf"),
]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize(
    "dist,x,out,log_scale,expected", [c[1:] for c in LIKELIHOOD_CASES], ids=[c[0] for c in LIKELIHOOD_CASES]
)
def test_likelihood_extremes_agree(dist, x, out, log_scale, expected, dtype):
    x, out = x.to(DEVICE), out.to(DEVICE, dtype)
    log_scale = log_scale.to(DEVICE) if isinstance(log_scale, torch.Tensor) else log_scale
    ref = _likelihood("torch", x, out, dist, log_scale)
    fused = _likelihood("triton", x, out, dist, log_scale)
    for name in ref:
        _same(name, ref[name], fused[name], RTOL[dtype])
    logp = ref["logp"]
    if expected == "finite":
        for name, value in ref.items():
            assert torch.isfinite(value).all(), name
    elif expected == "-inf":
        assert torch.isneginf(logp).all()
    else:
        assert torch.isnan(logp).all()


def test_bernoulli_large_logits_are_exact():
    """softplus in the stable form: log p = x*l - softplus(l) with no overflow at |l| = 1e4."""
    x = torch.tensor([[0.0, 1.0, 0.0, 1.0]], device=DEVICE)
    logits = torch.tensor([[1e4, 1e4, -1e4, -1e4]], device=DEVICE)
    for impl in ("torch", "triton"):
        logp = fastvae.log_likelihood(x, logits, dist="bernoulli", impl=impl)
        assert logp.item() == -2e4  # the two wrong-way terms, -1e4 each; the right-way ones are 0


# ---------------------------------------------------------------------------- S > 1, the IWAE bound


@pytest.mark.parametrize("logvar_value,finite", [(80.0, True), (-1000.0, True), (100.0, False)])
def test_iwae_bound_with_extreme_latents_agrees(logvar_value, finite, monkeypatch):
    """z (S, B, K) -> out = z @ W -> log p(x|z) (S, B) -> IWAE bound, with its gradient wrt mu, on both
    paths. With logvar = 100 every log-weight is -inf, so the bound is -inf and its gradient NaN."""
    S, B = 3, 2
    mu = torch.full((B, K), 2.0, device=DEVICE)
    logvar = torch.full((B, K), logvar_value, device=DEVICE)
    w = torch.linspace(-1.0, 1.0, K * 5, device=DEVICE).reshape(K, 5) * 1e-16
    x = torch.rand(B, 5, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    results = {}
    for impl in ("torch", "triton"):
        m = mu.clone().requires_grad_(True)
        z, _, lr = _sample(impl, m, logvar, S, monkeypatch)
        logp = fastvae.log_likelihood(x, z @ w, impl=impl)
        bound = fastvae.iwae_bound(logp, lr)
        (dmu,) = torch.autograd.grad(bound.sum(), (m,))
        results[impl] = (bound, dmu)
    for name, a, b in zip(("bound", "dmu"), results["torch"], results["triton"], strict=True):
        _same(name, a, b, RTOL[F32])
    bound, dmu = results["torch"]
    if finite:
        assert torch.isfinite(bound).all() and torch.isfinite(dmu).all()
    else:
        assert torch.isneginf(bound).all() and torch.isnan(dmu).all()
