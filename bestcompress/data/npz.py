"""The one `.npz` reader: arrays by name, read without pickle, with one-sentence errors.

    arrays = read_npz("data.npz", required=("x", "y"))     # {'x': ndarray, 'y': ndarray, ...}

Used by the data sets (`load_dataset("file.npz")`) and by export verification on real inputs.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DataError


def read_npz(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Every array of an .npz file (loaded with allow_pickle=False, so reading runs no code).

    Args:
        path: the .npz file.
        required: names that must be present.
    Returns:
        {name: array}.
    Raises:
        DataError: the file is missing or not a readable .npz archive, or a required array is absent.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Data file '{path}' does not exist.")
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise ValueError("a single array, not an archive")
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # zipfile, pickle refusal and numpy raise many types for bad files
        raise DataError(f"Cannot read '{path}' as a .npz file ({type(e).__name__}).") from None
    for key in required:
        if key not in arrays:
            raise DataError(f"'{path}' has no array '{key}' (it has: {', '.join(sorted(arrays)) or 'nothing'}).")
    return arrays
