"""BART .cfl/.hdr files: raw little-endian complex64 in column-major order, dims in the .hdr."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_cfl(stem: str | Path, array: np.ndarray) -> None:
    """Write `array` (any shape, up to 16 dims) as STEM.cfl + STEM.hdr."""
    stem = Path(stem)
    array = np.asarray(array)
    dims = list(array.shape) + [1] * (16 - array.ndim)
    stem.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(map(str, dims)) + "\n")
    np.asarray(array, dtype=np.complex64).ravel(order="F").tofile(stem.with_suffix(".cfl"))


def read_cfl(stem: str | Path) -> np.ndarray:
    """Read STEM.cfl + STEM.hdr; trailing singleton dimensions are dropped."""
    stem = Path(stem)
    lines = stem.with_suffix(".hdr").read_text().splitlines()
    dims = [int(d) for d in lines[1].split()]
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    data = np.fromfile(stem.with_suffix(".cfl"), dtype=np.complex64)
    return data.reshape(dims, order="F")
