"""`fastvae::log_likelihood` and `fastvae::elbo_nll`: the fused likelihood step as torch custom ops.

- `log_likelihood` returns per-row log p(x|z). Its backward is a second launch of the same kernel
  that reads x, out and the per-row upstream gradient and writes d/d out.
- `elbo_nll` ends in the scalar mean_{s,b} -log p(x|z). Its forward writes the gradient for an
  upstream gradient of 1 in the same pass (x and out are read once); its backward multiplies that
  buffer in place by the real upstream gradient, a step the kernel skips on the device when the
  upstream is 1 (plain `loss.backward()`). See docs/design.md for the bytes each design moves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastvae.kernels.likelihood import log_likelihood_launch, rescale_


def _data_grad(dist: str, dout: Tensor, out: Tensor, row_weight: Tensor, x: Tensor) -> Tensor:
    """d loss / d x from the weighted gradient wrt `out`: Gaussian d/dx = -d/dm; Bernoulli d/dx = w*logits."""
    if dist == "gaussian":
        return (-dout).sum_to_size(x.shape).to(x.dtype)
    return (row_weight * out.float()).sum_to_size(x.shape).to(x.dtype)


def _reduce_log_scale_grad(dls: Tensor, log_scale: Tensor | None) -> Tensor | None:
    """Sum the elementwise fp32 gradient over the broadcast dimensions, then cast to the log-scale's dtype."""
    return None if log_scale is None else dls.sum_to_size(log_scale.shape).to(log_scale.dtype)


def _fake_grads(out: Tensor, log_scale: Tensor | None, need_dls: bool) -> tuple[Tensor, Tensor]:
    ls_dtype = out.dtype if log_scale is None else log_scale.dtype
    dls_shape = log_scale.shape if (need_dls and log_scale is not None) else (0,)
    return out.new_empty(out.shape), out.new_empty(dls_shape, dtype=ls_dtype)


# ---------------------------------------------------------------- per-row log p(x|z)


@torch.library.custom_op("fastvae::log_likelihood", mutates_args=())
def log_likelihood_op(
    x: Tensor, out: Tensor, log_scale: Tensor | None, log_scale_const: float, dist: str
) -> Tensor:
    """x (B, D); out (B, D) or (S, B, D); returns log p(x|z) of shape out.shape[:-1], fp32 nats."""
    logp, _, _ = log_likelihood_launch(x, out, dist, log_scale, log_scale_const)
    return logp.reshape(out.shape[:-1])


@log_likelihood_op.register_fake
def _(x, out, log_scale, log_scale_const, dist):
    return out.new_empty(out.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fastvae::log_likelihood_backward", mutates_args=())
def log_likelihood_backward_op(
    grad: Tensor, x: Tensor, out: Tensor, log_scale: Tensor | None, log_scale_const: float, dist: str,
    need_dls: bool,
) -> tuple[Tensor, Tensor]:
    """grad: upstream gradient of log p, shaped out.shape[:-1]. Returns (d out, d log_scale reduced to
    log_scale's shape, or an empty tensor when not needed)."""
    _, dout, dls = log_likelihood_launch(
        x, out, dist, log_scale, log_scale_const, row_weights=grad, write_logp=False, write_dout=True,
        write_dls=need_dls,
    )
    if need_dls:
        dls = _reduce_log_scale_grad(dls, log_scale)
    return dout, dls


@log_likelihood_backward_op.register_fake
def _(grad, x, out, log_scale, log_scale_const, dist, need_dls):
    return _fake_grads(out, log_scale, need_dls)


def _ll_setup_context(ctx, inputs, output) -> None:
    x, out, log_scale, log_scale_const, dist = inputs
    ctx.log_scale_const, ctx.dist = log_scale_const, dist
    ctx.save_for_backward(x, out, log_scale)


def _ll_backward(ctx, grad: Tensor):
    x, out, log_scale = ctx.saved_tensors
    need_dls = log_scale is not None and ctx.needs_input_grad[2]
    dout, dls = log_likelihood_backward_op(grad, x, out, log_scale, ctx.log_scale_const, ctx.dist, need_dls)
    dx = _data_grad(ctx.dist, dout, out, grad.unsqueeze(-1), x) if ctx.needs_input_grad[0] else None
    return dx, dout, (dls if need_dls else None), None, None


log_likelihood_op.register_autograd(_ll_backward, setup_context=_ll_setup_context)


# ---------------------------------------------------------------- scalar loss, gradient in the forward


@torch.library.custom_op("fastvae::elbo_nll", mutates_args=())
def elbo_nll_op(
    x: Tensor, out: Tensor, log_scale: Tensor | None, log_scale_const: float, dist: str, need_dls: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Scalar mean over the S*B rows of -log p(x|z) (fp32 nats) in one pass.

    Returns (nll, logp rows (S*B,) fp32, d nll/d out, d nll/d log_scale or empty, applied scale (1,)).
    The last three are the stashed gradient for autograd, not for callers.
    """
    rows = out.shape[:-1].numel()
    logp, dout, dls = log_likelihood_launch(
        x, out, dist, log_scale, log_scale_const, row_weight_const=-1.0 / max(rows, 1),
        write_logp=True, write_dout=True, write_dls=need_dls,
    )
    if need_dls:
        dls = _reduce_log_scale_grad(dls, log_scale)
    applied = torch.ones((1,), dtype=torch.float32, device=out.device)
    return -logp.mean(), logp, dout, dls, applied


@elbo_nll_op.register_fake
def _(x, out, log_scale, log_scale_const, dist, need_dls):
    dout, dls = _fake_grads(out, log_scale, need_dls)
    rows = out.shape[:-1].numel()
    f32 = torch.float32
    return out.new_empty((), dtype=f32), out.new_empty((rows,), dtype=f32), dout, dls, out.new_empty((1,), dtype=f32)


@torch.library.custom_op("fastvae::rescale_grads_", mutates_args=("dout", "dls", "applied"))
def rescale_grads_op(dout: Tensor, dls: Tensor, applied: Tensor, grad: Tensor) -> None:
    """Bring the stashed gradients from the scale `applied` to the upstream `grad`, in place.

    Tracking the applied scale keeps a second backward (retain_graph=True) correct.
    """
    target = grad.reshape(1).to(torch.float32)
    factor = target / applied
    rescale_(dout, factor)
    rescale_(dls, factor)
    applied.copy_(target)


@rescale_grads_op.register_fake
def _(dout, dls, applied, grad) -> None:
    return None


def _elbo_setup_context(ctx, inputs, output) -> None:
    x, out, log_scale, _, dist, need_dls = inputs
    _, _, dout, dls, applied = output
    ctx.dist, ctx.need_dls, ctx.rows = dist, need_dls, max(out.shape[:-1].numel(), 1)
    # The stash is rescaled in place by each backward, so it is held on ctx rather than saved with
    # save_for_backward (whose version check would refuse a second backward under retain_graph).
    # Being non-differentiable outputs, they hold no reference back to this node.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradient buffers for the stash outputs
    ctx.stash = (dout, dls, applied)
    # out is kept only when x needs a gradient (Bernoulli's d/dx uses the logits).
    ctx.save_for_backward(out if x.requires_grad else None, x if x.requires_grad else None)


def _elbo_backward(ctx, grad_nll: Tensor | None, *unused: Tensor | None):
    if grad_nll is None:
        return None, None, None, None, None, None
    dout, dls, applied = ctx.stash
    out, x = ctx.saved_tensors
    rescale_grads_op(dout, dls, applied, grad_nll)
    dx = None
    if ctx.needs_input_grad[0]:
        dx = _data_grad(ctx.dist, dout, out, -grad_nll.float() / ctx.rows, x)
    return dx, dout, (dls if ctx.need_dls else None), None, None, None


elbo_nll_op.register_autograd(_elbo_backward, setup_context=_elbo_setup_context)
