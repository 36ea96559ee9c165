"""The fused ops under torch.compile(fullgraph=True): no graph breaks, same values and gradients as eager."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import ROOT, assert_close
from run_helpers import TINY, metrics_rows
from torch._dynamo.testing import CompileCounter

import fastvae
from fastvae import train

pytestmark = pytest.mark.slow


def _head(mu, logvar, weight, x, log_scale):
    """A VAE head: sample z (B, *latent_shape), decode linearly to x's shape, Gaussian loss with a learned scale."""
    z, kl = fastvae.sample_latent(mu, logvar, impl="triton")
    out = (z.flatten(1) @ weight).reshape(x.shape)
    loss = fastvae.elbo_loss(x, out, kl, log_scale=log_scale, beta=0.5, impl="triton")
    per_row = fastvae.log_likelihood(x, out.detach(), log_scale=log_scale.detach(), impl="triton")
    return loss, per_row


# With fallback_random, the compiled graph draws the kernel seed exactly as eager does. (Patched through the
# config's own `patch`: monkeypatch's undo deletes the attribute, which hides the option from later tests.)
# The usual (B, K) latent, (B, D) data and per-dimension scale, and a feature map latent (B, 2, 1, 2) with
# image data (B, 2, 5) and a per-channel scale (2, 1): the custom ops see the flattened views of both.
@pytest.mark.parametrize("latent_shape,data_shape,scale_shape", [((4,), (10,), (10,)), ((2, 1, 2), (2, 5), (2, 1))])
@torch._inductor.config.patch(fallback_random=True)
def test_compiled_head_matches_eager(latent_shape, data_shape, scale_shape, kernel_device):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    B, K, D = 6, math.prod(latent_shape), math.prod(data_shape)
    leaves = [
        torch.randn(B, *latent_shape, generator=g),
        torch.randn(B, *latent_shape, generator=g) * 0.5,
        torch.randn(K, D, generator=g),
        torch.rand(B, *data_shape, generator=g),
        torch.randn(scale_shape, generator=g) * 0.1,
    ]
    eager_in = [t.to(kernel_device).requires_grad_(i != 3) for i, t in enumerate(leaves)]
    compiled_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in eager_in]

    torch.manual_seed(11)
    loss, per_row = _head(*eager_in)
    loss.backward()
    torch.manual_seed(11)
    c_loss, c_per_row = torch.compile(_head, fullgraph=True)(*compiled_in)
    c_loss.backward()

    assert_close(c_loss, loss, torch.float32)
    assert_close(c_per_row, per_row, torch.float32)
    for e, c in zip(eager_in, compiled_in, strict=True):
        if e.requires_grad:
            assert_close(c.grad, e.grad, torch.float32)


# ------------------------------------------------------------------------------------------ VAE.loss

# (likelihood, sigma, iw_samples, autocast): the fused loss with its terms (S = 1) and with a learned scale,
# the IWAE path (S > 1) and bf16 autocast.
LOSS_CASES = {
    "gaussian-learned": ("gaussian", "learned", 1, False),
    "bernoulli": ("bernoulli", 1.0, 1, False),
    "iwae": ("gaussian", "learned", 2, False),
    "bf16": ("bernoulli", 1.0, 1, True),
}


def _model(likelihood: str, sigma: float | str, device: torch.device) -> fastvae.VAE:
    torch.manual_seed(0)
    model = fastvae.VAE(12, 3, hidden=(8,), likelihood=likelihood, sigma=sigma, impl="triton").to(device)
    if model.log_scale is not None:
        with torch.no_grad():
            model.log_scale.normal_(0.0, 0.1)  # a scale that is not 1 everywhere
    return model


def _loss_and_grads(model: fastvae.VAE, loss, x: torch.Tensor, beta: torch.Tensor, bf16: bool) -> list[torch.Tensor]:
    """The LossOutput's five statistics, then every parameter's gradient, for one draw seeded alike."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = loss(x, beta)
    out.loss.backward()
    return [t.detach().float() for t in out] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("case", LOSS_CASES.values(), ids=LOSS_CASES.keys())
def test_compiled_model_loss_matches_eager(kernel_device, case):
    """`VAE.loss` with the fused ops compiles whole (fullgraph: beta a device tensor, no graph break) through
    AOTAutograd and Inductor's partitioner, and gives eager's statistics and gradients. Its outputs include the
    loss's terms: before the traced backward stopped mutating the loss's state, AOTAutograd refused them
    ("Node ... was invalid, but is output")."""
    likelihood, sigma, iw_samples, bf16 = case
    torch._dynamo.reset()
    model = _model(likelihood, sigma, kernel_device)
    x = torch.rand(6, 12, generator=torch.Generator().manual_seed(1)).to(kernel_device)
    beta = torch.tensor(0.7, device=kernel_device)

    def loss(x, beta):
        return model.loss(x, beta=beta, iw_samples=iw_samples)

    want = _loss_and_grads(model, loss, x, beta, bf16)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager_decomp_partition")
    got = _loss_and_grads(model, compiled, x, beta, bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, dtype)


# ------------------------------------------------------------------------------ the training step, β


def test_a_compiled_kl_warmup_compiles_once_and_trains_as_eager(monkeypatch, tmp_path):
    """--compile --fused over a whole --kl-warmup (beta new at every step): beta reaches the fused loss as a
    device tensor, so the step is not compiled again for each value (a Python float is a constant of the
    graph: 15 graphs here), nor again once the fused ops were imported; the compiled run trains as the eager
    one does."""
    torch._dynamo.reset()
    counter = CompileCounter()
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counter, **kw))
    args = [*TINY, "--fused", "--kl-warmup", "12", "--epochs", "2", "--no-pictures"]
    assert train.main([*args, "--compile", "--out", str(tmp_path / "compiled")]) == 0
    assert train.main([*args, "--out", str(tmp_path / "eager")]) == 0
    assert counter.frame_count == 1
    compiled, eager = metrics_rows(tmp_path / "compiled"), metrics_rows(tmp_path / "eager")
    assert [row.keys() for row in compiled] == [row.keys() for row in eager]  # beta among them, changing
    for got, want in zip(compiled, eager, strict=True):
        for key, value in want.items():
            assert got[key] == (pytest.approx(value, rel=1e-5, abs=1e-5) if isinstance(value, float) else value)


# ------------------------------------------------------------------------------------------ the CLI


def _readme_compile_example() -> list[str]:
    """The arguments of the README's `--compile` example."""
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if " --compile" in line)
    return line.split("python -m fastvae.train", 1)[1].split()


@pytest.mark.parametrize(
    "args",
    [_readme_compile_example(), ["--likelihood", "bernoulli", "--compile"]],
    ids=["readme-example", "bernoulli"],
)
def test_compiled_fused_cli_run_trains(kernel_device, tmp_path, args):
    """`python -m fastvae.train --compile` with the fused ops, Inductor and all, under the interpreter: the README's
    example (a learned scale, beta with warm-up, IWAE, bf16) and a Bernoulli ELBO run train and lower the loss."""
    torch._dynamo.reset()
    out = tmp_path / "run"
    argv = [*args, *TINY, "--fused", "--device", kernel_device.type, "--epochs", "2", "--no-pictures"]
    assert train.main([*argv, "--out", str(out)]) == 0
    rows = [row for row in metrics_rows(out) if row["kind"] == "train"]
    assert all(math.isfinite(row["loss"]) for row in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]


# ------------------------------------------------------------------------------ reduce-overhead


def _sampler(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Device work around the fused sampler: what Inductor could put in one CUDA graph with it."""
    z, kl = fastvae.sample_latent(mu * 2, logvar - 1, impl="triton")
    return z * 3 + kl[:, None]


def test_the_sampler_is_kept_out_of_cuda_graphs(kernel_device):
    """The traced sampler draws its seed on the CPU and reads it on the host: recorded in a CUDA graph
    (mode="reduce-overhead"), every replay would repeat the recorded noise. Inductor's own test of what it
    may record finds the sampler's forward and backward ops unsafe, in the forward and backward graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.utils import is_cudagraph_unsafe_fx_node

    unsafe: dict[str, set[str]] = {}

    def recorder(kind):
        def compiler(gm, example_inputs):
            unsafe[kind] = {str(n.target) for n in gm.graph.nodes if is_cudagraph_unsafe_fx_node(n)}
            return make_boxed_func(gm.forward)

        return compiler

    torch._dynamo.reset()
    mu, logvar = (torch.randn(4, 3, device=kernel_device, requires_grad=True) for _ in range(2))
    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    torch.compile(_sampler, fullgraph=True, backend=backend)(mu, logvar).sum().backward()
    assert unsafe == {
        "forward": {"fastvae.sample_latent.default"},
        "backward": {"fastvae.sample_latent_backward.default"},
    }


@pytest.mark.gpu
def test_reduce_overhead_replays_draw_fresh_noise():
    """Four calls of a mode="reduce-overhead" compiled sampler, after its warm-up and recording: four
    different draws of z (a sampler recorded in the CUDA graph would give the same z every replay)."""
    torch._dynamo.reset()
    mu, logvar = torch.zeros(64, 8, device="cuda"), torch.zeros(64, 8, device="cuda")
    compiled = torch.compile(_sampler, mode="reduce-overhead")
    for _ in range(3):  # warm-up and recording
        compiled(mu, logvar)
    draws = [compiled(mu, logvar).clone() for _ in range(4)]  # a replay's output is overwritten by the next
    for i in range(4):
        for j in range(i):
            assert not torch.equal(draws[i], draws[j]), (i, j)
