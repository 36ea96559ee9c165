"""The environment a benchmark ran in: device name, versions, commit, date. Stored with every result."""

from __future__ import annotations

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
