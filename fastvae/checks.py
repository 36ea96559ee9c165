"""Input validation for the public ops: clear ValueError/TypeError naming the argument, before any kernel."""

from __future__ import annotations

import math
import numbers
import os
import sys

import torch
from torch import Tensor

IMPLS = ("auto", "triton", "torch")
DISTS = ("gaussian", "bernoulli")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def float_tensor(name: str, t: object) -> Tensor:
    """`t` must be a floating-point tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {t.dtype}")
    return t


def same_device(**tensors: Tensor) -> None:
    names = list(tensors)
    first = tensors[names[0]]
    for name in names[1:]:
        if tensors[name].device != first.device:
            raise ValueError(
                f"`{name}` is on {tensors[name].device} but `{names[0]}` is on {first.device}; "
                "move them to the same device"
            )


def choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value  # type: ignore[return-value]


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value}")
    return int(value)


def real_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}")
    return float(value)


def finite_non_negative(name: str, value: object) -> float:
    """A real number that is finite and >= 0 (e.g. a KL weight)."""
    number = real_number(name, value)
    if not (math.isfinite(number) and number >= 0.0):
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")
    return number


def weight_tensor(name: str, t: Tensor, device: torch.device) -> Tensor:
    """A weight given as a tensor: one element, floating point, on `device`, needing no gradient."""
    if t.numel() != 1 or not t.is_floating_point():
        raise TypeError(
            f"`{name}` given as a tensor must have one floating-point element, got {t.dtype} {tuple(t.shape)}"
        )
    if t.device != device:
        raise ValueError(f"`{name}` is on {t.device} but the data are on {device}; move it to the same device")
    if t.requires_grad:
        raise ValueError(f"`{name}` must not require grad (it is a weight, not a parameter); pass {name}.detach()")
    return t.reshape(())


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_on_cpu() -> bool:
    """Whether the fused kernels take CPU tensors: under Triton's interpreter (TRITON_INTERPRET=1), or with
    the compile-only driver of `fastvae.kernels.compile_only` active (it compiles them and launches nothing;
    for host-time measurements). Imports nothing that is not loaded already."""
    compile_only = sys.modules.get("fastvae.kernels.compile_only")
    return (compile_only is not None and compile_only.active()) or interpreter_enabled()


def resolve_impl(impl: object, **tensors: Tensor) -> str:
    """Pick "triton" or "torch" for these (already validated, same-device) tensors.

    "auto": Triton for CUDA tensors of a kernel dtype (fp32, bf16, fp16), the reference otherwise.
    "triton": demands a CUDA device (or TRITON_INTERPRET=1 on the CPU) and kernel dtypes.
    """
    device = next(iter(tensors.values())).device
    kernel_dtypes = all(t.dtype in KERNEL_DTYPES for t in tensors.values())
    if impl == "auto":
        return "triton" if device.type == "cuda" and kernel_dtypes else "torch"
    if impl == "triton" and kernel_dtypes and (device.type == "cuda" or kernels_on_cpu()):
        return impl
    impl = choice("impl", impl, IMPLS)
    if impl == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and kernels_on_cpu()):
            raise ValueError(
                f"impl='triton' needs CUDA tensors, got tensors on {device}. Use impl='torch' (or 'auto'), "
                "or set TRITON_INTERPRET=1 to run the kernels on the CPU under Triton's (slow) interpreter"
            )
        for name, t in tensors.items():
            if t.dtype not in KERNEL_DTYPES:
                raise TypeError(
                    f"impl='triton' takes float32, bfloat16 or float16 for `{name}`, got {t.dtype}; "
                    "use impl='torch' for other dtypes"
                )
    return impl
