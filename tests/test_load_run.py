"""`fastvae.load_run(RUN_DIR)`: the trained model, ready to use, and its config; or one clear RunError."""

from __future__ import annotations

import json

import pytest
import torch
from run_helpers import TINY

import fastvae
from fastvae import checkpoint, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("load") / "run"
    assert train.main([*TINY, "--epochs", "1", "--likelihood", "bernoulli", "--no-pictures", "--out", str(out)]) == 0
    return out


def test_load_run_gives_the_trained_model_and_its_config(run_dir):
    model, config = fastvae.load_run(str(run_dir), device="cpu")
    assert isinstance(model, fastvae.VAE) and not model.training
    assert config == json.loads((run_dir / "config.json").read_text())
    assert (model.data_shape, model.latent_dim, model.likelihood) == ((1, 8, 8), 3, "bernoulli")
    weights = checkpoint.load(run_dir / "checkpoint.pt")["model"]
    assert all(torch.equal(value, weights[name]) for name, value in model.state_dict().items())
    assert model.impl == "auto" and next(model.parameters()).device == torch.device("cpu")
    images = model.sample(5)
    assert images.shape == (5, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    mu, logvar = model.encode(images)
    assert mu.shape == logvar.shape == (5, 3)
    assert model.reconstruct(images).shape == images.shape
    assert fastvae.load_run(run_dir)[0].state_dict().keys() == model.state_dict().keys()  # default device


def _checkpoint_with(run_dir, tmp_path, change):
    """A copy of the run whose checkpoint's state goes through `change` (which edits it in place)."""
    out = tmp_path / "changed"
    out.mkdir()
    state = checkpoint.load(run_dir / "checkpoint.pt")
    change(state)
    checkpoint.save(out / "checkpoint.pt", {k: v for k, v in state.items() if k not in ("format", "version")})
    return out


def _truncated(run_dir, tmp_path):
    out = tmp_path / "truncated"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes()[:2000])
    return out


def _next_version(run_dir, tmp_path):
    out = tmp_path / "next"
    out.mkdir()
    state = checkpoint.load(run_dir / "checkpoint.pt")
    torch.save({**state, "version": checkpoint.FORMAT_VERSION + 1}, out / "checkpoint.pt")
    return out


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda run, tmp: tmp / "nowhere", r"nowhere does not exist: pass the directory that"),
        (lambda run, tmp: run / "config.json", r"config\.json is a file, not a run directory"),
        (lambda run, tmp: tmp, r"checkpoint\.pt not found: .* is not a fastvae run directory"),
        (_truncated, r"checkpoint\.pt is truncated or corrupt"),
        (
            _next_version,
            rf"checkpoint\.pt has checkpoint format version {checkpoint.FORMAT_VERSION + 1}; "
            rf"this fastvae reads version {checkpoint.FORMAT_VERSION}",
        ),
        (
            lambda run, tmp: _checkpoint_with(run, tmp, lambda s: s["config"].pop("latent_dim")),
            r"checkpoint\.pt: its config has no 'latent_dim' setting \(written by fastvae 0\.1\.0, this is 0\.1\.0\)",
        ),
        (
            lambda run, tmp: _checkpoint_with(run, tmp, lambda s: s["config"].update(hidden=[7])),
            r"checkpoint\.pt: its weights do not fit the model its config describes",
        ),
        (
            lambda run, tmp: _checkpoint_with(run, tmp, lambda s: s["config"].update(arch="transformer")),
            r"checkpoint\.pt: its config describes no model this fastvae builds: arch must be one of",
        ),
    ],
    ids=["missing", "a file", "no checkpoint", "truncated", "another version", "old config", "wrong weights", "arch"],
)
def test_a_path_that_is_not_a_loadable_run_is_one_run_error(run_dir, tmp_path, make, message):
    path = make(run_dir, tmp_path)
    with pytest.raises(fastvae.RunError, match=message) as info:
        fastvae.load_run(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_value_error(run_dir):
    with pytest.raises(ValueError, match="device='cuda': CUDA is not available on this machine"):
        fastvae.load_run(run_dir, device="cuda")


@pytest.mark.gpu
def test_load_run_onto_the_gpu_runs_the_fused_ops(run_dir):
    model, _ = fastvae.load_run(run_dir, device="cuda")
    x = model.sample(4)
    assert x.is_cuda and torch.isfinite(model.elbo(x)).all()
