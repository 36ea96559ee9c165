"""Triton kernels of the latent step: reparameterised sample, analytic KL and log-ratio in one pass.

Forward, one launch: read mu and logvar (B, K), draw eps ~ N(0, I) in-kernel with Philox
(`_noise`: `tl.randint4x(seed, counter)` and a Box-Muller transform without trigonometric functions),
write z (S, B, K), kl (B,) and log p(z) - log q(z|x) (S, B).
Backward, one launch: regenerate the same eps from the same seed and counters and write
dmu, dlogvar (B, K). No eps tensor is kept between the two.

The Philox counter of element (s, b, k) is its flat index s*B*K + b*K + k, so the noise does not
depend on block sizes or on the grid. The seed is an int passed with the launch, or a one-element
int64 tensor on the device read in-kernel: a captured CUDA graph then draws new noise on each
replay without a host sync (see `fastvae.functional`). Arithmetic is fp32 whatever the input dtype;
kl and log_ratio are fp32.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import INTERPRET, CachedKernel, LaunchPlan, cdiv, empty_contiguous, gpu_tile, layout, next_power_of_2


@triton.jit
def _noise(seed, sample_row0, rows, cols, K, WIDE_COUNTER: tl.constexpr):
    """eps for a tile; sample_row0 = s*B (int64), rows and cols are int64 index vectors.

    The counter is the flat index of the element in z (S, B, K).
    """
    if WIDE_COUNTER:
        counter = (sample_row0 + rows[:, None]) * K + cols[None, :]
    else:  # S*B*K < 2^31: int32 arithmetic, half the registers of int64
        counter = (sample_row0 + rows).to(tl.int32)[:, None] * K + cols.to(tl.int32)[None, :]
    bits_radius, bits_angle, _, _ = tl.randint4x(seed, counter)
    return _box_muller(bits_radius, bits_angle)


@triton.jit
def _sample_row0(s, B, WIDE_ROWS: tl.constexpr):
    """s*B, the row of z (S*B, K) where sample s starts, as int64: multiplied in int64 where S*B >= 2^31
    (WIDE_ROWS), else in int32, exact there, which took up to 15 fewer registers per thread."""
    if WIDE_ROWS:
        row0 = tl.cast(s, tl.int64) * B
    else:
        row0 = (s * B).to(tl.int64)
    return row0


@triton.jit
def _box_muller(bits_radius, bits_angle):
    """One standard normal r*cos(theta) from two uniform uint32 blocks, without a trigonometric function.

    r = sqrt(-2 log u) with u = (bits_radius + 1/2) / 2^32 in (0, 1]. theta is uniform on the circle: the top
    two bits of bits_angle pick a quadrant q, the other 30 an angle phi uniform in [-pi/4, pi/4), and
    theta = q*pi/2 + phi, so cos(theta) is cos(phi), -sin(phi), -cos(phi) or sin(phi) for q = 0..3. sin and
    cos on [-pi/4, pi/4] are Cephes' sinf/cosf polynomials (error ~1e-7): no range reduction, hence none of
    libdevice's slow path (a local-memory array and a table in global memory).
    """
    u = (bits_radius.to(tl.float32) + 0.5) * 2.3283064365386963e-10  # 2^-32
    r = tl.sqrt(-2.0 * tl.log(u))
    quadrant = bits_angle >> 30
    phi = ((bits_angle & 0x3FFFFFFF).to(tl.float32) * 9.313225746154785e-10 - 0.5) * 1.5707963267948966
    p2 = phi * phi
    sin = phi + phi * p2 * ((-1.9515295891e-4 * p2 + 8.3321608736e-3) * p2 - 1.6666654611e-1)
    cos = 1.0 - 0.5 * p2 + p2 * p2 * ((2.443315711809948e-5 * p2 - 1.388731625493765e-3) * p2 + 4.166664568298827e-2)
    r_cos = r * tl.where((quadrant & 1) == 0, cos, sin)
    return tl.where((quadrant == 1) | (quadrant == 2), -r_cos, r_cos)


@triton.jit
def _seed(seed_ptr, seed_value, SEED_IN_MEMORY: tl.constexpr):
    """The Philox seed: read from device memory (a CUDA graph's replays draw fresh ones) or passed by value.
    One return: after an early one Triton would also compile the other, whose seed_value (0, an int32 then)
    does not match the loaded int64."""
    if SEED_IN_MEMORY:
        seed = tl.load(seed_ptr)
    else:
        seed = seed_value
    return seed


@triton.jit(do_not_specialize=["seed_value"])  # one variant for every seed
def _latent_fwd_kernel(
    mu_ptr, lv_ptr, seed_ptr, z_ptr, kl_ptr, lr_ptr,
    B, K, S,
    stride_mu_b, stride_mu_k, stride_lv_b, stride_lv_k,
    seed_value,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, WIDE_COUNTER: tl.constexpr, WIDE_ROWS: tl.constexpr,
    SEED_IN_MEMORY: tl.constexpr, WRITE_LR: tl.constexpr, LOOP_SAMPLES: tl.constexpr,
):
    # grid: (cdiv(B, BLOCK_B), min(S, 65535)). Each program owns BLOCK_B rows of sample s = program_id(1) and
    # loops over K; with LOOP_SAMPLES (S > 65535, CUDA's limit on grid y) also over the samples s + 65535,
    # s + 2*65535, ... Without it the loop over samples has one iteration, which the compiler removes (as a
    # loop it took up to 16 more registers per thread).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_mask = rows < B
    seed = _seed(seed_ptr, seed_value, SEED_IN_MEMORY)
    if LOOP_SAMPLES:
        samples_here = tl.cdiv(S - tl.program_id(1), tl.num_programs(1))
    else:
        samples_here = 1
    for i in range(samples_here):
        s = tl.program_id(1) + i * tl.num_programs(1)
        sample_row0 = _sample_row0(s, B, WIDE_ROWS)
        kl_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
        lr_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            mask = row_mask[:, None] & (cols[None, :] < K)
            mu = tl.load(mu_ptr + rows[:, None] * stride_mu_b + cols[None, :] * stride_mu_k, mask=mask, other=0.0)
            lv = tl.load(lv_ptr + rows[:, None] * stride_lv_b + cols[None, :] * stride_lv_k, mask=mask, other=0.0)
            mu = mu.to(tl.float32)
            lv = lv.to(tl.float32)
            eps = _noise(seed, sample_row0, rows, cols, K, WIDE_COUNTER)
            std = tl.exp(0.5 * lv)
            z = mu + std * eps
            z_offs = (sample_row0 + rows[:, None]) * K + cols[None, :]
            tl.store(z_ptr + z_offs, z.to(z_ptr.dtype.element_ty), mask=mask)
            kl_acc += tl.sum(tl.where(mask, std * std + mu * mu - 1.0 - lv, 0.0), axis=1)
            # Halved per element before the sum, as in the reference: with z*z near the fp32 limit
            # (logvar ~ 88) halving after the sum would overflow to -inf where the reference is finite.
            if WRITE_LR:
                lr_acc += tl.sum(tl.where(mask, 0.5 * (eps * eps - z * z + lv), 0.0), axis=1)
        tl.store(kl_ptr + rows, 0.5 * kl_acc, mask=row_mask & (s == 0))
        if WRITE_LR:
            tl.store(lr_ptr + sample_row0 + rows, lr_acc, mask=row_mask)


@triton.jit(do_not_specialize=["seed_value"])
def _latent_bwd_kernel(
    mu_ptr, lv_ptr, seed_ptr, gz_ptr, gkl_ptr, glr_ptr, dmu_ptr, dlv_ptr,
    B, K, S,
    stride_mu_b, stride_mu_k, stride_lv_b, stride_lv_k,
    stride_gz_s, stride_gz_b, stride_gz_k, stride_gkl, stride_glr_s, stride_glr_b,
    seed_value,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, WIDE_COUNTER: tl.constexpr, WIDE_ROWS: tl.constexpr,
    SEED_IN_MEMORY: tl.constexpr, HAS_GKL: tl.constexpr, HAS_GLR: tl.constexpr,
):
    # grid: (cdiv(B, BLOCK_B), cdiv(K, BLOCK_K)). Each program owns one tile and loops over the S samples.
    # Without HAS_GKL / HAS_GLR the kl / log-ratio outputs were not used: their upstream gradients are 0.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    row_mask = rows < B
    mask = row_mask[:, None] & (cols[None, :] < K)
    seed = _seed(seed_ptr, seed_value, SEED_IN_MEMORY)
    mu = tl.load(mu_ptr + rows[:, None] * stride_mu_b + cols[None, :] * stride_mu_k, mask=mask, other=0.0)
    lv = tl.load(lv_ptr + rows[:, None] * stride_lv_b + cols[None, :] * stride_lv_k, mask=mask, other=0.0)
    mu = mu.to(tl.float32)
    lv = lv.to(tl.float32)
    std = tl.exp(0.5 * lv)
    # d kl / d mu = mu, d kl / d logvar = 0.5 * (exp(logvar) - 1). A zero upstream gradient (an unused
    # output) contributes exactly 0, as in autograd, not 0 * inf = NaN once exp(logvar) overflows.
    if HAS_GKL:
        gkl = tl.load(gkl_ptr + rows * stride_gkl, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        dmu = gkl * mu
        dlv = tl.where(gkl != 0.0, gkl * 0.5 * (std * std - 1.0), 0.0)
    else:
        dmu = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
        dlv = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    gz_offs = rows[:, None] * stride_gz_b + cols[None, :] * stride_gz_k
    glr_offs = rows * stride_glr_b
    for s in range(0, S):
        eps = _noise(seed, _sample_row0(s, B, WIDE_ROWS), rows, cols, K, WIDE_COUNTER)
        z = mu + std * eps
        gz = tl.load(gz_ptr + gz_offs, mask=mask, other=0.0).to(tl.float32)
        gz_offs += stride_gz_s
        # dz/dmu = 1, dz/dlogvar = 0.5*std*eps; d lr/dz = -z, and lr has a direct 0.5 per logvar.
        if HAS_GLR:
            glr = tl.load(glr_ptr + glr_offs, mask=row_mask, other=0.0).to(tl.float32)[:, None]
            glr_offs += stride_glr_s
            # An unused log-ratio (glr = 0) must not turn an infinite z (logvar > ~177) into NaN.
            gz = gz - tl.where(glr != 0.0, glr * z, 0.0)
            dlv += gz * 0.5 * std * eps + 0.5 * glr
        else:
            dlv += gz * 0.5 * std * eps
        dmu += gz
    out_offs = rows[:, None] * K + cols[None, :]
    tl.store(dmu_ptr + out_offs, dmu.to(dmu_ptr.dtype.element_ty), mask=mask)
    tl.store(dlv_ptr + out_offs, dlv.to(dlv_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _blocks(B: int, K: int, itemsize: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_K, num_warps) for mu (B, K) of `itemsize`-byte values: `gpu_tile` with BLOCK_K <= 128.
    Every value a thread holds carries its own Philox state through 10 rounds, so registers grow with values
    per thread (16 fp32, the first choice, took up to 255)."""
    if INTERPRET:
        block_k = min(next_power_of_2(K), 1024)
        return max(1, min(next_power_of_2(B), 16384 // block_k)), block_k, 4
    return gpu_tile(B, K, itemsize, 128)


_WIDE = 2**31  # S*B*K from which the Philox counters need int64 arithmetic, S*B from which s*B does
_MAX_GRID_Y = 65535  # CUDA's limit on grid y: past it the forward's programs loop over the samples
_forward = CachedKernel(_latent_fwd_kernel, values=("seed_value",))
_backward = CachedKernel(_latent_bwd_kernel, values=("seed_value",))


def _seed_key(seed: int | Tensor) -> object:
    """A plan key's part for the seed: a tensor's layout, or the Triton type of an int, which Triton picks by
    its value even for a `do_not_specialize` argument (i32 if it fits, else i64, u64 from 2^63): the variant
    compiled for an i32 seed cannot take a 64-bit one."""
    if type(seed) is not int:
        return layout(seed)
    return "i32" if -(2**31) <= seed < 2**31 else "i64" if seed < 2**63 else "u64"


def _device_seed(device: torch.device) -> Tensor:
    """A placeholder of the seed a call inside a CUDA graph capture passes (`fastvae.functional._draw_seed`):
    an int64 (1,) tensor on `device`, fresh, hence 16-byte aligned (its address is specialised on)."""
    return torch.empty(1, dtype=torch.int64, device=device)


def _forward_plan(
    mu: Tensor, logvar: Tensor, seed: int | Tensor, samples: int, log_ratio: bool
) -> LaunchPlan:
    """The forward's plan for these inputs (built on a miss). mu, logvar: (B, K)."""
    # The plan's key: the layouts its ints, grid and constexprs, and Triton's specialisation, depend on
    # (z, kl and lr are fresh allocations, hence aligned; z has mu's dtype).
    key = (
        mu.shape, mu.stride(), logvar.stride(), mu.dtype, logvar.dtype, mu.data_ptr() & 15 == 0,
        logvar.data_ptr() & 15 == 0, samples, _seed_key(seed), log_ratio,
    )  # fmt: skip
    plan = _forward.plans.get(key)
    if plan is not None:
        return plan
    B, K = mu.shape
    block_b, block_k, num_warps = _blocks(B, K, mu.element_size())
    plan = _forward.plan(
        key, (cdiv(B, block_b), min(samples, _MAX_GRID_Y)), (B, K, samples, *mu.stride(), *logvar.stride()),
        (
            block_b, block_k, samples * B * K >= _WIDE, samples * B >= _WIDE, type(seed) is not int, log_ratio,
            samples > _MAX_GRID_Y,
        ),
        num_warps,
    )  # fmt: skip
    return plan


def latent_forward(
    mu: Tensor, logvar: Tensor, seed: int | Tensor, samples: int, log_ratio: bool = True, squeeze: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Launch the forward kernel. mu, logvar: (B, K) any strides; seed: an int in [2^31, 2^62), or an int64
    (1,) tensor on mu's device that the kernel reads.

    Returns z (S, B, K) contiguous in mu's dtype ((B, K) for samples = 1 with `squeeze`), kl (B,) fp32, and
    log_ratio (S, B) fp32 (None without `log_ratio`: not computed).

    The first call of a kind on a device with an int seed also compiles and loads there
    (`CachedKernel.prepare`) the variant that the same call launches inside a CUDA graph capture, where its
    seed is a device tensor: CUDA refuses to load a module during a capture.
    """
    B, K = mu.shape
    dev = mu.device
    # (Sizes as separate ints, and empty_like where it gives the layout: the cheapest calls on the host.)
    if squeeze and samples == 1:
        z = empty_contiguous(mu)
    else:
        z = torch.empty(samples, B, K, dtype=mu.dtype, device=dev)
    kl = torch.empty(B, dtype=torch.float32, device=dev)
    lr = torch.empty(samples, B, dtype=torch.float32, device=dev) if log_ratio else None
    if B == 0 or K == 0:
        return z, kl.zero_(), lr if lr is None else lr.zero_()
    in_memory = type(seed) is not int
    plan = _forward_plan(mu, logvar, seed, samples, log_ratio)
    loaded = _forward.launch(plan, (mu, logvar, seed if in_memory else None, z, kl, lr), (0 if in_memory else seed,))
    if loaded and not in_memory:  # its first launch on this device, which a capture would have refused
        device_seed = _device_seed(dev)
        twin = _forward_plan(mu, logvar, device_seed, samples, log_ratio)
        _forward.prepare(twin, (mu, logvar, device_seed, z, kl, lr), (0,))
    return z, kl, lr


def _backward_plan(
    grad_z: Tensor, grad_kl: Tensor | None, grad_lr: Tensor | None, mu: Tensor, logvar: Tensor, seed: int | Tensor
) -> LaunchPlan:
    """The backward's plan for these inputs (as `latent_backward` takes them; built on a miss)."""
    key = (
        grad_z.shape, grad_z.stride(), grad_z.dtype, grad_z.data_ptr() & 15 == 0, layout(grad_kl),
        layout(grad_lr), mu.stride(), logvar.stride(), mu.dtype, logvar.dtype, mu.data_ptr() & 15 == 0,
        logvar.data_ptr() & 15 == 0, _seed_key(seed),
    )  # fmt: skip
    plan = _backward.plans.get(key)
    if plan is not None:
        return plan
    samples, B, K = grad_z.shape if grad_z.dim() == 3 else (1, *grad_z.shape)
    gz_strides = grad_z.stride() if grad_z.dim() == 3 else (0, *grad_z.stride())
    block_b, block_k, num_warps = _blocks(B, K, mu.element_size())
    plan = _backward.plan(
        key, (cdiv(B, block_b), cdiv(K, block_k)),
        (
            B, K, samples, *mu.stride(), *logvar.stride(), *gz_strides,
            0 if grad_kl is None else grad_kl.stride(0), *((0, 0) if grad_lr is None else grad_lr.stride()),
        ),
        (
            block_b, block_k, samples * B * K >= _WIDE, samples * B >= _WIDE, type(seed) is not int,
            grad_kl is not None, grad_lr is not None,
        ),
        num_warps,
    )  # fmt: skip
    return plan


def latent_backward(
    grad_z: Tensor, grad_kl: Tensor | None, grad_lr: Tensor | None, mu: Tensor, logvar: Tensor, seed: int | Tensor
) -> tuple[Tensor, Tensor]:
    """Launch the backward kernel. grad_z: (S, B, K), or (B, K) for one sample; grad_kl: (B,); grad_lr:
    (S, B); any strides (a broadcast stride of 0 included). None for grad_kl or grad_lr: that output was not
    used (a zero gradient). Like `latent_forward`, the first call of a kind with an int seed also prepares
    the variant of the same call inside a CUDA graph capture.

    Returns dmu, dlogvar (B, K) contiguous, in mu's and logvar's dtypes.
    """
    dmu, dlv = empty_contiguous(mu), empty_contiguous(logvar)
    if mu.numel() == 0:  # B == 0 or K == 0
        return dmu, dlv
    in_memory = type(seed) is not int
    plan = _backward_plan(grad_z, grad_kl, grad_lr, mu, logvar, seed)
    pointers = (mu, logvar, seed if in_memory else None, grad_z, grad_kl, grad_lr, dmu, dlv)
    if _backward.launch(plan, pointers, (0 if in_memory else seed,)) and not in_memory:  # as in latent_forward
        device_seed = _device_seed(mu.device)
        twin = _backward_plan(grad_z, grad_kl, grad_lr, mu, logvar, device_seed)
        _backward.prepare(twin, (mu, logvar, device_seed, *pointers[3:]), (0,))
    return dmu, dlv
