"""The fused likelihood step with autograd, each op in two entry points that launch the same kernels
(`fastvae.kernels.likelihood`) and share their gradient wiring: an autograd Function for eager calls and
a torch custom op for `torch.compile` (docs/design.md says why).

- Per-row log p(x|z): `LogLikelihood` / `fastvae::log_likelihood`. The backward is a second launch of the
  same kernel that reads x, out and the per-row upstream gradient and writes d/d out.
- The scalar ELBO loss: `ElboLoss` / `fastvae::elbo_loss`. The forward writes the gradient for an upstream
  gradient of 1 in the same pass as log p (x and out are read once), then one program reduces the rows and
  the KL to the loss and its terms. The backward is one launch that scales that stash in place by the real
  upstream gradient (skipped on the device when it is 1, the plain `loss.backward()`) and writes the KL's
  gradient. An fp16 tensor's stash is fp32, and its gradient a new fp16 tensor, rounded once after the
  scaling (loss scaling would otherwise find it already flushed to zero). A traced backward
  (`fastvae::elbo_rescale`) writes every gradient to a new tensor. See docs/design.md for the bytes each
  design moves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastvae.kernels.likelihood import (
    DKL,
    STATE_SIZE,
    TERMS,
    elbo_launch,
    log_likelihood_grads_launch,
    log_likelihood_launch,
    rescale_grads,
    stash_dtype,
)


def _data_grad(dist: str, dout: Tensor, out: Tensor, row_weight: Tensor, x: Tensor) -> Tensor:
    """d loss / d x from the weighted gradient wrt `out`: Gaussian d/dx = -d/dm; Bernoulli d/dx = w*logits."""
    if dist == "gaussian":
        return (-dout).sum_to_size(x.shape).to(x.dtype)
    return (row_weight * out.float()).sum_to_size(x.shape).to(x.dtype)


def _no_dls(dout: Tensor) -> Tensor:
    """What the custom ops return for a log-scale gradient that is not computed: an empty (0,) tensor of
    dout's dtype and device (the real ops and their fakes alike)."""
    return dout.new_empty((0,))


def _fake_grads(
    out: Tensor, log_scale: Tensor | None, need_dls: bool, dtype_of: Callable[[torch.dtype], torch.dtype]
) -> tuple[Tensor, Tensor]:
    """Fakes of the gradients (or the stash) of out and the log-scale: contiguous, of out's and the log-scale's
    shapes, in `dtype_of` their dtypes, on out's device; `_no_dls` without `need_dls`."""
    dout = out.new_empty(out.shape, dtype=dtype_of(out.dtype))
    if need_dls and log_scale is not None:
        return dout, out.new_empty(log_scale.shape, dtype=dtype_of(log_scale.dtype))
    return dout, _no_dls(dout)


# ---------------------------------------------------------------- per-row log p(x|z)


def _log_likelihood(x: Tensor, out: Tensor, log_scale: Tensor | None, log_scale_const: float, dist: str) -> Tensor:
    return log_likelihood_launch(x, out, dist, log_scale, log_scale_const).reshape(out.shape[:-1])


def _log_likelihood_backward(
    grad: Tensor, x: Tensor, out: Tensor, log_scale: Tensor | None, log_scale_const: float, dist: str, need_dls: bool
) -> tuple[Tensor, Tensor | None]:
    """grad: upstream gradient of log p, shaped out.shape[:-1]. Returns (d out, d log_scale reduced to
    log_scale's shape, or None when not needed)."""
    return log_likelihood_grads_launch(grad, x, out, dist, log_scale, log_scale_const, need_dls)


def _ll_setup_context(ctx, inputs, output) -> None:
    x, out, log_scale, log_scale_const, dist = inputs
    ctx.log_scale_const, ctx.dist = log_scale_const, dist
    ctx.save_for_backward(x, out, log_scale)


def _ll_grads(ctx, grad: Tensor, backward: Callable[..., tuple[Tensor, Tensor]]) -> tuple:
    x, out, log_scale = ctx.saved_tensors
    need_dls = log_scale is not None and ctx.needs_input_grad[2]
    dout, dls = backward(grad, x, out, log_scale, ctx.log_scale_const, ctx.dist, need_dls)
    dx = _data_grad(ctx.dist, dout, out, grad.unsqueeze(-1), x) if ctx.needs_input_grad[0] else None
    return dx, dout, (dls if need_dls else None), None, None


class LogLikelihood(torch.autograd.Function):
    """`LogLikelihood.apply(x, out, log_scale, log_scale_const, dist)` -> log p(x|z) (out.shape[:-1]) fp32 nats.

    x (B, D); out (B, D) or (S, B, D); log_scale: a tensor broadcastable to out, or None (then the float
    `log_scale_const` is used). Eager path: launches the kernels directly.
    """

    @staticmethod
    def forward(ctx, x: Tensor, out: Tensor, log_scale: Tensor | None, log_scale_const: float, dist: str) -> Tensor:
        _ll_setup_context(ctx, (x, out, log_scale, log_scale_const, dist), None)
        return _log_likelihood(x, out, log_scale, log_scale_const, dist)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:
        return _ll_grads(ctx, grad, _log_likelihood_backward)


@torch.library.custom_op("fastvae::log_likelihood", mutates_args=())
def log_likelihood_op(
    x: Tensor, out: Tensor, log_scale: Tensor | None, log_scale_const: float, dist: str
) -> Tensor:
    """x (B, D); out (B, D) or (S, B, D); returns log p(x|z) of shape out.shape[:-1], fp32 nats."""
    return _log_likelihood(x, out, log_scale, log_scale_const, dist)


@log_likelihood_op.register_fake
def _(x, out, log_scale, log_scale_const, dist):
    return out.new_empty(out.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fastvae::log_likelihood_backward", mutates_args=())
def log_likelihood_backward_op(
    grad: Tensor, x: Tensor, out: Tensor, log_scale: Tensor | None, log_scale_const: float, dist: str,
    need_dls: bool,
) -> tuple[Tensor, Tensor]:
    """`_log_likelihood_backward` as a custom op (an empty d log_scale when not needed)."""
    dout, dls = _log_likelihood_backward(grad, x, out, log_scale, log_scale_const, dist, need_dls)
    return dout, _no_dls(dout) if dls is None else dls


@log_likelihood_backward_op.register_fake
def _(grad, x, out, log_scale, log_scale_const, dist, need_dls):
    return _fake_grads(out, log_scale, need_dls, lambda dtype: dtype)


log_likelihood_op.register_autograd(
    lambda ctx, grad: _ll_grads(ctx, grad, log_likelihood_backward_op), setup_context=_ll_setup_context
)


# ---------------------------------------------------------------- scalar loss, gradient in the forward


def _elbo_setup(
    ctx, x: Tensor, out: Tensor, kl: Tensor, log_scale: Tensor | None, dist: str, stash: tuple
) -> None:
    """The backward's context. The stash (dout, dls or None, state) may be rescaled in place by each backward,
    so it is held on ctx rather than saved with save_for_backward (whose version check would refuse a second
    backward under retain_graph). The gradients' dtypes are out's and the log-scale's (out's without one)."""
    ctx.dist, ctx.batch, ctx.kl_dtype, ctx.stash = dist, kl.shape[0], kl.dtype, stash
    ctx.grad_dtypes = out.dtype, out.dtype if log_scale is None else log_scale.dtype
    ctx.set_materialize_grads(False)  # no gradient buffers for the outputs that carry none
    if x.requires_grad:  # out is kept only when x needs a gradient (Bernoulli's d/dx uses the logits)
        ctx.rows = max(out.shape[:-1].numel(), 1)
        ctx.save_for_backward(out, x)


def _elbo_grads(ctx, grad: Tensor | None, read_slot: int | None) -> tuple:
    """Gradients of (x, out, kl, log_scale) and Nones for the rest, from the stash: by `rescale_grads` reading
    scale slot `read_slot` (the eager path, which alternates the slots, scales a stash in place where it is
    in its gradient's dtype, and writes the KL's gradient to state[DKL]), or with `read_slot` None by the
    custom op `elbo_rescale` (a traced backward: new tensors, the stash and state only read)."""
    if grad is None:
        return (None,) * len(ctx.needs_input_grad)
    stash, stash_ls, state = ctx.stash
    needs = ctx.needs_input_grad
    if read_slot is None:
        dout, dls, dkl = elbo_rescale_op(stash, stash_ls, grad, state, *ctx.grad_dtypes)
    else:
        dout, dls, dkl = rescale_grads(stash, stash_ls, grad, state, read_slot, *ctx.grad_dtypes)
    if needs[2]:  # the same value for every row: a broadcast view (of state[DKL] on the eager path)
        dkl = state.as_strided((ctx.batch,), (0,), DKL) if dkl is None else dkl.expand(ctx.batch)
        dkl = dkl if ctx.kl_dtype == torch.float32 else dkl.to(ctx.kl_dtype)
    dx = None
    if needs[0]:
        out, x = ctx.saved_tensors
        # The Gaussian's d/dx is -d/dout: from an fp32 stash kept apart (never scaled) rather than the fp16 dout.
        full = stash * grad.float() if ctx.dist == "gaussian" and dout.dtype != stash.dtype else dout
        dx = _data_grad(ctx.dist, full, out, -grad.float() / ctx.rows, x)
    return dx, dout, (dkl if needs[2] else None), (dls if needs[3] else None), *(None,) * (len(needs) - 4)


class ElboLoss(torch.autograd.Function):
    """`ElboLoss.apply(x, out, kl, log_scale, log_scale_const, dist, beta, need_dls)` -> (loss, state).

    beta: a float, or a one-element tensor on the device (its current value is read by the kernel).

    loss: () fp32, the mean over the S*B rows of -log p(x|z) + beta * mean(kl), in nats per sample; state:
    the loss's detached state ((STATE_SIZE + S*B,) fp32), whose `state[TERMS:TERMS + 3]` are the batch means
    of (log p - kl, kl, log p) (the ELBO with beta = 1, the KL, log p(x|z)). x (B, D); out (B, D) or
    (S, B, D); kl (B,); log_scale as in `LogLikelihood`; need_dls: the log-scale tensor requires grad. Eager
    path: two launches forward and one backward, no dispatcher round trip.
    """

    @staticmethod
    def forward(ctx, x, out, kl, log_scale, log_scale_const, dist, beta, need_dls) -> tuple[Tensor, Tensor]:
        loss, state, dout, dls = elbo_launch(x, out, kl, dist, log_scale, log_scale_const, beta, need_dls)
        _elbo_setup(ctx, x, out, kl, log_scale, dist, (dout, dls, state))
        ctx.mark_non_differentiable(state)
        ctx.backwards = 0  # which scale slot the next backward reads (see kernels/likelihood.py)
        return loss, state

    @staticmethod
    def backward(ctx, grad: Tensor | None, _state: None) -> tuple:
        read_slot = ctx.backwards & 1  # the slot the previous backward (or the forward) wrote
        ctx.backwards += 1
        return _elbo_grads(ctx, grad, read_slot)


def elbo_terms_of(state: Tensor) -> Tensor:
    """The loss's terms, (3,) fp32 nats: a view of its state."""
    return state[TERMS : TERMS + 3]


@torch.library.custom_op("fastvae::elbo_loss", mutates_args=())
def elbo_loss_op(
    x: Tensor, out: Tensor, kl: Tensor, log_scale: Tensor | None, log_scale_const: float, dist: str,
    beta: Tensor | None, beta_value: float, need_dls: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`elbo_launch` as a custom op, with beta a tensor or None (then `beta_value`): (loss, state, and the
    stash for autograd: dout, dls or an empty tensor, in `stash_dtype` of out's and the log-scale's dtypes)."""
    beta = beta_value if beta is None else beta
    loss, state, dout, dls = elbo_launch(x, out, kl, dist, log_scale, log_scale_const, beta, need_dls)
    return loss, state, dout, _no_dls(dout) if dls is None else dls


@elbo_loss_op.register_fake
def _(x, out, kl, log_scale, log_scale_const, dist, beta, beta_value, need_dls):
    dout, dls = _fake_grads(out, log_scale, need_dls, stash_dtype)
    f32 = torch.float32
    return out.new_empty((), dtype=f32), out.new_empty((STATE_SIZE + out.shape[:-1].numel(),), dtype=f32), dout, dls


@torch.library.custom_op("fastvae::elbo_rescale", mutates_args=())
def elbo_rescale_op(
    stash: Tensor, stash_ls: Tensor, grad: Tensor, state: Tensor, dtype: torch.dtype, ls_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """`rescale_grads` for a traced backward, which must not mutate the forward's outputs: from the stash of
    `elbo_loss` (stash_ls empty without a log-scale gradient) and its state, only read, the gradients for the
    upstream gradient `grad` as new tensors: d out (stash's shape, `dtype`), d log_scale (stash_ls's shape,
    `ls_dtype`) and the KL's gradient grad * beta / B ((1,) fp32)."""
    has_ls = stash_ls.numel() > 0
    dout, dls, dkl = rescale_grads(stash, stash_ls if has_ls else None, grad, state, None, dtype, ls_dtype)
    return dout, dls if has_ls else stash_ls.new_empty(stash_ls.shape, dtype=ls_dtype), dkl


@elbo_rescale_op.register_fake
def _(stash, stash_ls, grad, state, dtype, ls_dtype):
    dls = stash_ls.new_empty(stash_ls.shape, dtype=ls_dtype)
    return stash.new_empty(stash.shape, dtype=dtype), dls, state.new_empty((1,), dtype=torch.float32)


def _elbo_op_setup(ctx, inputs, output) -> None:
    x, out, kl, log_scale, _, dist, *_ = inputs
    ctx.mark_non_differentiable(*output[1:])
    _elbo_setup(ctx, x, out, kl, log_scale, dist, (output[2], output[3], output[1]))


elbo_loss_op.register_autograd(
    lambda ctx, grad, *unused: _elbo_grads(ctx, grad, None), setup_context=_elbo_op_setup
)
