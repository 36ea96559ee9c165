"""A learned Gaussian scale stays above LOG_SCALE_FLOOR, on both paths, however far training pushes it down.

Without the floor, a decoder that reproduces x exactly drives log sigma below -44.4, where log p(x|z) is NaN
(docs/maths.md, "Extreme inputs"); with it the likelihood sees log sigma > -6 and stays finite.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastvae.model
from fastvae.model import LOG_SCALE_FLOOR, VAE, floored_log_scale


def test_the_soft_floor_keeps_values_and_gradients_above_it():
    raw = torch.tensor([-1000.0, -50.0, -6.0, -3.0, 0.0, 4.0], requires_grad=True)
    floored = floored_log_scale(raw)
    values = floored.tolist()
    assert min(values) >= LOG_SCALE_FLOOR
    assert values[0] == values[1] == LOG_SCALE_FLOOR  # softplus underflows to 0 exactly
    assert values[2] == pytest.approx(LOG_SCALE_FLOOR + np.log(2.0))
    torch.testing.assert_close(floored[3:], raw[3:].detach(), atol=0.05, rtol=0)  # close to raw well above it
    floored.sum().backward()
    assert (raw.grad[1:] > 0).all() and (raw.grad <= 1).all()  # sigmoid(raw - floor): a way back up


def _push_down(impl: str, device: torch.device) -> tuple[VAE, list[float]]:
    """60 Adam steps (lr 1) on all-zero data with a decoder that outputs exactly 0, so that every step pushes
    the learned log-scale down. Returns the model and the losses."""
    torch.manual_seed(0)
    model = VAE(6, 2, hidden=(8,), sigma="learned", impl=impl).to(device)
    last = model.decoder[-1]
    torch.nn.init.zeros_(last.weight), torch.nn.init.zeros_(last.bias)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0)
    x = torch.zeros(16, 6, device=device)
    losses = []
    for _ in range(60):
        out = model.loss(x)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    return model, losses


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_training_that_pushes_the_scale_down_stays_finite(impl, kernel_device, monkeypatch):
    device = kernel_device if impl == "triton" else torch.device("cpu")
    model, losses = _push_down(impl, device)
    assert all(np.isfinite(losses))
    raw = model.log_scale.detach()
    assert raw.max() < LOG_SCALE_FLOOR  # pushed past the floor ...
    assert (floored_log_scale(raw) >= LOG_SCALE_FLOOR).all()  # ... but the likelihood sees it above
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # The same training without the floor reaches log sigma < -44.4, where log p(x|z) is NaN.
    monkeypatch.setattr(fastvae.model, "floored_log_scale", lambda raw: raw)
    _, losses = _push_down(impl, device)
    assert np.isfinite(losses[:40]).all() and np.isnan(losses[-1])
