"""Triton kernel of the likelihood step: per-row log p(x|z) and its gradient in one pass.

One kernel serves every variant. Rows r = s*B + b run over the decoder output `out` (S, B, D);
x (B, D) and the log-scale broadcast against it through strides (a stride of 0 repeats a value),
so a scalar, per-dimension (D,) or per-element log-scale is the same code, and any strides work.

For each element, with x the data and m = out[s, b, d] the decoder's output:
- Gaussian: log p = -0.5*(x-m)^2*exp(-2*ls) - ls - 0.5*log(2*pi),
  d/dm = (x-m)*exp(-2*ls), d/dls = (x-m)^2*exp(-2*ls) - 1. ls = `ls_const` without a tensor.
- Bernoulli with logits l: log p = x*l - softplus(l), softplus(l) = max(l,0) + log(1+exp(-|l|)),
  d/dl = x - sigmoid(l), with sigmoid from the same exp(-|l|).

Per row the kernel optionally writes log p summed over D (fp32, nats) and, with a per-row weight w_r
(loaded, or the constant `w_const`), the weighted gradients w_r*d(log p)/dm and w_r*d(log p)/dls.
The fused loss calls it once with w_r = -1/R, so its forward pass already holds the gradient.

Two small kernels finish the loss: `_elbo_finish_kernel` (forward, one program) reduces the rows'
log p and the KL to the scalar loss and its terms, in a fixed order (deterministic); `_rescale_kernel`
(backward) scales the stashed gradient by the upstream gradient, in place (an fp32 stash of fp16 gradients,
or every stash in a traced backward, into new tensors), and writes the KL's gradient.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import INTERPRET, CachedKernel, cdiv, empty_contiguous, gpu_tile, layout, next_power_of_2

GAUSSIAN = 0
BERNOULLI = 1
DISTRIBUTIONS = {"gaussian": GAUSSIAN, "bernoulli": BERNOULLI}
HALF_LOG_2PI = tl.constexpr(0.9189385332046727)  # 0.5 * log(2*pi)


@triton.jit
def _loglik_kernel(
    x_ptr, out_ptr, ls_ptr, w_ptr, logp_ptr, dout_ptr, dls_ptr,
    R, B, D, logp_offset,
    sx_s, sx_b, sx_d, so_s, so_b, so_d, sl_s, sl_b, sl_d, sw,
    ls_const, w_const,
    DIST: tl.constexpr, HAS_LS_TENSOR: tl.constexpr, HAS_ROW_WEIGHTS: tl.constexpr,
    WRITE_LOGP: tl.constexpr, WRITE_DOUT: tl.constexpr, WRITE_DLS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid: (cdiv(R, BLOCK_R),). Each program owns BLOCK_R rows and loops over D in BLOCK_D blocks.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_mask = rows < R
    s = rows // B
    b = rows - s * B
    x_row = (s * sx_s + b * sx_b)[:, None]
    o_row = (s * so_s + b * so_b)[:, None]
    l_row = (s * sl_s + b * sl_b)[:, None]
    g_row = rows[:, None] * D  # gradient outputs are contiguous (S, B, D)
    if WRITE_DOUT or WRITE_DLS:
        if HAS_ROW_WEIGHTS:
            w = tl.load(w_ptr + rows * sw, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        else:
            w = w_const
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = row_mask[:, None] & (cols[None, :] < D)
        x = tl.load(x_ptr + x_row + cols[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(out_ptr + o_row + cols[None, :] * so_d, mask=mask, other=0.0).to(tl.float32)
        if DIST == 0:
            if HAS_LS_TENSOR:
                ls = tl.load(ls_ptr + l_row + cols[None, :] * sl_d, mask=mask, other=0.0).to(tl.float32)
            else:
                ls = ls_const
            inv_var = tl.exp(-2.0 * ls)
            diff = x - m
            sq = diff * diff * inv_var
            logp = -0.5 * sq - ls - HALF_LOG_2PI
            dm = diff * inv_var
        else:
            t = tl.exp(-tl.abs(m))
            logp = x * m - tl.maximum(m, 0.0) - tl.log(1.0 + t)
            sigmoid = tl.where(m >= 0, 1.0 / (1.0 + t), t / (1.0 + t))
            dm = x - sigmoid
        if WRITE_LOGP:
            acc += tl.sum(tl.where(mask, logp, 0.0), axis=1)
        if WRITE_DOUT:
            tl.store(dout_ptr + g_row + cols[None, :], (w * dm).to(dout_ptr.dtype.element_ty), mask=mask)
        if WRITE_DLS:
            tl.store(dls_ptr + g_row + cols[None, :], (w * (sq - 1.0)).to(dls_ptr.dtype.element_ty), mask=mask)
    if WRITE_LOGP:
        tl.store(logp_ptr + logp_offset + rows, acc, mask=row_mask)


# The fused loss's state (fp32, STATE_SIZE + R values), which the two kernels below index by these offsets:
# [0, 1] the stash's two scale slots, [DKL] the KL's gradient, [TERMS, TERMS + 3) the loss's terms, [6] the
# KL's weight in the loss (beta / B), [7] unused, and from STATE_SIZE the R rows' log p (32-byte aligned).
DKL, TERMS = 2, 3
STATE_SIZE = 8


@triton.jit
def _elbo_finish_kernel(
    kl_ptr, beta_ptr, loss_ptr, state_ptr,
    R, B, stride_kl,
    beta_value,
    BLOCK: tl.constexpr, BETA_IN_MEMORY: tl.constexpr,
):
    # grid: (1,). loss = -mean_r(log p) + beta * mean_b(kl), with log p at state[8:8 + R]; the terms,
    # state[3:6] = batch means of (log p - kl, kl, log p) with beta = 1; state[6] = beta / B. state[0] =
    # state[1] = 1: the stash holds the gradient for an upstream gradient of 1 (see _rescale_kernel). beta is read from
    # memory (a CUDA graph's replays see its current value) or passed by value.
    offs = tl.arange(0, BLOCK)
    logp_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r0 in range(0, R, BLOCK):
        logp_acc += tl.load(state_ptr + 8 + r0 + offs, mask=r0 + offs < R, other=0.0)
    kl_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for b0 in range(0, B, BLOCK):
        rows = (b0 + offs).to(tl.int64)
        kl_acc += tl.load(kl_ptr + rows * stride_kl, mask=rows < B, other=0.0).to(tl.float32)
    if BETA_IN_MEMORY:
        beta = tl.load(beta_ptr).to(tl.float32)
    else:
        beta = beta_value
    log_px = tl.sum(logp_acc, axis=0) / R
    kl = tl.sum(kl_acc, axis=0) / B
    tl.store(loss_ptr, beta * kl - log_px)
    tl.store(state_ptr, 1.0)
    tl.store(state_ptr + 1, 1.0)  # slots 1, DKL and 7 too, which the backward writes or nothing reads: the
    tl.store(state_ptr + 2, 0.0)  # state is a function of the inputs, as an op's output must be
    tl.store(state_ptr + 3, log_px - kl)
    tl.store(state_ptr + 4, kl)
    tl.store(state_ptr + 5, log_px)
    tl.store(state_ptr + 6, beta / B)
    tl.store(state_ptr + 7, 0.0)


@triton.jit
def _rescale_kernel(
    stash_ptr, stash_ls_ptr, grad_ptr, state_ptr, dout_ptr, dls_ptr, dkl_ptr,
    n_stash, n_stash_ls, read_slot,
    BLOCK: tl.constexpr, HAS_LS: tl.constexpr, DOUT_APART: tl.constexpr, DLS_APART: tl.constexpr,
    SLOTS: tl.constexpr,
):
    # grid: (cdiv(max(n_stash, n_stash_ls), BLOCK),). The stash (d out, and d log_scale with HAS_LS) holds the
    # gradient for the upstream gradient state[read_slot] (SLOTS) or 1; bring it to the upstream gradient g.
    # In place (not *_APART, SLOTS only): a *= g / state[read_slot], skipped on the device when the factor is
    # 1 (the usual loss.backward()). Apart (*_APART): the stash is only read, and g * a, rounded once, is
    # written to dout / dls (an fp32 stash of fp16 gradients, or every gradient without SLOTS). With SLOTS,
    # program 0 records g in the other slot, which no program reads in this launch (so there is no race), and
    # writes the KL's gradient g * beta / B to state[2]; without, to dkl, and the state is only read.
    g = tl.load(grad_ptr).to(tl.float32)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    if SLOTS:
        factor = g / tl.load(state_ptr + read_slot)
    if DOUT_APART:
        a = tl.load(stash_ptr + offs, mask=offs < n_stash, other=0.0).to(tl.float32)
        tl.store(dout_ptr + offs, (a * g).to(dout_ptr.dtype.element_ty), mask=offs < n_stash)
    elif factor != 1.0:
        a = tl.load(stash_ptr + offs, mask=offs < n_stash, other=0.0).to(tl.float32)
        tl.store(stash_ptr + offs, (a * factor).to(stash_ptr.dtype.element_ty), mask=offs < n_stash)
    if HAS_LS:
        if DLS_APART:
            a = tl.load(stash_ls_ptr + offs, mask=offs < n_stash_ls, other=0.0).to(tl.float32)
            tl.store(dls_ptr + offs, (a * g).to(dls_ptr.dtype.element_ty), mask=offs < n_stash_ls)
        elif factor != 1.0:
            a = tl.load(stash_ls_ptr + offs, mask=offs < n_stash_ls, other=0.0).to(tl.float32)
            tl.store(stash_ls_ptr + offs, (a * factor).to(stash_ls_ptr.dtype.element_ty), mask=offs < n_stash_ls)
    if tl.program_id(0) == 0:
        if SLOTS:
            tl.store(state_ptr + 1 - read_slot, g)
            tl.store(state_ptr + 2, g * tl.load(state_ptr + 6))
        else:
            tl.store(dkl_ptr, g * tl.load(state_ptr + 6))


_loglik = CachedKernel(_loglik_kernel, values=("ls_const", "w_const"))
_finish = CachedKernel(_elbo_finish_kernel, values=("beta_value",))
_rescale = CachedKernel(_rescale_kernel)
_FINISH_BLOCK = 1024 if not INTERPRET else 1 << 16
_RESCALE_BLOCK = 4096 if not INTERPRET else 1 << 20


@functools.cache
def _blocks(R: int, D: int, itemsize: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) for R rows of D `itemsize`-byte values: `gpu_tile` with BLOCK_D <= 1024."""
    if INTERPRET:
        block_d = min(next_power_of_2(D), 8192)
        return max(1, min(next_power_of_2(R), 65536 // block_d)), block_d, 4
    return gpu_tile(R, D, itemsize, 1024)


def _log_scale_strides(log_scale: Tensor) -> tuple[int, int, int]:
    """Strides of a log-scale (up to 3 dims) broadcast to (S, B, D): a missing or size-1 dimension gets 0."""
    shape, stride = log_scale.shape, log_scale.stride()
    pad = 3 - len(shape)
    return tuple(0 if i < pad or shape[i - pad] == 1 else stride[i - pad] for i in range(3))


def _launch_loglik(
    x: Tensor, out: Tensor, dist: str, log_scale: Tensor | None, log_scale_const: float,
    row_weights: Tensor | None, row_weight_const: float, logp: Tensor | None, dout: Tensor | None,
    dls: Tensor | None, logp_offset: int = 0,
) -> None:
    """One launch of the likelihood kernel over out (S, B, D) or (B, D), any strides, x (B, D), writing the
    outputs given (logp (S*B,) from element `logp_offset` on, dout and dls contiguous like out; None: not
    written). row_weights: (S*B,) per-row weights, or None to weight every row by `row_weight_const`."""
    if out.dim() == 2:
        S, (B, D), so = 1, out.shape, (0, *out.stride())
    else:
        (S, B, D), so = out.shape, out.stride()
    R = S * B
    if R == 0 or D == 0:
        return
    # The plan's key: the layouts its ints, grid and constexprs, and Triton's specialisation, depend on (the
    # outputs are fresh allocations, hence aligned: dout has out's dtype, or fp32 for the fused loss's fp16
    # stash, which only that call makes (logp_offset = STATE_SIZE); logp and dls are fp32).
    key = (
        x.stride(), x.dtype, x.data_ptr() & 15 == 0, out.shape, out.stride(), out.dtype, out.data_ptr() & 15 == 0,
        layout(log_scale), layout(row_weights), logp is None, dout is None, dls is None, logp_offset, dist,
    )  # fmt: skip
    plan = _loglik.plans.get(key)
    if plan is None:
        block_r, block_d, num_warps = _blocks(R, D, min(x.element_size(), out.element_size()))
        sl = (0, 0, 0) if log_scale is None else _log_scale_strides(log_scale)
        plan = _loglik.plan(
            key, (cdiv(R, block_r),),
            (R, B, D, logp_offset, 0, *x.stride(), *so, *sl, 0 if row_weights is None else row_weights.stride(0)),
            (
                DISTRIBUTIONS[dist], log_scale is not None, row_weights is not None,
                logp is not None, dout is not None, dls is not None, block_r, block_d,
            ),
            num_warps,
        )  # fmt: skip
    _loglik.launch(
        plan, (x, out, log_scale, row_weights, logp, dout, dls), (float(log_scale_const), float(row_weight_const))
    )


def stash_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which the fused loss keeps the gradient of a `dtype` tensor from its forward to its
    backward (the stash). fp32 for fp16: the stash holds the gradient for an upstream gradient of 1, about
    residual / R for R rows, which fp16's range would round to a subnormal or zero before a loss scale
    (torch.amp.GradScaler's 65536) could save it; the backward then rounds g * stash once. Otherwise `dtype`
    (fp32, and bf16 with fp32's range), which the backward scales in place."""
    return torch.float32 if dtype == torch.float16 else dtype


def _reduce_to_log_scale(dls: Tensor | None, log_scale: Tensor | None, stash: bool = False) -> Tensor | None:
    """The elementwise fp32 gradient of the log-scale, summed over its broadcast dimensions, in its dtype (with
    `stash`: in `stash_dtype` of it, so an fp16 log-scale's is rounded only once, after the loss scale)."""
    if dls is None:
        return None
    return dls.sum_to_size(log_scale.shape).to(stash_dtype(log_scale.dtype) if stash else log_scale.dtype)


def log_likelihood_launch(
    x: Tensor, out: Tensor, dist: str, log_scale: Tensor | None, log_scale_const: float
) -> Tensor:
    """Per-row log p(x|z): logp (S*B,) fp32 nats, for x (B, D) and out (S, B, D) or (B, D), any strides;
    log_scale: None (use the float `log_scale_const`) or a tensor broadcastable to out."""
    R = out.shape[:-1].numel()
    logp = torch.empty(R, dtype=torch.float32, device=out.device)
    if R and not out.shape[-1]:
        return logp.zero_()
    _launch_loglik(x, out, dist, log_scale, log_scale_const, None, 0.0, logp, None, None)
    return logp


def log_likelihood_grads_launch(
    row_weights: Tensor, x: Tensor, out: Tensor, dist: str, log_scale: Tensor | None, log_scale_const: float,
    need_dls: bool,
) -> tuple[Tensor, Tensor | None]:
    """The weighted gradients of log p(x|z): row_weights (any shape of S*B elements, e.g. the upstream
    gradient of log p) -> (w_r * d log p / d out, contiguous like out; the sum of w_r * d log p / d log_scale
    over the log-scale's broadcast dimensions, in its shape and dtype, or None without `need_dls`)."""
    dout = empty_contiguous(out)
    dls = empty_contiguous(out, torch.float32) if need_dls else None
    _launch_loglik(x, out, dist, log_scale, log_scale_const, row_weights.reshape(-1), 0.0, None, dout, dls)
    return dout, _reduce_to_log_scale(dls, log_scale)


def elbo_launch(
    x: Tensor, out: Tensor, kl: Tensor, dist: str, log_scale: Tensor | None, log_scale_const: float,
    beta: float | Tensor, need_dls: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The fused loss's forward, in two launches: log p and its gradient for an upstream gradient of 1 (the
    stash), then one program that reduces the rows and the KL (B,) to the loss.

    beta: the KL's weight, a float or a one-element tensor on the device (read by the kernel).
    Returns loss () fp32 = -mean over the S*B rows of log p + beta * mean(kl), in nats; the loss's state
    (STATE_SIZE + S*B,) fp32: the scale slots of `rescale_grads` (slot 0 set to 1), the KL's gradient
    (written by `rescale_grads`), at TERMS the batch means of (log p - kl, kl, log p) in nats, beta / B, and
    from STATE_SIZE the rows' log p; and the stash: d loss / d out (contiguous, out's shape) and d loss /
    d log_scale (contiguous, the log-scale's shape) or None, each in `stash_dtype` of its tensor's dtype.
    An empty batch gives NaN, as a mean over no rows does.
    """
    R = out.shape[:-1].numel()
    dev = out.device
    state = torch.empty(STATE_SIZE + R, dtype=torch.float32, device=dev)  # the rows' log p go after the state
    dout = empty_contiguous(out, stash_dtype(out.dtype))
    dls = empty_contiguous(out, torch.float32) if need_dls else None
    if R and not out.shape[-1]:
        state[STATE_SIZE:].zero_()
    _launch_loglik(x, out, dist, log_scale, log_scale_const, None, -1.0 / max(R, 1), state, dout, dls, STATE_SIZE)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    in_memory = type(beta) is not float
    key = (layout(kl), layout(beta) if in_memory else None, R)
    plan = _finish.plans.get(key)
    if plan is None:
        plan = _finish.plan(key, (1,), (R, kl.shape[0], kl.stride(0)), (_FINISH_BLOCK, in_memory), 4)
    _finish.launch(plan, (kl, beta if in_memory else None, loss, state), (0.0 if in_memory else beta,))
    return loss, state, dout, _reduce_to_log_scale(dls, log_scale, stash=True)


def rescale_grads(
    stash: Tensor, stash_ls: Tensor | None, grad: Tensor, state: Tensor, read_slot: int | None,
    dtype: torch.dtype, ls_dtype: torch.dtype,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The fused loss's backward, in one launch: its gradients for the upstream gradient `grad` (a one-element
    tensor), from the stash of `elbo_launch` (stash, stash_ls or None) and its state.

    dtype, ls_dtype: the dtypes of out and of the log-scale, the gradients'. With `read_slot` (the eager path),
    a stash in its gradient's dtype is scaled in place from the upstream gradient state[read_slot] to `grad`
    and is the gradient (skipped on the device when the factor is 1: no bytes move, no host sync); a stash kept
    in fp32 for an fp16 gradient (`stash_dtype`) is only read, and grad * stash, rounded once, written to a new
    tensor; `grad` is recorded in state[1 - read_slot] and the KL's gradient grad * beta / B written to
    state[DKL]. With read_slot None (a traced backward, which must not mutate the forward's outputs), every
    gradient is a new tensor and the stash and the state are only read.
    Returns (d loss / d out, contiguous; d loss / d log_scale, contiguous, or None without stash_ls; with
    read_slot None the KL's gradient grad * beta / B, (1,) fp32, else None)."""
    slots = read_slot is not None
    dout_apart = not slots or dtype != stash.dtype
    dls_apart = stash_ls is not None and (not slots or ls_dtype != stash_ls.dtype)
    dout = torch.empty_like(stash, dtype=dtype) if dout_apart else stash
    dls = torch.empty_like(stash_ls, dtype=ls_dtype) if dls_apart else stash_ls
    dkl = None if slots else torch.empty(1, dtype=torch.float32, device=state.device)
    # The outputs kept apart are fresh allocations (aligned): their dtypes complete the key.
    key = (
        stash.numel(), stash.dtype, stash.data_ptr() & 15 == 0, layout(stash_ls), layout(grad),
        state.data_ptr() & 15 == 0, read_slot, dtype if dout_apart else None, ls_dtype if dls_apart else None,
    )  # fmt: skip
    plan = _rescale.plans.get(key)
    if plan is None:
        n_dout = stash.numel()
        n_dls = 0 if stash_ls is None else stash_ls.numel()
        plan = _rescale.plan(
            key, (max(1, cdiv(max(n_dout, n_dls), _RESCALE_BLOCK)),), (n_dout, n_dls, read_slot or 0),
            (_RESCALE_BLOCK, stash_ls is not None, dout_apart, dls_apart, slots), 8,
        )  # fmt: skip
    _rescale.launch(
        plan, (stash, stash_ls, grad, state, dout if dout_apart else None, dls if dls_apart else None, dkl)
    )
    return dout, dls, dkl
