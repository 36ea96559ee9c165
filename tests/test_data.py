"""Data sets: rendered sprites, IDX files, a user's tensors, and on-device batching."""

from __future__ import annotations

import gzip
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from fastvae.data import (
    SHAPES,
    DataError,
    DataSplits,
    DeviceBatches,
    load_dataset,
    read_idx,
    render_sprites,
    to_float,
)

# ------------------------------------------------------------------------------------------- sprites


@pytest.fixture(scope="module")
def sprites() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    return render_sprites(2000, 28, seed=0)


def test_sprites_shape_dtype_range(sprites):
    images, factors = sprites
    assert images.shape == (2000, 1, 28, 28)
    assert images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    assert ((images > 0) & (images < 255)).any(), "edges should be anti-aliased"
    assert (images.reshape(2000, -1).max(axis=1) == 255).all(), "every image shows a shape"
    # Nothing touches the border rows/columns fully: the shapes stay inside the image.
    border = np.concatenate([images[:, 0, 0], images[:, 0, -1], images[:, 0, :, 0], images[:, 0, :, -1]], 1)
    assert (border < 255).all()


def test_sprites_factors_match_counts(sprites):
    _, factors = sprites
    assert set(factors) == {"shape", "scale", "rotation", "pos_x", "pos_y"}
    assert all(f.shape == (2000,) for f in factors.values())
    assert factors["shape"].dtype == np.int64
    assert set(np.unique(factors["shape"])) == set(range(len(SHAPES)))
    assert len(SHAPES) >= 3
    for key, hi in [("scale", 1.0), ("rotation", 2 * np.pi), ("pos_x", 1.0), ("pos_y", 1.0)]:
        assert factors[key].min() >= 0 and factors[key].max() < hi, key


def test_sprites_deterministic_from_seed():
    a, fa = render_sprites(100, seed=1)
    b, fb = render_sprites(100, seed=1)
    c, _ = render_sprites(100, seed=2)
    np.testing.assert_array_equal(a, b)
    for key in fa:
        np.testing.assert_array_equal(fa[key], fb[key])
    assert (a != c).any(axis=(1, 2, 3)).mean() > 0.9
    prefix, _ = render_sprites(40, seed=1)
    np.testing.assert_array_equal(prefix, a[:40])


def test_sprites_size_is_configurable():
    for size in (16, 64):
        images, _ = render_sprites(20, size, seed=0)
        assert images.shape == (20, 1, size, size)
        assert images.max() == 255


def _area_over_radius2(images: np.ndarray, factors: dict[str, np.ndarray]) -> np.ndarray:
    """Covered area per image divided by its radius squared, both in units of the image half-width."""
    half = images.shape[-1] / 2
    area = images.reshape(len(images), -1).sum(axis=1) / 255.0 / half**2
    radius = 0.25 + 0.25 * factors["scale"]  # render_sprites: radius from 25% to 50% of the half-width
    return area / radius**2


def test_sprite_shapes_differ_and_scale_sets_size(sprites):
    images, factors = sprites
    ratio = _area_over_radius2(images, factors)
    means = []
    for shape in range(len(SHAPES)):
        r = ratio[factors["shape"] == shape]
        # Area grows as scale^2, so this ratio is nearly constant within a shape ...
        assert r.std() / r.mean() < 0.03, SHAPES[shape]
        means.append(r.mean())
    # ... equals the shape's documented area in its own frame ...
    np.testing.assert_allclose(means, [1.96, 1.57, 2.16, 1.30], rtol=0.02)
    # ... and differs from one shape to another.
    means = np.sort(means)
    assert (np.diff(means) / means[1:] > 0.05).all(), means


def test_sprite_position_and_rotation_factors(sprites):
    images, factors = sprites
    w = images[:, 0].astype(np.float64)
    mass = w.sum(axis=(1, 2))
    coords = np.arange(28, dtype=np.float64)
    cx = (w.sum(axis=1) * coords).sum(axis=1) / mass
    cy = (w.sum(axis=2) * coords).sum(axis=1) / mass
    assert np.corrcoef(cx, factors["pos_x"])[0, 1] > 0.97
    assert np.corrcoef(cy, factors["pos_y"])[0, 1] > 0.97
    # An ellipse's long axis points along its rotation (mod pi): compare via the second moments.
    ell = factors["shape"] == SHAPES.index("ellipse")
    dx = coords[None, None, :] - cx[ell, None, None]
    dy = coords[None, :, None] - cy[ell, None, None]
    wl = w[ell]
    mxx, myy, mxy = ((wl * d).sum(axis=(1, 2)) for d in (dx * dx, dy * dy, dx * dy))
    angle = 0.5 * np.arctan2(2 * mxy, mxx - myy)
    assert np.cos(2 * (angle - factors["rotation"][ell])).mean() > 0.9


def test_load_sprites_splits():
    data = load_dataset("sprites", num_train=300, num_test=100, image_size=20, seed=3)
    assert isinstance(data, DataSplits)
    assert data.name == "sprites"
    assert data.train.shape == (300, 1, 20, 20) and data.test.shape == (100, 1, 20, 20)
    assert data.train.dtype == torch.uint8 and data.train.device.type == "cpu"
    assert data.sample_shape == (1, 20, 20) and data.dim == 400
    # Train and test come from different streams: no test image equals its train counterpart.
    assert (data.train[:100] != data.test).flatten(1).any(dim=1).all()
    again = load_dataset("sprites", num_train=300, num_test=100, image_size=20, seed=3)
    assert torch.equal(again.train, data.train) and torch.equal(again.test, data.test)
    other = load_dataset("sprites", num_train=300, num_test=100, image_size=20, seed=4)
    assert not torch.equal(other.train, data.train)


# --------------------------------------------------------------------------------------------- IDX


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> Path:
    """Write `array` as an IDX file (gzipped when the name ends in .gz); big-endian header and values."""
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    raw = header + array.astype(dtype).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def write_mnist(folder: Path, gz: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tiny random MNIST-layout files (images and labels) in `folder`; returns the train and test images."""
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, (12, 5, 6), dtype=np.uint8)
    test = rng.integers(0, 256, (4, 5, 6), dtype=np.uint8)
    ext = ".gz" if gz else ""
    write_idx(folder / f"train-images-idx3-ubyte{ext}", train)
    write_idx(folder / f"t10k-images-idx3-ubyte{ext}", test)
    write_idx(folder / f"train-labels-idx1-ubyte{ext}", rng.integers(0, 10, 12, dtype=np.uint8))
    write_idx(folder / f"t10k-labels-idx1-ubyte{ext}", rng.integers(0, 10, 4, dtype=np.uint8))
    return train, test


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    ("array", "code"),
    [
        (np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4), 0x08),
        (np.array([[-70000, 1], [2, 2**30]], dtype=np.int32), 0x0C),
        (np.array([0.5, -1.25, 3e7], dtype=np.float32), 0x0D),
    ],
)
def test_read_idx_round_trip(tmp_path, gz, array, code):
    path = write_idx(tmp_path / ("x.idx.gz" if gz else "x.idx"), array, code)
    back = read_idx(path)
    assert back.shape == array.shape
    assert back.dtype.isnative and back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    ("name", "sub"),
    [("mnist", "."), ("mnist", "MNIST/raw"), ("fashion-mnist", "."), ("fashion-mnist", "FashionMNIST/raw")],
)
def test_load_idx_layouts(tmp_path, gz, name, sub):
    train, test = write_mnist(tmp_path / sub, gz)
    data = load_dataset(name, data_dir=tmp_path)
    assert data.name == name
    assert data.train.dtype == torch.uint8 and data.train.shape == (12, 1, 5, 6)
    np.testing.assert_array_equal(data.train[:, 0].numpy(), train)
    np.testing.assert_array_equal(data.test[:, 0].numpy(), test)
    small = load_dataset(name, data_dir=str(tmp_path), num_train=3, num_test=2)
    assert torch.equal(small.train, data.train[:3]) and torch.equal(small.test, data.test[:2])


def test_torchvision_layout_wins_over_flat_folder(tmp_path):
    write_mnist(tmp_path, gz=False, seed=1)
    train, _ = write_mnist(tmp_path / "FashionMNIST" / "raw", gz=True, seed=2)
    data = load_dataset("fashion-mnist", data_dir=tmp_path)
    np.testing.assert_array_equal(data.train[:, 0].numpy(), train)


def test_num_train_beyond_data_is_an_error(tmp_path):
    write_mnist(tmp_path, gz=False)
    with pytest.raises(DataError, match=r"num_train=13 is out of range: the mnist train split has 12"):
        load_dataset("mnist", data_dir=tmp_path, num_train=13)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_missing_idx_files_message(tmp_path, name):
    with pytest.raises(DataError) as info:
        load_dataset(name, data_dir=tmp_path / "nowhere")
    msg = str(info.value)
    sub = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name]
    for folder in (tmp_path / "nowhere" / sub / "raw", tmp_path / "nowhere"):
        for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
            assert str(folder / stem) in msg
            assert str(folder / f"{stem}.gz") in msg
    assert "--download" in msg


@pytest.mark.parametrize(("dataset", "torchvision_class"), [("mnist", "MNIST"), ("cifar10", "CIFAR10")])
def test_download_failure_is_a_data_error(tmp_path, monkeypatch, dataset, torchvision_class):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, torchvision_class, offline)
    with pytest.raises(DataError, match=rf"downloading {dataset} .* failed \(URLError.*no network"):
        load_dataset(dataset, data_dir=tmp_path, download=True)


def test_download_then_reads_raw_files(tmp_path, monkeypatch):
    import torchvision.datasets

    written = {}

    class FakeFashion:
        def __init__(self, root: str, train: bool, download: bool):
            assert download
            written["images"] = write_mnist(Path(root) / "FashionMNIST" / "raw", gz=False)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashion)
    data = load_dataset("fashion-mnist", data_dir=tmp_path, download=True)
    np.testing.assert_array_equal(data.test[:, 0].numpy(), written["images"][1])


def _corrupt(tmp_path: Path, how: str) -> None:
    write_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = path.read_bytes()
    if how == "magic":
        path.write_bytes(b"\x01" + raw[1:])
    elif how == "dtype code":
        path.write_bytes(raw[:2] + b"\x42" + raw[3:])
    elif how == "truncated data":
        path.write_bytes(raw[:-7])
    elif how == "truncated header":
        path.write_bytes(raw[:9])
    elif how == "not gzip":
        path.unlink()
        (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(raw)
    elif how == "labels as images":
        write_idx(path, np.zeros(12, dtype=np.uint8))
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("magic", "not an IDX file"),
        ("dtype code", "unknown IDX dtype code 0x42"),
        (
            "truncated data",
            r"IDX header says shape \(12, 5, 6\) of uint8 \(376 bytes\), but the file has 369",
        ),
        ("truncated header", "truncated IDX header"),
        ("not gzip", "cannot read"),
        ("labels as images", r"expected \(N, H, W\) uint8 images, got \(12,\)"),
        ("empty", "not an IDX file"),
    ],
)
def test_malformed_idx_is_a_data_error(tmp_path, how, message):
    _corrupt(tmp_path, how)
    with pytest.raises(DataError, match=message) as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert "train-images-idx3-ubyte" in str(info.value)


# ------------------------------------------------------------------------------------ user tensors


def _rows(t: torch.Tensor) -> list[tuple]:
    return sorted(tuple(r.tolist()) for r in t.flatten(1))


def test_npz_round_trip_prefers_named_array(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (50, 3, 4, 4), dtype=np.uint8)
    path = tmp_path / "mine.npz"
    np.savez(path, labels=np.arange(50), images=x)
    data = load_dataset(str(path))
    assert data.name == "mine.npz"
    assert (
        data.train.dtype == torch.uint8
        and data.train.shape == (45, 3, 4, 4)
        and data.test.shape == (5, 3, 4, 4)
    )
    assert _rows(torch.cat([data.train, data.test])) == _rows(torch.from_numpy(x))
    assert not torch.equal(torch.cat([data.train, data.test]), torch.from_numpy(x)), "shuffled"
    again = load_dataset(str(path))
    assert torch.equal(again.test, data.test)
    assert not torch.equal(load_dataset(str(path), seed=1).test, data.test)


def test_npz_single_array_without_known_key(tmp_path):
    path = tmp_path / "one.npz"
    np.savez(path, first=np.full((10, 6), 0.25, np.float32))
    data = load_dataset(str(path))
    assert data.sample_shape == (6,) and data.dim == 6
    assert (data.train == 0.25).all()


def test_npy_round_trip_vectors_and_images(tmp_path):
    x = np.random.default_rng(1).random((20, 7))
    np.save(tmp_path / "vec.npy", x)
    data = load_dataset(str(tmp_path / "vec.npy"), test_fraction=0.25)
    assert data.train.dtype == torch.float32 and data.train.shape == (15, 7) and data.test.shape == (5, 7)
    assert _rows(torch.cat([data.train, data.test])) == _rows(torch.from_numpy(x).float())
    np.save(tmp_path / "img.npy", np.ones((20, 9, 8), np.uint8))
    assert load_dataset(str(tmp_path / "img.npy")).sample_shape == (1, 9, 8)


@pytest.mark.parametrize("as_dict", [False, True])
def test_pt_round_trip(tmp_path, as_dict):
    x = torch.rand(30, 1, 3, 3)
    torch.save({"y": torch.zeros(30), "data": x} if as_dict else x, tmp_path / "t.pt")
    data = load_dataset(str(tmp_path / "t.pt"), test_fraction=0.2)
    assert data.train.shape == (24, 1, 3, 3) and data.test.shape == (6, 1, 3, 3)
    assert _rows(torch.cat([data.train, data.test])) == _rows(x)


def test_bool_and_small_int_become_uint8(tmp_path):
    np.save(tmp_path / "b.npy", np.array([[True, False]] * 10))
    data = load_dataset(str(tmp_path / "b.npy"))
    assert data.train.dtype == torch.uint8 and set(data.train.unique().tolist()) == {0, 255}
    np.save(tmp_path / "i.npy", np.full((10, 3), 200, np.int64))
    assert load_dataset(str(tmp_path / "i.npy")).train.dtype == torch.uint8


@pytest.mark.parametrize(
    ("n", "fraction", "n_test"), [(40, 0.25, 10), (40, 0.1, 4), (11, 0.1, 2), (2, 0.5, 1)]
)
def test_split_sizes_follow_test_fraction(tmp_path, n, fraction, n_test):
    np.save(tmp_path / "x.npy", np.zeros((n, 3), np.uint8))
    data = load_dataset(str(tmp_path / "x.npy"), test_fraction=fraction)
    assert (len(data.train), len(data.test)) == (n - n_test, n_test)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros(10, np.uint8), r"shape \(10,\); expected \(N, D\), \(N, H, W\) or \(N, C, H, W\)"),
        (np.zeros((4, 1, 2, 2, 2), np.uint8), r"shape \(4, 1, 2, 2, 2\)"),
        (
            np.linspace(-0.5, 2.0, 20).reshape(10, 2),
            r"float64 values in \[-0\.5, 2\]; with --likelihood bernoulli each value is a probability, so float "
            r"data must lie in \[0, 1\]",
        ),
        (np.full((10, 2), np.nan, np.float32), r"holds 20 NaN values \(torch.float32\); float data must be finite"),
        (np.full((10, 2), 300, np.int32), r"int32 values in \[300, 300\]; integer data must lie in 0..255"),
        (
            np.zeros((1, 4), np.uint8),
            r"has 1 samples: too few .* \(0 train, 1 test\); need at least 1 of each",
        ),
    ],
)
def test_bad_user_arrays(tmp_path, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(str(path))
    assert str(path) in str(info.value)


def test_bad_user_files(tmp_path):
    with pytest.raises(DataError, match="data file .*missing.npz not found"):
        load_dataset(str(tmp_path / "missing.npz"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "d.pt")
    with pytest.raises(DataError, match=r"holds a dict with keys \['weights'\]; expected a tensor"):
        load_dataset(str(tmp_path / "d.pt"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read .*junk.npz"):
        load_dataset(str(tmp_path / "junk.npz"))
    np.save(tmp_path / "ok.npy", np.zeros((10, 2), np.uint8))
    with pytest.raises(DataError, match=r"test fraction \(--test-fraction\) must be between 0 and 1"):
        load_dataset(str(tmp_path / "ok.npy"), test_fraction=1.0)
    with pytest.raises(DataError, match="unknown data set 'cifar'"):
        load_dataset("cifar")


# --------------------------------------------------------------------------------- to_float, batches


def test_to_float():
    x = torch.tensor([[0, 51, 255]], dtype=torch.uint8)
    out = to_float(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out, torch.tensor([[0.0, 0.2, 1.0]]))
    assert to_float(torch.tensor([0.5], dtype=torch.float64)).dtype == torch.float32
    with pytest.raises(TypeError, match="uint8 or floating-point"):
        to_float(torch.tensor([1]))


N = 103


@pytest.fixture
def indexed() -> torch.Tensor:
    """(N, 1, 2, 2) uint8 whose sample i is filled with the value i, so a batch tells its indices."""
    return torch.arange(N, dtype=torch.uint8).view(N, 1, 1, 1).expand(N, 1, 2, 2).contiguous()


def _ids(batch: torch.Tensor) -> list[int]:
    return (batch[:, 0] * 255).round().long().tolist()


def test_device_batches_cover_permutation(indexed):
    batches = DeviceBatches(indexed, 10, device=torch.device("cpu"), seed=5)
    assert len(batches) == 10
    assert batches.data.dtype == torch.uint8 and batches.data.shape == (N, 4)
    out = list(batches.epoch(0))
    assert len(out) == 10
    for b in out:
        assert b.dtype == torch.float32 and b.shape == (10, 4)
        assert b.min() >= 0 and b.max() <= 1
        assert (b == b[:, :1]).all()
    ids = [i for b in out for i in _ids(b)]
    assert len(set(ids)) == 100, "no sample twice in an epoch"
    assert ids == batches.permutation(0)[:100].tolist()


def test_device_batches_order_depends_on_seed_and_epoch(indexed):
    def order(seed: int, epoch: int) -> list[int]:
        batches = DeviceBatches(indexed, 10, device=torch.device("cpu"), seed=seed)
        return [i for b in batches.epoch(epoch) for i in _ids(b)]

    assert order(1, 3) == order(1, 3)
    assert order(1, 3) != order(1, 4)
    assert order(1, 3) != order(2, 3)


def test_device_batches_keep_last(indexed):
    batches = DeviceBatches(indexed, 10, device=torch.device("cpu"), seed=0, drop_last=False)
    assert len(batches) == 11
    out = list(batches.epoch(2))
    assert [len(b) for b in out] == [10] * 10 + [3]
    assert sorted(i for b in out for i in _ids(b)) == list(range(N))


def test_device_batches_resume_exactly(indexed):
    full = DeviceBatches(indexed, 8, device=torch.device("cpu"), seed=9)
    expected = [b.clone() for b in full.epoch(4)]
    first = DeviceBatches(indexed, 8, device=torch.device("cpu"), seed=9)
    it = first.epoch(4)
    for _ in range(5):
        next(it)
    assert (first.current_epoch, first.position) == (4, 5)
    resumed = DeviceBatches(indexed, 8, device=torch.device("cpu"), seed=9)
    rest = list(resumed.epoch(first.current_epoch, start=first.position))
    assert len(rest) == len(expected) - 5
    assert all(torch.equal(a, b) for a, b in zip(rest, expected[5:], strict=True))
    assert resumed.position == len(resumed)


def test_device_batches_float_data_and_errors():
    x = torch.rand(20, 3)
    batches = DeviceBatches(x.double(), 4, device=torch.device("cpu"), seed=0)
    assert batches.data.dtype == torch.float32
    assert _rows(torch.cat(list(batches.epoch(0)))) == _rows(x)
    with pytest.raises(DataError, match="batch size 21 is larger than the 20 samples"):
        DeviceBatches(x, 21, device=torch.device("cpu"), seed=0)
    with pytest.raises(DataError, match="start batch 6 is out of range for an epoch of 5 batches"):
        batches.epoch(0, start=6)
    with pytest.raises(TypeError, match="uint8 or floating-point"):
        DeviceBatches(torch.zeros(20, 3, dtype=torch.int64), 4, device=torch.device("cpu"), seed=0)


@pytest.mark.gpu
def test_device_batches_on_cuda(indexed):
    cuda = torch.device("cuda")
    a = DeviceBatches(indexed, 10, device=cuda, seed=1)
    b = DeviceBatches(indexed, 10, device=cuda, seed=1)
    assert a.data.device.type == "cuda" and a.data.dtype == torch.uint8
    out_a, out_b = list(a.epoch(0)), list(b.epoch(0))
    assert all(x.device.type == "cuda" and torch.equal(x, y) for x, y in zip(out_a, out_b, strict=True))
    assert len({i for x in out_a for i in _ids(x)}) == 100
    on_cpu = DeviceBatches(indexed, 10, device=torch.device("cpu"), seed=1)
    assert torch.equal(a.permutation(0).cpu(), on_cpu.permutation(0))  # one data order on every device
    assert [_ids(x) for x in out_a] == [_ids(x) for x in on_cpu.epoch(0)]


def test_the_data_order_is_drawn_on_the_cpu_for_any_device(indexed, monkeypatch):
    """CUDA's randperm is not the CPU's, so the order is a CPU generator's draw moved to the data's device:
    one order per seed on every device, and a run resumes on another kind. The meta device stands in for a
    GPU here (it holds no values: the draws are watched to see which generator made them)."""
    draws = []
    real_randperm = torch.randperm

    def randperm(*args, **kwargs):
        perm = real_randperm(*args, **kwargs)
        draws.append((kwargs["generator"].device, perm))
        return perm

    monkeypatch.setattr(torch, "randperm", randperm)
    on_cpu = DeviceBatches(indexed, 10, device=torch.device("cpu"), seed=4).permutation(2)
    elsewhere = DeviceBatches(indexed, 10, device=torch.device("meta"), seed=4)
    perm = elsewhere.permutation(2)
    assert perm.device == elsewhere.data.device == torch.device("meta")
    assert (perm.shape, perm.dtype) == ((N,), torch.int64)
    generator_device, drawn = draws[-1]
    assert generator_device == drawn.device == torch.device("cpu")
    assert torch.equal(drawn, on_cpu)
