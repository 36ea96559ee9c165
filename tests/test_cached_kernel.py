"""`CachedKernel`'s launch plans reach the variant Triton's own dispatch would, per device, and stay bounded.

Under TRITON_INTERPRET=1 (this suite) every launch goes through Triton, so the plans' variants are never used;
`cached_kernel_probe.py` runs without it, with the kernels compiled for sm_90a by the compile-only driver, and
launches each call of the public ops both ways (no GPU needed).
"""

from __future__ import annotations

from helpers import ROOT, compiled_report


def test_the_cache_key_picks_tritons_variant():
    report = compiled_report(ROOT / "tests" / "cached_kernel_probe.py")
    assert report["mismatches"] == []
    # Both paths were exercised: variants cached through Triton, and direct launches of cached ones.
    assert 0 < report["direct"] < report["launches"]
    # Per device: every launch under each target used that target's variant, and plans held both.
    assert report["wrong_target"] == [] and report["devices"] == 2


def test_plans_are_bounded(monkeypatch):
    """A program that keeps changing shapes does not grow the plans without bound: past the limit they are
    dropped and rebuilt, and every call still gets its own shape's plan."""
    import torch
    from fastvae.kernels import launch, likelihood
    from helpers import KERNEL_DEVICE

    import fastvae

    monkeypatch.setattr(launch, "_MAX_PLANS", 2)
    monkeypatch.setattr(likelihood._loglik, "plans", {})
    for rows in (3, 4, 5, 3):
        x, out = torch.rand(rows, 7, device=KERNEL_DEVICE), torch.randn(rows, 7, device=KERNEL_DEVICE)
        got = fastvae.log_likelihood(x, out, dist="bernoulli", impl="triton")
        torch.testing.assert_close(got, fastvae.log_likelihood(x, out, dist="bernoulli", impl="torch"))
        assert 1 <= len(likelihood._loglik.plans) <= 2
        assert any(plan.ints[0] == rows for plan in likelihood._loglik.plans.values())  # R, the rows
