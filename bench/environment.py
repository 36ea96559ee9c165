"""The environment a benchmark ran in: device name, versions, commit, date. Stored with every result.

    python -m bench.environment --json PATH

writes it for the machine at hand, with, on CUDA, the driver, the CUDA version torch was built with and the
measured device-to-device copy bandwidth (the yardstick for the kernels' GB/s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import torch

import fastvae


def cpu_name() -> str:
    """'CPU: <model name> (<n> cores)' from /proc/cpuinfo, or 'CPU'."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "CPU"


def commit() -> str:
    """`git describe --always --dirty` of the working tree ('-dirty': uncommitted changes), or 'unknown'."""
    try:
        result = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return result.stdout.strip() or "unknown"


def environment(device: torch.device) -> dict[str, str]:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fastvae": fastvae.__version__,
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }


def driver_version() -> str | None:
    """The NVIDIA driver's version from `nvidia-smi`, or None without it."""
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = result.stdout.split()
    return lines[0] if result.returncode == 0 and lines else None


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Measured device copy bandwidth: 1 GiB read + 1 GiB written per copy."""
    from triton.testing import do_bench

    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=20, rep=100)
    return 2 * src.nbytes / ms / 1e6


def machine(device: torch.device) -> dict:
    """`environment(device)` plus the CUDA build, the driver and, on CUDA, the measured copy bandwidth."""
    cuda = device.type == "cuda"
    return {
        **environment(device),
        "cuda": torch.version.cuda,
        "driver": driver_version(),
        "cuda_devices": torch.cuda.device_count() if cuda else 0,
        "copy_bandwidth_gbs": copy_bandwidth_gbs(device) if cuda else None,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="write the record here")
    args = p.parse_args(argv)
    record = machine(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    with open(args.json, "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
