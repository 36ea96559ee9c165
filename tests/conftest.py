"""Shared fixtures. Without CUDA, Triton kernels run under the interpreter (set before triton loads)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import KERNEL_DEVICE  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture
def kernel_device() -> torch.device:
    return KERNEL_DEVICE


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make torch.empty return NaN-filled floats (and -7 for ints), so an unwritten output fails a test."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", empty)
    return empty
