"""Data sets as in-memory tensors: digits, MNIST-1D, image folders, .npz arrays and synthetic data.

Every loader returns raw samples (float32 x, int64 y, fixed train/test split); `load_dataset` in __init__.py then
fits them to the model (size, channels) and checks them (finite values, labels in range, shape).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .npz import read_npz

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLIT_SEED = 0  # the train/test split is fixed, independent of the training seed


def stratified_split(y: np.ndarray, test_size: int | float, seed: int = SPLIT_SEED):
    """Indices (train, test) of a seeded split that keeps the class proportions."""
    from sklearn.model_selection import train_test_split
    idx = np.arange(len(y))
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    try:
        tr, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=stratify)
    except ValueError:  # too few samples per class for a stratified split
        tr, te = train_test_split(idx, test_size=test_size, random_state=seed)
    return np.sort(tr), np.sort(te)


def _copies(fn):
    """Cache a deterministic loader in-process; callers get fresh copies of the arrays."""
    cached = lru_cache(maxsize=1)(fn)

    def wrapper():
        return tuple(a.copy() if isinstance(a, np.ndarray) else a for a in cached())
    wrapper.__doc__ = fn.__doc__
    wrapper.__name__ = fn.__name__
    return wrapper


@_copies
def load_digits_raw():
    """scikit-learn's 8x8 digits (1,797 images, values 0..16 -> [0, 1]); split 1,437 train / 360 test."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8]
    y = d.target.astype(np.int64)
    tr, te = stratified_split(y, test_size=360)
    return x[tr], y[tr], x[te], y[te], 10


@_copies
def load_mnist1d_raw():
    """MNIST-1D generated offline with the package's default arguments (4,000 train / 1,000 test, length 40),
    standardized with the training mean and std. Input [N, 1, 40]."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise DataError("The mnist1d data set needs the 'mnist1d' package: pip install mnist1d.") from None
    d = make_dataset(get_dataset_args())  # never get_dataset(): that one downloads
    x, x_test = d["x"].astype(np.float32), d["x_test"].astype(np.float32)
    mean, std = float(x.mean()), float(x.std())
    x, x_test = (x - mean) / std, (x_test - mean) / std
    return (x[:, None], np.asarray(d["y"], np.int64), x_test[:, None], np.asarray(d["y_test"], np.int64), 10)


def make_synthetic(sample_shape: tuple[int, ...], num_classes: int, n_train: int = 256, n_test: int = 64,
                   seed: int = 0):
    """Seeded, learnable random data in [0, 1]: one random prototype per class plus noise."""
    g = torch.Generator().manual_seed(1000 + seed)
    protos = torch.rand((num_classes,) + tuple(sample_shape), generator=g)

    def draw(n):
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        x = (0.7 * protos[y] + 0.3 * torch.rand((n,) + tuple(sample_shape), generator=g)).clamp(0, 1)
        return x.numpy().astype(np.float32), y.numpy().astype(np.int64)

    x, y = draw(n_train)
    xt, yt = draw(n_test)
    return x, y, xt, yt, num_classes


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_folder(root: Path, classes: list[str], mode: str, size: tuple[int, int] | None):
    from PIL import Image
    xs, ys = [], []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as img:
                    img = img.convert(mode)
                    if size is not None and img.size != (size[1], size[0]):
                        img = img.resize((size[1], size[0]), Image.BILINEAR)
                    a = np.asarray(img, dtype=np.float32) / 255.0
            except Exception as e:  # PIL raises many types for bad files
                raise DataError(f"Cannot read image '{f}': {str(e).splitlines()[0] if str(e) else type(e).__name__}.") from None
            xs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
            ys.append(label)
    if xs and len({x.shape for x in xs}) > 1:
        raise DataError(f"Images under '{root}' have different sizes; give the model's input size so they can be "
                        "resized.")
    return xs, ys


def load_image_folder_raw(root: Path, channels: int = 3, size: tuple[int, int] | None = None):
    """One sub-folder per class (Pillow), or train/ and test/ (or val/) sub-folders that each hold one folder per
    class. Images are converted to `channels` (1: grey, 3: RGB), resized to `size` (H, W) and scaled to [0, 1]."""
    mode = "L" if channels == 1 else "RGB"
    sub = {p.name.lower(): p for p in _class_folders(root)}
    test_dir = sub.get("test") or sub.get("val")
    if "train" in sub and test_dir is not None:
        classes = sorted({p.name for d in (sub["train"], test_dir) for p in _class_folders(d)})
        if not classes:
            raise DataError(f"Image folder '{root}' has train/ and test/ but no class sub-folders inside them.")
        x, y = _read_folder(sub["train"], classes, mode, size)
        xt, yt = _read_folder(test_dir, classes, mode, size)
        if not x or not xt:
            raise DataError(f"Image folder '{root}' has no images in its "
                            f"{'train' if not x else test_dir.name} part.")
    else:
        classes = [p.name for p in _class_folders(root)]
        if not classes:
            raise DataError(f"Image folder '{root}' is empty: it needs one sub-folder of images per class.")
        xa, ya = _read_folder(root, classes, mode, size)
        if not xa:
            raise DataError(f"Image folder '{root}' holds no images (looked for "
                            f"{', '.join(sorted(IMAGE_SUFFIXES))} files in its class sub-folders).")
        xa, ya = np.stack(xa), np.asarray(ya, np.int64)
        if len(xa) < 2:
            raise DataError(f"Image folder '{root}' has a single image; it needs at least two to split.")
        tr, te = stratified_split(ya, test_size=0.2)
        return xa[tr], ya[tr], xa[te], ya[te], len(classes)
    return np.stack(x), np.asarray(y, np.int64), np.stack(xt), np.asarray(yt, np.int64), len(classes)


def load_npz_raw(path: Path):
    """`x` ([N, C, H, W] static, [N, T, C, H, W] event frames, or [N, C, L] sequences) and `y`; optional
    `x_test`/`y_test`, else a fixed stratified 80/20 split."""
    arrays = read_npz(path, required=("x", "y"))
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"'{path}' must hold both x_test and y_test, or neither.")

    def labels(a, key):
        if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer)
                               or (np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a))
                                   and np.all(a == np.round(a)))):
            raise DataError(f"'{path}': '{key}' must be a 1-D array of integer class labels.")
        return a.astype(np.int64)

    def samples(a, key):
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool) or a.ndim < 2:
            raise DataError(f"'{path}': '{key}' must be a numeric array [N, ...], got dtype {a.dtype} with "
                            f"{a.ndim} dimension(s).")
        return a.astype(np.float32)

    x, y = samples(arrays["x"], "x"), labels(arrays["y"], "y")
    if len(x) != len(y):
        raise DataError(f"'{path}': x has {len(x)} samples but y has {len(y)} labels.")
    if len(x) == 0:
        raise DataError(f"'{path}' holds no samples.")
    if "x_test" in arrays:
        xt, yt = samples(arrays["x_test"], "x_test"), labels(arrays["y_test"], "y_test")
        if len(xt) != len(yt):
            raise DataError(f"'{path}': x_test has {len(xt)} samples but y_test has {len(yt)} labels.")
        if xt.shape[1:] != x.shape[1:]:
            raise DataError(f"'{path}': x_test samples have shape {xt.shape[1:]} but x samples {x.shape[1:]}.")
    else:
        if len(x) < 2:
            raise DataError(f"'{path}' has a single sample; it needs at least two to split.")
        if y.min() >= 0:
            tr, te = stratified_split(y, test_size=0.2)
        else:  # negative labels are reported by the label check later
            tr, te = np.arange(len(y) - 1), np.arange(len(y) - 1, len(y))
        x, y, xt, yt = x[tr], y[tr], x[te], y[te]
    num_classes = int(max(y.max(initial=-1), yt.max(initial=-1))) + 1
    return x, y, xt, yt, num_classes
