"""`torch.library.opcheck` over every fastvae custom op: the schema (declared mutations, no aliasing), the
autograd registration, the fake implementations against the real ones (shape, strides, dtype, device), and
AOTAutograd's trace against eager (outputs and gradients), at a few shapes and dtypes, with and without a
log-scale, S = 1 and S > 1, and the optional tensors given or None.

Inputs are on the kernels' device (the CPU under Triton's interpreter): small, as every case runs the op
several times.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, KERNEL_DEVICE

import fastvae.ops  # noqa: F401  (registers the custom ops)

ops = torch.ops.fastvae
DEV = KERNEL_DEVICE
B, K, D = 3, 5, 7
# opcheck's default list, all four: at these sizes AOTAutograd's trace (test_aot_dispatch_dynamic, which also
# runs the traced backward against eager's) is cheap, and the whole file takes about 20 s under the interpreter.
ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _t(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = False, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 17 * len(shape) + sum(shape))
    return torch.randn(shape, generator=g).to(DEV, dtype).requires_grad_(grad)


def _seed() -> torch.Tensor:
    return torch.tensor([2**40 + 12345], dtype=torch.int64)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_sample_latent(dtype, S):
    mu, logvar = _t(B, K, dtype=dtype, grad=True), _t(B, K, dtype=dtype, grad=True, seed=1)
    torch.library.opcheck(ops.sample_latent, (mu, logvar, _seed(), S), test_utils=ALL_UTILS)


@pytest.mark.parametrize("given", ["all", "z only"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_sample_latent_backward(dtype, given):
    S = 2
    mu, logvar = _t(B, K, dtype=dtype), _t(B, K, dtype=dtype, seed=1)
    grad_kl, grad_lr = (_t(B, seed=2), _t(S, B, seed=3)) if given == "all" else (None, None)
    args = (_t(S, B, K, dtype=dtype, seed=4), grad_kl, grad_lr, mu, logvar, _seed())
    torch.library.opcheck(ops.sample_latent_backward, args, test_utils=ALL_UTILS)


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (dtype of x and out, S, log-scale): None (the constant is used), or the shape and dtype of a learned
# log-scale tensor; some in another dtype than out's, as under autocast (an fp32 parameter, fp16 activations).
LIKELIHOOD_CASES = [
    (F32, 1, None),
    (F32, 3, ((D,), F32)),
    (F32, 1, ((B, D), F16)),
    (BF16, 1, ((), BF16)),
    (BF16, 2, None),
    (F16, 1, ((B, D), F16)),
    (F16, 2, ((D,), F32)),
]


def _likelihood_inputs(dtype, S, ls, dist, grad: bool = True):
    """x (B, D), out (B, D) or (S, B, D), and the log-scale of `ls` or None; out and the log-scale require
    grad with `grad`."""
    x = _t(B, D, dtype=dtype, seed=5).sigmoid()
    if dist == "bernoulli":
        x = x.round()
    out = _t(*((B, D) if S == 1 else (S, B, D)), dtype=dtype, grad=grad, seed=6)
    log_scale = None if ls is None else (0.2 * _t(*ls[0], dtype=ls[1], seed=7)).requires_grad_(grad)
    return x, out, log_scale


def _case_id(dtype, S, ls) -> str:
    return f"{_name(dtype)}-S{S}-" + ("const" if ls is None else f"ls{list(ls[0])}{_name(ls[1])}")


CASES = [
    pytest.param(dtype, S, ls, dist, id=f"{dist}-{_case_id(dtype, S, ls)}")
    for dtype, S, ls in LIKELIHOOD_CASES
    for dist in (("gaussian", "bernoulli") if ls is None else ("gaussian",))
]


@pytest.mark.parametrize("dtype,S,ls,dist", CASES)
def test_log_likelihood(dtype, S, ls, dist):
    x, out, log_scale = _likelihood_inputs(dtype, S, ls, dist)
    torch.library.opcheck(ops.log_likelihood, (x, out, log_scale, -0.3, dist), test_utils=ALL_UTILS)


@pytest.mark.parametrize("dtype,S,ls,dist", CASES)
def test_log_likelihood_backward(dtype, S, ls, dist):
    # Not differentiable itself (no double backward): its inputs do not require grad.
    x, out, log_scale = _likelihood_inputs(dtype, S, ls, dist, grad=False)
    grad = _t(*out.shape[:-1], seed=8)
    for need_dls in {False, log_scale is not None}:
        args = (grad, x, out, log_scale, -0.3, dist, need_dls)
        torch.library.opcheck(ops.log_likelihood_backward, args, test_utils=ALL_UTILS)


def _elbo_args(dtype, S, ls, dist, beta_tensor: bool):
    x, out, log_scale = _likelihood_inputs(dtype, S, ls, dist)
    kl = _t(B, seed=9).abs().requires_grad_(True)
    beta = torch.tensor([0.7], device=DEV) if beta_tensor else None
    return (x, out, kl, log_scale, -0.3, dist, beta, 0.7, log_scale is not None)


@pytest.mark.parametrize("dtype,S,ls,dist", CASES)
def test_elbo_loss(dtype, S, ls, dist):
    args = _elbo_args(dtype, S, ls, dist, beta_tensor=S > 1)
    torch.library.opcheck(ops.elbo_loss, args, test_utils=ALL_UTILS)
    if ls is not None:  # a fixed log-scale tensor: no gradient, and an empty stash for it
        log_scale = args[3].detach()
        torch.library.opcheck(ops.elbo_loss, (*args[:3], log_scale, *args[4:-1], False), test_utils=ALL_UTILS)


@pytest.mark.parametrize("upstream", [1.0, 2.5])
@pytest.mark.parametrize("dtype,S,ls,dist", CASES)
def test_elbo_rescale(dtype, S, ls, dist, upstream):
    with torch.no_grad():
        _, state, dout, dls = ops.elbo_loss(*_elbo_args(dtype, S, ls, dist, beta_tensor=False))
    ls_dtype = dtype if ls is None else ls[1]
    args = (dout, dls, torch.tensor(upstream, device=DEV), state, dtype, ls_dtype)
    torch.library.opcheck(ops.elbo_rescale, args, test_utils=ALL_UTILS)
