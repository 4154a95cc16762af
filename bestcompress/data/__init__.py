"""Data sets and spike encodings.

    from bestcompress.data import load_dataset
    data = load_dataset("digits", model)          # resized to the model's input, checked against it
    x, y = data.train.tensors
    batch = data.encode(x[:8], generator)         # what the model takes (direct or Poisson spikes)

Sources: `digits` (scikit-learn's 8x8 digits), `mnist1d` (generated offline), `synthetic` (seeded, for tests),
a folder of images (one sub-folder per class), or a `.npz` file (`x`, `y`, optional `x_test`, `y_test`).
Bad data raises DataError with one sentence: missing path, empty folder, NaN values, labels out of range,
samples that do not fit the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ..errors import DataError
from .datasets import (
    load_digits_raw, load_image_folder_raw, load_mnist1d_raw, load_npz_raw, make_synthetic,
)
from .encodings import ENCODINGS, DirectEncoding, PoissonEncoding, make_encoding
from .npz import read_npz
from .split import validation_split

BUILTIN = ("digits", "mnist1d", "synthetic")

__all__ = ["BUILTIN", "ENCODINGS", "DataBundle", "DirectEncoding", "PoissonEncoding", "load_dataset",
           "make_encoding", "model_num_classes", "model_takes_events", "read_npz", "validation_split"]


@dataclass
class DataBundle:
    """A data set fitted to a model.

    Attributes:
        name: the source ('digits', 'mnist1d', 'synthetic' or the path).
        train, test: TensorDatasets of (x float32 [N, *sample_shape_raw], y int64).
        num_classes: classes the model predicts (the data's own count if no model was given).
        sample_shape: per-sample shape the model takes after encoding (None if unknown).
        encoding: callable(x, generator) -> model input; DirectEncoding or PoissonEncoding.
        val: the validation set carved from the training set (`validation_split`), or None.
        train_indices, val_indices: after `validation_split`, the original training-sample indices of each part.
    """

    name: str
    train: TensorDataset
    test: TensorDataset
    num_classes: int
    sample_shape: tuple[int, ...] | None
    encoding: object
    val: TensorDataset | None = None
    train_indices: torch.Tensor | None = field(default=None, repr=False)
    val_indices: torch.Tensor | None = field(default=None, repr=False)

    @property
    def deterministic(self) -> bool:
        """True when encoding a sample always gives the same input (no random coding or augmentation)."""
        return getattr(self.encoding, "name", None) == "direct"

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.encoding(x, generator)

    def __repr__(self) -> str:
        val = f", val={len(self.val)}" if self.val is not None else ""
        return (f"DataBundle({self.name!r}, train={len(self.train)}{val}, test={len(self.test)}, "
                f"classes={self.num_classes}, input={self.sample_shape}, encoding={self.encoding.name})")


def model_num_classes(model: nn.Module) -> int | None:
    """Classes a model predicts: its `num_classes`, its zoo spec, or the width of its `head` Linear."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    spec = getattr(model, "bc_spec", None) or {}
    n = (spec.get("kwargs") or {}).get("num_classes")
    if isinstance(n, int) and n > 0:
        return n
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        return head.out_features
    return None


def model_takes_events(model: nn.Module | None) -> bool:
    """True when the model takes [B, T, ...] event frames (zoo models built with input_mode='events')."""
    if model is None:
        return False
    mode = getattr(model, "input_mode", None)
    if mode is None:
        mode = ((getattr(model, "bc_spec", None) or {}).get("kwargs") or {}).get("input_mode")
    return mode == "events"


def _fit_images(x: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """[N, c, h, w] -> [N, C, H, W]: grey repeated to C channels (or RGB averaged to grey), bilinear resize."""
    if len(shape) != 3:
        raise DataError(f"'{name}' holds images [C, H, W] but the model takes samples of shape {tuple(shape)}.")
    C, H, W = shape
    t = torch.from_numpy(x)
    if t.shape[1] != C:
        if t.shape[1] == 1:
            t = t.repeat(1, C, 1, 1)
        elif C == 1:
            t = t.mean(1, keepdim=True)
        else:
            raise DataError(f"'{name}' images have {t.shape[1]} channels but the model takes {C}.")
    if tuple(t.shape[2:]) != (H, W):
        t = F.interpolate(t, size=(H, W), mode="bilinear", align_corners=False).clamp(0, 1)
    return t.numpy()


def _load_raw(source: str, static_shape, num_classes, subset, seed):
    """(x, y, x_test, y_test, data_classes, resizable) for a name or path."""
    if source == "digits":
        return (*load_digits_raw(), True)
    if source == "mnist1d":
        return (*load_mnist1d_raw(), False)
    if source == "synthetic":
        if static_shape is None:
            raise DataError("Synthetic data needs the model's input shape; give a model or input_shape.")
        n_train = subset or 256
        n_test = max(8, n_train // 4) if subset else 64
        return (*make_synthetic(static_shape, num_classes or 10, n_train, n_test, seed), False)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"Data '{source}' is neither a built-in data set ({', '.join(BUILTIN)}) nor an existing "
                        "path.")
    if path.is_dir():
        channels, size = 3, None
        if static_shape is not None and len(static_shape) == 3:
            channels, size = static_shape[0], tuple(static_shape[1:])
        return (*load_image_folder_raw(path, channels if channels in (1, 3) else 3, size), True)
    if path.suffix.lower() == ".npz":
        return (*load_npz_raw(path), False)
    raise DataError(f"Data file '{source}' is not a .npz file; give a .npz, an image folder or one of "
                    f"{', '.join(BUILTIN)}.")


def load_dataset(name_or_path: str | Path, model: nn.Module | None = None, *, input_shape=None,
                 num_classes: int | None = None, encoding: str = "direct", subset: int | None = None,
                 seed: int = 0) -> DataBundle:
    """Load a data set and fit it to a model.

    Args:
        name_or_path: 'digits', 'mnist1d', 'synthetic', an image folder or a .npz file.
        model: the model the data is for: its input shape, class count, time steps and input mode
            (static samples or event frames) are read from it.
        input_shape: per-sample input shape of the model (overrides the model's).
        num_classes: classes of the model (overrides the model's).
        encoding: 'direct' or 'poisson' (rate coding; the model must take event frames).
        subset: keep only the first `subset` training and test samples (after a seeded shuffle), for quick runs.
        seed: seed of the subset shuffle and of synthetic data.
    Returns:
        A DataBundle.
    Raises:
        DataError: missing path, empty folder, non-finite values, labels out of range or samples that do not
            fit the model.
    """
    from ..model_facts import model_input_shape, model_time_steps
    source = str(name_or_path)
    if encoding not in ENCODINGS:
        raise DataError(f"Unknown encoding '{encoding}'; use one of {', '.join(ENCODINGS)}.")
    if subset is not None and (not isinstance(subset, int) or subset < 1):
        raise DataError(f"subset must be a positive number of samples, got {subset!r}.")
    shape = tuple(input_shape) if input_shape is not None else (model_input_shape(model) if model is not None
                                                                 else None)
    classes = num_classes or (model_num_classes(model) if model is not None else None)
    T = model_time_steps(model) if model is not None else None
    events = model_takes_events(model) or (encoding == "poisson" and shape is None)
    static_shape = shape[1:] if (events and shape is not None) else shape

    x, y, xt, yt, data_classes, resizable = _load_raw(source, static_shape, classes, subset, seed)

    # Shapes: the data gives static samples (encoded over T for an events model) or ready event frames.
    sample = tuple(x.shape[1:])
    data_is_events = False
    if shape is not None:
        if events and sample == shape:
            data_is_events = True
        elif sample != static_shape:
            if resizable:
                x, xt = _fit_images(x, static_shape, source), _fit_images(xt, static_shape, source)
            else:
                want = f"{tuple(static_shape)}" + (f" (or event frames {tuple(shape)})" if events else "")
                raise DataError(f"Samples of '{source}' have shape {sample} but the model takes {want}.")
    elif len(sample) == 4:  # [T, C, H, W] frames and no model to ask
        data_is_events = True

    # Values and labels.
    for arr, part in ((x, "training"), (xt, "test")):
        if not np.all(np.isfinite(arr)):
            raise DataError(f"The {part} samples of '{source}' contain NaN or infinite values.")
    for arr, part in ((y, "training"), (yt, "test")):
        if len(arr) and arr.min() < 0:
            raise DataError(f"The {part} labels of '{source}' contain a negative label ({int(arr.min())}).")
    if classes is not None:
        top = int(max(y.max(initial=-1), yt.max(initial=-1)))
        if top >= classes:
            raise DataError(f"Label {top} in '{source}' is out of range for a model with {classes} classes "
                            f"(labels must be 0..{classes - 1}).")
    else:
        classes = data_classes
    if len(x) == 0 or len(xt) == 0:
        raise DataError(f"'{source}' has an empty {'training' if len(x) == 0 else 'test'} set.")

    if data_is_events:
        if encoding == "poisson":
            raise DataError(f"'{source}' already holds event frames; use encoding 'direct' for it.")
        if T is not None and x.shape[1] != T:
            raise DataError(f"'{source}' holds {x.shape[1]} frames per sample but the model runs {T} time steps.")
        enc = DirectEncoding(None)
    else:
        if encoding == "poisson":
            if x.min() < 0 or x.max() > 1 or xt.min() < 0 or xt.max() > 1:
                raise DataError(f"Poisson coding needs values in [0, 1], but '{source}' ranges over "
                                f"[{min(x.min(), xt.min()):.3g}, {max(x.max(), xt.max()):.3g}]; use encoding "
                                "'direct'.")
            if T is None:
                raise DataError("Poisson coding needs the model's number of time steps (its T).")
        if events and T is None:
            raise DataError("The model takes event frames but its number of time steps (T) is unknown.")
        enc = make_encoding(encoding, T, events)

    if subset is not None:
        g = torch.Generator().manual_seed(seed)
        x_idx = torch.randperm(len(x), generator=g)[:subset].sort().values.numpy()
        t_idx = torch.randperm(len(xt), generator=g)[:subset].sort().values.numpy()
        x, y, xt, yt = x[x_idx], y[x_idx], xt[t_idx], yt[t_idx]

    train = TensorDataset(torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(y))
    test = TensorDataset(torch.from_numpy(np.ascontiguousarray(xt, np.float32)), torch.from_numpy(yt))
    return DataBundle(source, train, test, int(classes), shape, enc)
