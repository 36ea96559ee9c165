"""examples/latent_diffusion_autoencoder.py at a tiny size, on the CPU with the reference ops: its latent is
(4, H/8, W/8) with a learned per-channel scale, it trains with `fastvae.fit` and resumes exactly, `load_run`
rebuilds it by import, `python -m fastvae.train --model examples.latent_diffusion_autoencoder:build` trains it
from the repository root, and its `main` trains on the coloured sprites and on CIFAR-10 files."""

from __future__ import annotations

import importlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from run_helpers import TIMING, assert_same_state, metrics_rows
from test_cifar10 import write_cifar10

import fastvae
from fastvae import checkpoint
from fastvae.data import render_sprites
from fastvae.model import floored_log_scale

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `examples` is imported from the repository root, as `python -m` does
    sys.path.insert(0, str(ROOT))
example = importlib.import_module("examples.latent_diffusion_autoencoder")

TINY = {"channels": [4, 8, 8], "latent_channels": 4}  # three stride-2 levels: H/8
SIDE = 16
# 20 coloured sprites: fit holds out 10% (2) for the test split, leaving 18 to train in batches of 4: 4 steps
# per epoch, 2 epochs; statistics every 3 steps, so a stop after step 5 falls inside a window and epoch 2.
FIT = {
    "epochs": 2, "batch_size": 4, "log_every": 3, "lr": 3e-3, "device": "cpu", "fused": False, "pictures": False,
    "model_args": TINY,
}  # fmt: skip


def _sprites() -> torch.Tensor:
    return torch.from_numpy(example.coloured_sprites(20, SIDE))


def _untimed(rows: dict[str, dict]) -> dict[str, dict]:
    return {kind: {k: v for k, v in row.items() if k not in TIMING} for kind, row in rows.items()}


def _same_weights(model: fastvae.VAE, run_dir: Path) -> bool:
    weights = checkpoint.load(run_dir / "checkpoint.pt")["model"]
    return model.state_dict().keys() == weights.keys() and all(
        torch.equal(value.cpu(), weights[name]) for name, value in model.state_dict().items()
    )


def _last_eval(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == "eval"][-1]


# ------------------------------------------------------------------------------------------- the model


def test_the_latent_is_a_feature_map_of_an_eighth_of_the_side_with_a_scale_per_channel():
    torch.manual_seed(0)
    model = example.build((3, SIDE, SIDE), **TINY)
    h = SIDE // 8
    assert model.latent_shape == (4, h, h) and torch.equal(model.log_scale, torch.full((3, 1, 1), -2.0))
    assert example.build((3, SIDE, SIDE), log_scale_init=-1.0).log_scale.eq(-1.0).all()
    x = _sprites()[:5].float() / 255
    moments = model.encoder(x)
    assert moments.shape == (5, 8, h, h)  # an AutoencoderKL's moments: mu, then logvar, along dim 1
    mu, logvar = model.encode(x)
    assert torch.equal(torch.cat([mu, logvar], dim=1), moments)
    assert model.decoder(mu).shape == x.shape and model.sample(2).shape == (2, 3, SIDE, SIDE)
    with torch.no_grad():
        model.log_scale.copy_(torch.tensor([-1.0, 0.0, 0.5]).view(3, 1, 1))
    # The model's loss is the ops' loss on the images as they are, with the per-channel log sigma (3, 1, 1).
    torch.manual_seed(1)
    loss = model.loss(x).loss
    torch.manual_seed(1)
    z, kl = fastvae.sample_latent(*model.encode(x))
    by_hand = fastvae.elbo_loss(x, model.decoder(z), kl, log_scale=floored_log_scale(model.log_scale))
    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=0.0)
    loss.backward()
    assert model.log_scale.grad.shape == (3, 1, 1) and bool(model.log_scale.grad.ne(0).all())


def test_the_levels_set_the_downsampling_and_bad_shapes_are_named():
    assert example.build((1, 32, 32), channels=(4, 8)).latent_shape == (4, 8, 8)  # two levels: H/4
    assert example.build((3, 32, 16), latent_channels=2).latent_shape == (2, 4, 2)
    with pytest.raises(ValueError, match=r"divisible by 8 \(3 stride-2 levels\), got data_shape \(3, 28, 28\)"):
        example.build((3, 28, 28))
    with pytest.raises(ValueError, match=r"images of shape \(C, H, W\) are needed, got data_shape \(784,\)"):
        example.build((784,))


def test_coloured_sprites_are_deterministic_colour_images():
    images = example.coloured_sprites(12, SIDE, seed=3)
    assert images.shape == (12, 3, SIDE, SIDE) and images.dtype == np.uint8
    assert np.array_equal(images, example.coloured_sprites(12, SIDE, seed=3))
    assert np.array_equal(images[:5], example.coloured_sprites(5, SIDE, seed=3))  # a prefix keeps its images
    assert not np.array_equal(images, example.coloured_sprites(12, SIDE, seed=4))
    assert not (np.array_equal(images[:, 0], images[:, 1]) or np.array_equal(images[:, 1], images[:, 2]))
    grey = render_sprites(12, SIDE, seed=(3, 0))[0]
    # Where a sprite covers a pixel fully, its foreground colour is there; the uncovered background is darker.
    inside, outside = grey[:, 0] == 255, grey[:, 0] == 0
    for image, full, empty in zip(images, inside, outside, strict=True):
        assert image[:, full].min() >= math.floor(0.3 * 255) and image[:, empty].max() <= math.ceil(0.3 * 255)


# ------------------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """An uninterrupted fit of the factory on coloured sprites."""
    out = tmp_path_factory.mktemp("example") / "whole"
    run_dir, final = fastvae.fit(example.build, _sprites(), out=out, **FIT)
    return run_dir, final


@pytest.mark.slow
def test_fit_trains_the_example_and_resumes_exactly(whole_run, tmp_path):
    whole, final = whole_run
    stopped, _ = fastvae.fit(example.build, _sprites(), out=tmp_path / "stopped", stop_after=5, **FIT)
    assert checkpoint.load(stopped / "checkpoint.pt")["step"] == 5
    resumed, final_resumed = fastvae.fit(example.build, _sprites(), resume=stopped, **FIT)
    assert _untimed(final_resumed) == _untimed(final)
    assert metrics_rows(resumed) == metrics_rows(whole)
    assert_same_state(resumed, whole)
    assert math.isfinite(final["eval"]["test_elbo"]) and final["train"]["step"] == 8
    config = json.loads((whole / "config.json").read_text())
    assert (config["model_source"], config["model"], config["model_args"]) == ("factory", example.MODEL, TINY)
    assert (config["latent_dim"], config["latent_shape"], config["sigma"]) == (16, [4, 2, 2], "learned")


@pytest.mark.slow
def test_load_run_rebuilds_the_example_by_import(whole_run):
    whole, _ = whole_run
    model, config = fastvae.load_run(whole, device="cpu")
    assert isinstance(model.encoder, example.Encoder) and isinstance(model.decoder, example.Decoder)
    assert model.latent_shape == (4, SIDE // 8, SIDE // 8) and model.log_scale.shape == (3, 1, 1)
    assert _same_weights(model, whole)
    assert tuple(config["data_shape"]) == (3, SIDE, SIDE)
    assert model.sample(2).shape == (2, 3, SIDE, SIDE)


@pytest.mark.slow
def test_the_cli_trains_the_example_factory_on_cifar10_files(tmp_path):
    """`python -m fastvae.train --model examples.latent_diffusion_autoencoder:build`, run from the repository
    root in a fresh process, so the example is imported as a user's would be."""
    write_cifar10(tmp_path / "data")
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "fastvae.train", "--model", example.MODEL, "--model-args", json.dumps(TINY),
        "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--batch-size", "5", "--epochs", "1",
        "--device", "cpu", "--no-fused", "--no-pictures", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    model, config = fastvae.load_run(out, device="cpu")
    assert (config["model"], config["latent_shape"]) == (example.MODEL, [4, 4, 4])
    assert model.data_shape == (3, 32, 32) and model.log_scale.shape == (3, 1, 1)
    assert _same_weights(model, out)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["sprites", "cifar10"])
def test_main_trains_and_prints_the_final_test_elbo(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--channels", "4,8,8", "--epochs", "1", "--batch-size", "6", "--device", "cpu", "--out", str(out)]
    if dataset == "sprites":
        args += ["--num-images", "20", "--image-size", str(SIDE)]  # with the pictures
    else:
        write_cifar10(tmp_path / "data")
        args += ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--no-pictures"]
    assert example.main(args) == 0
    printed = capsys.readouterr().out
    found = re.search(r"test ELBO (-?[\d.]+) nats per image\n$", printed)
    assert found and found.group(1) == f"{_last_eval(out)['test_elbo']:.1f}", printed
    side = SIDE if dataset == "sprites" else 32
    assert json.loads((out / "config.json").read_text())["data_shape"] == [3, side, side]
    if dataset == "sprites":
        assert all((out / name).stat().st_size > 0 for name in ("samples.png", "reconstructions.png", "loss.png"))
        # The example's own --resume renders the same images again, and the run goes on with a second epoch.
        steps = checkpoint.load(out / "checkpoint.pt")["step"]
        resume = [a for a in args if a not in ("--out", str(out))]
        assert example.main([*resume, "--resume", str(out), "--epochs", "2"]) == 0
        assert checkpoint.load(out / "checkpoint.pt")["step"] == 2 * steps
        capsys.readouterr()
    assert example.main([*args, "--epochs", "0"]) == 2  # an `error:` line
    assert capsys.readouterr().err.startswith("error: ")
