"""Centred orthonormal FFTs, the one convention used everywhere (see models/CONTRACT.md)."""
from __future__ import annotations

import numpy as np


def fftc(x: np.ndarray, axes=(-1,)) -> np.ndarray:
    """k-space from image space along `axes` (centred, orthonormal)."""
    axes = tuple(axes)
    return np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(x, axes=axes), axes=axes, norm="ortho"), axes=axes)


def ifftc(x: np.ndarray, axes=(-1,)) -> np.ndarray:
    """Image space from k-space along `axes` (centred, orthonormal)."""
    axes = tuple(axes)
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(x, axes=axes), axes=axes, norm="ortho"), axes=axes)
