"""Channel-last (N, H, W, C) images are recognised and moved to (N, C, H, W); --layout overrides the guess."""

import numpy as np
import pytest
import torch

from fastvae.data import DataError, load_dataset


def _nhwc(tmp_path, shape=(6, 8, 12, 3)):
    path = tmp_path / "nhwc.npy"
    np.save(path, np.arange(np.prod(shape), dtype=np.int64).reshape(shape) % 256)
    return path


def test_channel_last_is_moved_to_channel_first_with_a_note(tmp_path):
    path = _nhwc(tmp_path)
    data = load_dataset(str(path), seed=0)
    assert data.sample_shape == (3, 8, 12)
    both = torch.cat([data.train, data.test])
    original = torch.from_numpy(np.load(path)).to(torch.uint8).permute(0, 3, 1, 2)
    rows = sorted(map(tuple, both.flatten(1).tolist()))
    assert rows == sorted(map(tuple, original.flatten(1).tolist()))  # the same images, channel first
    assert len(data.notes) == 1 and "(N, H, W, C)" in data.notes[0] and "--layout" in data.notes[0]


def test_layout_flag_overrides_the_guess(tmp_path):
    path = _nhwc(tmp_path)
    assert load_dataset(str(path), layout="nchw").sample_shape == (8, 12, 3)
    assert load_dataset(str(path), layout="nhwc").sample_shape == (3, 8, 12)
    assert load_dataset(str(path), layout="nchw").notes == ()
    with pytest.raises(DataError, match="--layout nhwc needs an \\(N, H, W, C\\) array"):
        load_dataset(str(_nhwc(tmp_path, (6, 8))), layout="nhwc")


def test_channel_first_is_left_alone(tmp_path):
    path = _nhwc(tmp_path, (6, 3, 8, 8))
    data = load_dataset(str(path))
    assert data.sample_shape == (3, 8, 8) and data.notes == ()


def test_conv_error_names_the_layout_it_saw(tmp_path, capsys):
    from fastvae import train

    path = _nhwc(tmp_path, (6, 8, 8, 3))
    args = ["--dataset", str(path), "--layout", "nchw", "--arch", "conv", "--batch-size", "4"]
    code = train.main([*args, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert "read as (C, H, W) = (8, 8, 3)" in err and "--layout nhwc" in err, err


def test_the_note_is_printed_by_the_run(tmp_path, capsys):
    from fastvae import train

    path = _nhwc(tmp_path, (6, 8, 8, 3))
    args = ["--dataset", str(path), "--epochs", "1", "--batch-size", "4", "--hidden", "8", "--latent-dim", "2"]
    assert train.main([*args, "--out", str(tmp_path / "r")]) == 0
    assert "as channel-last (N, H, W, C) images" in capsys.readouterr().out
