"""The pictures of a run: the latent-space grids, the matplotlib chart, which pictures a run gets, --no-pictures."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from run_helpers import TINY

from fastvae import rundir, train
from fastvae.images import interpolations, latent_manifold
from fastvae.model import VAE
from fastvae.pictures import pictures_of
from fastvae.plots import training_curves


def tiny_model(latent_dim: int = 2) -> VAE:
    torch.manual_seed(0)
    return VAE((1, 6, 5), latent_dim, hidden=(16,), likelihood="bernoulli").eval()


def test_interpolations_walk_from_one_encoding_to_the_other():
    model = tiny_model(3)
    x = torch.rand(4, 1, 6, 5)
    walks = interpolations(model, x, steps=5)
    assert walks.shape == (2 * 5, 1, 6, 5) and walks.dtype == torch.float32
    rows = walks.reshape(2, 5, 1, 6, 5)
    reconstructions = model.reconstruct(x)
    torch.testing.assert_close(rows[:, 0], reconstructions[0::2])  # each row starts at x[2i]'s encoding ...
    torch.testing.assert_close(rows[:, -1], reconstructions[1::2])  # ... and ends at x[2i+1]'s
    mu, _ = model.encode(x)
    middle = model.to_data_space(model.decode((mu[0::2] + mu[1::2]) / 2)).reshape(2, 1, 6, 5)
    torch.testing.assert_close(rows[:, 2], middle)
    with pytest.raises(ValueError, match="even number"):
        interpolations(model, x[:3])


def test_the_manifold_decodes_the_prior_quantiles_z1_rightwards_z2_upwards():
    model = tiny_model(2)
    grid = latent_manifold(model, n=4)
    assert grid.shape == (16, 1, 6, 5)
    q = torch.special.ndtri((torch.arange(4, dtype=torch.float64) + 0.5) / 4).float()  # -1.15, -0.32, 0.32, 1.15
    for i, j in [(0, 0), (0, 3), (3, 0), (1, 2)]:
        z = torch.stack([q[j], q[3 - i]])[None]
        expected = model.to_data_space(model.decode(z)).reshape(1, 6, 5)
        torch.testing.assert_close(grid[4 * i + j], expected, msg=f"image ({i}, {j})")
    with pytest.raises(ValueError, match="latent_dim 2, got 3"):
        latent_manifold(tiny_model(3))


def test_the_loss_chart_draws_the_elbo_and_the_kl_against_the_step():
    history = [
        {"kind": "train", "step": 4, "elbo": -300.0, "kl": 2.0},
        {"kind": "train", "step": 8, "elbo": -200.0, "kl": 4.0},
        {"kind": "eval", "step": 8, "test_elbo": -210.0, "test_kl": 4.5},
        {"kind": "train", "step": 12, "elbo": -150.0, "kl": 5.0},
        {"kind": "eval", "step": 16, "test_elbo": -140.0, "test_kl": 5.5},
    ]
    figure = training_curves(history)
    elbo, kl = figure.axes
    lines = {line.get_label(): line for axes in (elbo, kl) for line in axes.get_lines()}
    assert list(lines["train ELBO"].get_xdata()) == [4, 8, 12]
    assert list(lines["train ELBO"].get_ydata()) == [-300.0, -200.0, -150.0]
    assert list(lines["test ELBO"].get_xdata()) == [8, 16] and list(lines["test ELBO"].get_ydata()) == [-210, -140]
    assert list(lines["train KL"].get_ydata()) == [2.0, 4.0, 5.0] and list(lines["test KL"].get_ydata()) == [4.5, 5.5]
    assert set(elbo.get_lines()) == {lines["train ELBO"], lines["test ELBO"]}  # the KL on its own panel
    assert elbo.get_title() == "ELBO and KL during training"
    assert (elbo.get_ylabel(), kl.get_ylabel(), kl.get_xlabel()) == (
        "ELBO (nats per sample)", "KL (nats per sample)", "step"
    )


def test_drawing_the_chart_leaves_matplotlib_global_state_alone(tmp_path):
    """No pyplot: it would pick a backend for the whole process (a GUI one where there is a display)."""
    code = (
        "import sys\n"
        "from fastvae.plots import save_training_curves\n"
        "row = {'kind': 'train', 'step': 1, 'elbo': -5.0, 'kl': 1.0}\n"
        f"save_training_curves([row], {str(tmp_path / 'l.png')!r})\n"
        "print('matplotlib.pyplot' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False"], result.stderr
    with Image.open(tmp_path / "l.png") as image:
        assert image.size == (720, 540)


@pytest.mark.parametrize(
    ("shape", "latent_dim", "num_test", "names", "skipped"),
    [
        ((1, 28, 28), 2, 100, rundir.PICTURES, []),
        ((3, 32, 32), 20, 100, ("samples.png", "reconstructions.png", "interpolations.png", "loss.png"), []),
        ((1, 8, 8), 2, 1, ("samples.png", "reconstructions.png", "manifold.png", "loss.png"), ["interpolations"]),
        ((10,), 2, 100, ("loss.png",), ["samples.png, reconstructions.png, interpolations.png: the data are not"]),
    ],
)
def test_which_pictures_a_run_gets(shape, latent_dim, num_test, names, skipped):
    got, reasons = pictures_of(shape, latent_dim, num_test)
    assert tuple(got) == tuple(names)
    assert len(reasons) == len(skipped) and all(r.startswith(s) for r, s in zip(reasons, skipped, strict=True))


@pytest.fixture(scope="module")
def run_2d(tmp_path_factory):
    """A finished CLI run with a 2-D latent space on 8 x 8 sprites."""
    out = tmp_path_factory.mktemp("pictures") / "run"
    assert train.main([*TINY, "--latent-dim", "2", "--epochs", "1", "--out", str(out)]) == 0
    return out


def test_a_2d_run_draws_every_picture(run_2d):
    names = {"samples.png", "reconstructions.png", "interpolations.png", "manifold.png", "loss.png"}
    assert set(rundir.PICTURES) == names
    for name in rundir.PICTURES:
        with Image.open(run_2d / name) as image:
            assert max(image.size) >= 400, name  # 8 x 8 sprites, enlarged to a readable size
            assert len(np.unique(np.asarray(image.convert("L")))) > 2, f"{name} is blank"


def test_the_grids_carry_titles_row_labels_and_z_axes(tmp_path, monkeypatch):
    """Each grid is titled with the data set, step, epoch and test ELBO; the reconstructions' rows are labelled;
    the manifold's axes are z1 and z2 at the prior's quantiles; the pixels are enlarged without smoothing."""
    from matplotlib.axes import Axes

    from fastvae.pictures import RunRecord, draw

    seen: dict[str, list] = {"title": [], "yticks": [], "xlabel": [], "interpolation": []}
    for method, key in (("set_title", "title"), ("set_xlabel", "xlabel")):
        original = getattr(Axes, method)
        monkeypatch.setattr(Axes, method, lambda self, text, *a, _o=original, _k=key, **k: (
            seen[_k].append(text), _o(self, text, *a, **k))[1])
    original_yticks, original_imshow = Axes.set_yticks, Axes.imshow
    monkeypatch.setattr(Axes, "set_yticks", lambda self, ticks, labels=None, **k: (
        seen["yticks"].append(list(labels or [])), original_yticks(self, ticks, labels, **k))[1])
    monkeypatch.setattr(Axes, "imshow", lambda self, x, **k: (
        seen["interpolation"].append(k.get("interpolation")), original_imshow(self, x, **k))[1])
    history = [{"kind": "eval", "step": 40, "epoch": 1, "test_elbo": -123.456}]
    run = RunRecord(tiny_model(), torch.randint(0, 256, (8, 1, 6, 5), dtype=torch.uint8), history, "sprites")
    draw(["samples.png", "reconstructions.png", "manifold.png"], run, tmp_path)
    assert len(seen["title"]) == 3
    assert all("\nsprites, step 40 (epoch 2), test ELBO -123.46 nats" in title for title in seen["title"])
    assert ["test images", "reconstructions"] in seen["yticks"]
    assert seen["xlabel"] == ["z1 (prior quantiles)"]
    z2 = [labels for labels in seen["yticks"] if len(labels) == 20][0]
    assert float(z2[0]) > 1.9 and float(z2[-1]) < -1.9  # z2 upwards, the central 95% of the prior
    assert seen["interpolation"] == ["nearest"] * 3


def test_no_pictures_draws_none(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([*TINY, "--latent-dim", "2", "--epochs", "1", "--no-pictures", "--out", str(out)]) == 0
    assert not list(out.glob("*.png"))
    assert "Pictures: none (--no-pictures)" in capsys.readouterr().out


def test_a_title_wider_than_its_grid_is_not_cut(tmp_path):
    """A long file name over a grid of 2 columns: the picture widens to the title; nothing touches its edges."""
    from fastvae.pictures import RunRecord, draw

    history = [{"kind": "eval", "step": 40, "epoch": 1, "test_elbo": -123.456}]
    name = "my_experiment_with_a_long_descriptive_name_train_split.npy"
    run = RunRecord(tiny_model(), torch.randint(0, 256, (2, 1, 6, 5), dtype=torch.uint8), history, name)
    for path in draw(["reconstructions.png", "interpolations.png"], run, tmp_path):
        with Image.open(path) as image:
            grey = np.asarray(image.convert("L"))
        edges = (grey[:, :3], grey[:, -3:], grey[:3], grey[-3:])  # left, right, top, bottom
        assert all((edge == 255).all() for edge in edges), f"{path.name}: something is drawn at its edge (cut off)"
