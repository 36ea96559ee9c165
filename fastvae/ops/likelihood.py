"""The fused likelihood step with autograd, each op in two entry points that launch the same kernels
(`fastvae.kernels.likelihood`) and share their gradient wiring: an autograd Function for eager calls and
a torch custom op for `torch.compile` (docs/design.md says why).

- Per-row log p(x|z): `LogLikelihood` / `fastvae::log_likelihood`. The backward is a second launch of the
  same kernel that reads x, out and the per-row upstream gradient and writes d/d out.
- The scalar ELBO loss: `ElboLoss` / `fastvae::elbo_loss`. The forward writes the gradient for an upstream
  gradient of 1 in the same pass as log p (x and out are read once), then one program reduces the rows and
  the KL to the loss and its terms. The backward is one launch that scales that stash in place by the real
  upstream gradient (skipped on the device when it is 1, the plain `loss.backward()`) and writes the KL's
  gradient. See docs/design.md for the bytes each design moves.
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
)


def _data_grad(dist: str, dout: Tensor, out: Tensor, row_weight: Tensor, x: Tensor) -> Tensor:
    """d loss / d x from the weighted gradient wrt `out`: Gaussian d/dx = -d/dm; Bernoulli d/dx = w*logits."""
    if dist == "gaussian":
        return (-dout).sum_to_size(x.shape).to(x.dtype)
    return (row_weight * out.float()).sum_to_size(x.shape).to(x.dtype)


def _fake_grads(out: Tensor, log_scale: Tensor | None, need_dls: bool) -> tuple[Tensor, Tensor]:
    ls_dtype = out.dtype if log_scale is None else log_scale.dtype
    dls_shape = log_scale.shape if (need_dls and log_scale is not None) else (0,)
    return out.new_empty(out.shape), out.new_empty(dls_shape, dtype=ls_dtype)


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
    return dout, dout.new_empty((0,)) if dls is None else dls


@log_likelihood_backward_op.register_fake
def _(grad, x, out, log_scale, log_scale_const, dist, need_dls):
    return _fake_grads(out, log_scale, need_dls)


log_likelihood_op.register_autograd(
    lambda ctx, grad: _ll_grads(ctx, grad, log_likelihood_backward_op), setup_context=_ll_setup_context
)


# ---------------------------------------------------------------- scalar loss, gradient in the forward


def _elbo_setup(ctx, x: Tensor, out: Tensor, kl: Tensor, dist: str, stash: tuple) -> None:
    """The backward's context. The stash (dout, dls or None, state) is rescaled in place by each backward, so
    it is held on ctx rather than saved with save_for_backward (whose version check would refuse a second
    backward under retain_graph)."""
    ctx.dist, ctx.batch, ctx.kl_dtype, ctx.stash = dist, kl.shape[0], kl.dtype, stash
    ctx.set_materialize_grads(False)  # no gradient buffers for the outputs that carry none
    if x.requires_grad:  # out is kept only when x needs a gradient (Bernoulli's d/dx uses the logits)
        ctx.rows = max(out.shape[:-1].numel(), 1)
        ctx.save_for_backward(out, x)


def _elbo_grads(ctx, grad: Tensor | None, read_slot: int | None) -> tuple:
    """Gradients of (x, out, kl, log_scale) and Nones for the rest. The stash is brought to `grad` in place and
    the KL's gradient written to state[DKL]: by `rescale_grads` reading scale slot `read_slot` (the eager
    path alternates the slots), or with `read_slot` None by the custom op `elbo_rescale_` (a traced
    backward)."""
    if grad is None:
        return (None,) * len(ctx.needs_input_grad)
    dout, dls, state = ctx.stash
    needs = ctx.needs_input_grad
    if read_slot is None:
        elbo_rescale_op(dout, dls, grad, state)
    else:
        rescale_grads(dout, dls, grad, state, read_slot)
    dkl = None
    if needs[2]:  # the same value for every row: a broadcast view of state[DKL]
        dkl = state.as_strided((ctx.batch,), (0,), DKL)
        dkl = dkl if ctx.kl_dtype == torch.float32 else dkl.to(ctx.kl_dtype)
    dx = None
    if needs[0]:
        out, x = ctx.saved_tensors
        dx = _data_grad(ctx.dist, dout, out, -grad.float() / ctx.rows, x)
    return dx, dout, dkl, (dls if needs[3] else None), *(None,) * (len(needs) - 4)


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
        _elbo_setup(ctx, x, out, kl, dist, (dout, dls, state))
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
    stash for autograd: dout, dls or an empty tensor)."""
    beta = beta_value if beta is None else beta
    loss, state, dout, dls = elbo_launch(x, out, kl, dist, log_scale, log_scale_const, beta, need_dls)
    return loss, state, dout, dout.new_empty((0,)) if dls is None else dls


@elbo_loss_op.register_fake
def _(x, out, kl, log_scale, log_scale_const, dist, beta, beta_value, need_dls):
    dout, dls = _fake_grads(out, log_scale, need_dls)
    f32 = torch.float32
    return out.new_empty((), dtype=f32), out.new_empty((STATE_SIZE + out.shape[:-1].numel(),), dtype=f32), dout, dls


@torch.library.custom_op("fastvae::elbo_rescale_", mutates_args=("dout", "dls", "state"))
def elbo_rescale_op(dout: Tensor, dls: Tensor, grad: Tensor, state: Tensor) -> None:
    """`rescale_grads` for a traced backward, which cannot alternate the scale slots: it reads slot 0 and
    then records `grad` there (one more launch than the eager path)."""
    rescale_grads(dout, dls if dls.numel() else None, grad, state, 0)
    state[:1].copy_(grad.reshape(1))


@elbo_rescale_op.register_fake
def _(dout, dls, grad, state) -> None:
    return None


def _elbo_op_setup(ctx, inputs, output) -> None:
    x, out, kl, *_ = inputs
    ctx.mark_non_differentiable(*output[1:])
    _elbo_setup(ctx, x, out, kl, inputs[5], (output[2], output[3], output[1]))


elbo_loss_op.register_autograd(
    lambda ctx, grad, *unused: _elbo_grads(ctx, grad, None), setup_context=_elbo_op_setup
)
