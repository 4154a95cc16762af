"""Data sets fitted to models, the two encodings, and one DataError per kind of bad data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bestcompress.data import DirectEncoding, PoissonEncoding, load_dataset
from bestcompress.errors import DataError
from bestcompress.zoo import create_model

IMG = dict(img_size=8, embed_dims=16, num_heads=2, depths=1, T=2)


@pytest.fixture(scope="module")
def img_model():
    return create_model("spikformer_cifar", **IMG)


@pytest.fixture(scope="module")
def events_model():
    return create_model("spikformer_cifar", input_mode="events", **IMG)


def test_digits_fitted_to_model(img_model):
    data = load_dataset("digits", img_model)
    x, y = data.train.tensors
    xt, yt = data.test.tensors
    assert (len(x), len(xt)) == (1437, 360)
    assert x.shape[1:] == (3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.equal(x[:, 0], x[:, 1])  # grey repeated to the model's 3 channels
    # stratified: every class in both parts, in about the same proportion
    assert torch.bincount(yt, minlength=10).min() >= 30
    assert torch.equal(load_dataset("digits", img_model).test.tensors[1], yt)  # the split is fixed
    grey = load_dataset("digits", input_shape=(1, 16, 16), num_classes=10)
    assert grey.train.tensors[0].shape[1:] == (1, 16, 16)


def test_mnist1d_standardized_sequences():
    model = create_model("spikformer_seq", embed_dims=16, num_heads=2, depths=1, T=2)
    data = load_dataset("mnist1d", model)
    x, y = data.train.tensors
    assert x.shape == (4000, 1, 40) and len(data.test) == 1000
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2
    assert set(y.tolist()) == set(range(10))


def test_subset_and_synthetic(img_model):
    data = load_dataset("synthetic", img_model, subset=40)
    assert len(data.train) == 40 and len(data.test) == 10
    assert data.train.tensors[0].shape[1:] == (3, 8, 8)
    again = load_dataset("synthetic", img_model, subset=40)
    assert torch.equal(again.train.tensors[0], data.train.tensors[0])
    small = load_dataset("digits", img_model, subset=50)
    assert len(small.train) == 50 and len(small.test) == 50


def test_image_folder(tmp_path, img_model):
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    data = load_dataset(tmp_path, img_model)
    assert len(data.train) + len(data.test) == 10
    assert data.train.tensors[0].shape[1:] == (3, 8, 8)
    assert set(data.train.tensors[1].tolist()) == {0, 1}


def test_npz_static_and_events(tmp_path, img_model, events_model):
    rng = np.random.default_rng(0)
    path = tmp_path / "static.npz"
    np.savez(path, x=rng.random((20, 3, 8, 8), dtype=np.float32), y=np.arange(20) % 4)
    data = load_dataset(path, img_model)
    assert len(data.train) == 16 and len(data.test) == 4
    frames = tmp_path / "events.npz"
    np.savez(frames, x=(rng.random((12, 2, 3, 8, 8)) > 0.5).astype(np.float32), y=np.arange(12) % 3,
             x_test=np.zeros((4, 2, 3, 8, 8), np.float32), y_test=np.arange(4) % 3)
    ev = load_dataset(frames, events_model)
    batch = ev.encode(ev.train.tensors[0][:3])
    assert batch.shape == (3, 2, 3, 8, 8)
    assert events_model(batch).shape == (3, 10)


def test_direct_encoding_for_an_events_model(events_model):
    data = load_dataset("synthetic", events_model, subset=8)
    assert isinstance(data.encoding, DirectEncoding)
    x = data.train.tensors[0][:2]
    out = data.encode(x)
    assert out.shape == (2, 2, 3, 8, 8) and torch.equal(out[:, 0], x) and torch.equal(out[:, 1], x)


def test_poisson_is_binary_with_the_right_rate():
    enc = PoissonEncoding(time_steps=400)
    x = torch.tensor([[0.0, 0.25, 0.5, 1.0]]).repeat(8, 1)
    s = enc(x, torch.Generator().manual_seed(0))
    assert s.shape == (8, 400, 4)
    assert set(s.unique().tolist()) <= {0.0, 1.0}
    rate = s.mean(dim=(0, 1))
    assert torch.allclose(rate, torch.tensor([0.0, 0.25, 0.5, 1.0]), atol=0.02)
    again = enc(x, torch.Generator().manual_seed(0))
    assert torch.equal(s, again)  # seeded


def test_poisson_dataset_feeds_an_events_model(events_model, img_model):
    data = load_dataset("digits", events_model, encoding="poisson", subset=16)
    spikes = data.encode(data.train.tensors[0][:4], torch.Generator().manual_seed(1))
    assert spikes.shape == (4, 2, 3, 8, 8) and set(spikes.unique().tolist()) <= {0.0, 1.0}
    assert events_model(spikes).shape == (4, 10)
    with pytest.raises(DataError, match="input_mode='events'"):
        load_dataset("digits", img_model, encoding="poisson")
    seq = create_model("spikformer_seq", embed_dims=16, num_heads=2, depths=1, T=2, input_mode="events")
    with pytest.raises(DataError, match=r"values in \[0, 1\]"):
        load_dataset("mnist1d", seq, encoding="poisson")


# ------------------------------------------------------------------------------------------- bad data

def _one_sentence(err: DataError) -> str:
    msg = str(err)
    assert "\n" not in msg and msg.endswith(".")
    return msg


def test_missing_path(tmp_path, img_model):
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path / "nope", img_model)
    assert "neither a built-in data set" in _one_sentence(e.value)


def test_empty_folder(tmp_path, img_model):
    with pytest.raises(DataError, match="is empty"):
        load_dataset(tmp_path, img_model)
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(tmp_path, img_model)


def test_nan_values(tmp_path, img_model):
    x = np.random.default_rng(0).random((10, 3, 8, 8), dtype=np.float32)
    x[3, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(10) % 2)
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path / "nan.npz", img_model)
    assert "NaN" in _one_sentence(e.value)


def test_label_out_of_range(tmp_path, img_model):
    np.savez(tmp_path / "labels.npz", x=np.zeros((10, 3, 8, 8), np.float32), y=np.arange(10) + 5)
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path / "labels.npz", img_model)  # the model has 10 classes, labels reach 14
    assert "out of range for a model with 10 classes" in _one_sentence(e.value)
    np.savez(tmp_path / "neg.npz", x=np.zeros((10, 3, 8, 8), np.float32), y=np.arange(10) - 1)
    with pytest.raises(DataError, match="negative label"):
        load_dataset(tmp_path / "neg.npz", img_model)


def test_shape_that_does_not_fit(tmp_path, img_model):
    np.savez(tmp_path / "shape.npz", x=np.zeros((10, 3, 16, 16), np.float32), y=np.arange(10) % 2)
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path / "shape.npz", img_model)
    assert "(3, 16, 16)" in _one_sentence(e.value) and "(3, 8, 8)" in str(e.value)
    with pytest.raises(DataError, match="model takes"):
        load_dataset("mnist1d", img_model)


def test_bad_npz_files(tmp_path, img_model):
    (tmp_path / "junk.npz").write_text("not numpy")
    with pytest.raises(DataError, match="Cannot read"):
        load_dataset(tmp_path / "junk.npz", img_model)
    np.savez(tmp_path / "nox.npz", y=np.arange(3))
    with pytest.raises(DataError, match="no array 'x'"):
        load_dataset(tmp_path / "nox.npz", img_model)
    np.savez(tmp_path / "len.npz", x=np.zeros((4, 3, 8, 8), np.float32), y=np.arange(3))
    with pytest.raises(DataError, match="4 samples but y has 3"):
        load_dataset(tmp_path / "len.npz", img_model)
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(DataError, match="not a .npz"):
        load_dataset(tmp_path / "data.csv", img_model)
