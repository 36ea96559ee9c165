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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import INTERPRET, gpu_tile, next_power_of_2

GAUSSIAN = 0
BERNOULLI = 1
DISTRIBUTIONS = {"gaussian": GAUSSIAN, "bernoulli": BERNOULLI}
HALF_LOG_2PI = tl.constexpr(0.9189385332046727)  # 0.5 * log(2*pi)


@triton.jit
def _loglik_kernel(
    x_ptr, out_ptr, ls_ptr, w_ptr, logp_ptr, dout_ptr, dls_ptr,
    R, B, D, ls_const, w_const,
    sx_s, sx_b, sx_d, so_s, so_b, so_d, sl_s, sl_b, sl_d, sw,
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
        tl.store(logp_ptr + rows, acc, mask=row_mask)


@triton.jit
def _rescale_kernel(a_ptr, n, factor_ptr, BLOCK: tl.constexpr):
    # a[:n] *= factor, skipped on the device when factor == 1 (the usual loss.backward()).
    factor = tl.load(factor_ptr).to(tl.float32)
    if factor != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(a_ptr + offs, (a * factor).to(a_ptr.dtype.element_ty), mask=mask)


def _blocks(R: int, D: int, itemsize: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) for R rows of D `itemsize`-byte values: `gpu_tile` with BLOCK_D <= 1024."""
    if INTERPRET:
        block_d = min(next_power_of_2(D), 8192)
        return max(1, min(next_power_of_2(R), 65536 // block_d)), block_d, 4
    return gpu_tile(R, D, itemsize, 1024)


def _strides3(t: Tensor, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Strides of `t` broadcast to (S, B, D): a broadcast dimension gets stride 0."""
    return tuple(t.expand(shape).stride())


def log_likelihood_launch(
    x: Tensor,
    out: Tensor,
    dist: str,
    log_scale: Tensor | None,
    log_scale_const: float,
    *,
    row_weights: Tensor | None = None,
    row_weight_const: float = 0.0,
    write_logp: bool = True,
    write_dout: bool = False,
    write_dls: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the likelihood kernel over out (S, B, D) or (B, D), any strides.

    x: (B, D); log_scale: None (use the float `log_scale_const`) or a tensor broadcastable to out.
    row_weights: (S*B,)-viewable weights w_r, or None to use `row_weight_const` for every row.
    Returns (logp (S*B,) fp32 nats, dout like out (contiguous, out's dtype), dls like out (contiguous,
    fp32, to be reduced to the log-scale's shape)); the gradient outputs are empty (0,) unless asked for.
    """
    shape = (1, *out.shape) if out.dim() == 2 else tuple(out.shape)
    S, B, D = shape
    R = S * B
    dev = out.device
    logp = torch.empty((R,) if write_logp else (0,), dtype=torch.float32, device=dev)
    dout = torch.empty(out.shape if write_dout else (0,), dtype=out.dtype, device=dev)
    dls = torch.empty(out.shape if write_dls else (0,), dtype=torch.float32, device=dev)
    if R == 0:
        return logp, dout, dls
    if D == 0:
        return logp.zero_(), dout, dls
    block_r, block_d, num_warps = _blocks(R, D, min(x.element_size(), out.element_size()))
    ls = log_scale if log_scale is not None else out
    w = row_weights.reshape(-1) if row_weights is not None else logp
    _loglik_kernel[(triton.cdiv(R, block_r),)](
        x, out, ls, w, logp, dout, dls,
        R, B, D, float(log_scale_const), float(row_weight_const),
        *_strides3(x, shape), *_strides3(out.reshape(shape), shape), *_strides3(ls, shape), w.stride(0),
        DIST=DISTRIBUTIONS[dist], HAS_LS_TENSOR=log_scale is not None, HAS_ROW_WEIGHTS=row_weights is not None,
        WRITE_LOGP=write_logp, WRITE_DOUT=write_dout, WRITE_DLS=write_dls,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps,
    )
    return logp, dout, dls


def rescale_(a: Tensor, factor: Tensor) -> None:
    """In place a *= factor (a contiguous; factor a one-element tensor), a no-op on the device if factor == 1."""
    n = a.numel()
    if n == 0:
        return
    block = 4096 if not INTERPRET else 1 << 20
    _rescale_kernel[(triton.cdiv(n, block),)](a, n, factor, BLOCK=block, num_warps=8)

