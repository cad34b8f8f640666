"""Per-image quality signals (numpy): data consistency of a reconstruction with the measured
lines, and the normalised difference between two reconstructions of the same slice."""
from __future__ import annotations

import numpy as np

from .fft import fftc


def _relative(predicted: np.ndarray, measured: np.ndarray) -> float:
    norm = float(np.linalg.norm(measured))
    return float(np.linalg.norm(predicted - measured) / norm) if norm > 0 else 0.0


def sense_residual(image: np.ndarray, maps: np.ndarray, kspace: np.ndarray, mask: np.ndarray) -> float:
    """||M F(S x) - y|| / ||y|| of a coil-combined complex image x [ny, nx] with maps S
    [C, ny, nx] against the measured k-space y [C, ny, nx] (the maps' coils) on the sampled lines
    mask [ny]; F: centred orthonormal 2D FFT."""
    sampled = np.asarray(mask) > 0.5
    predicted = fftc(np.asarray(maps) * np.asarray(image)[None], axes=(1, 2))[:, sampled]
    return _relative(predicted, np.asarray(kspace)[:, sampled])


def coil_residual(coil_images: np.ndarray, kspace: np.ndarray, mask: np.ndarray) -> float:
    """||M F(x_c) - y_c|| / ||y|| of coil images [C, ny, nx] against k-space [C, ny, nx] on the
    sampled lines mask [ny]."""
    sampled = np.asarray(mask) > 0.5
    predicted = fftc(np.asarray(coil_images), axes=(1, 2))[:, sampled]
    return _relative(predicted, np.asarray(kspace)[:, sampled])


def normalised_difference(image: np.ndarray, reference: np.ndarray) -> float:
    """||a |image| - |reference||| / ||reference|| with a the least-squares scale of |image| onto
    |reference| (so a global intensity scale does not count)."""
    x = np.abs(np.asarray(image, dtype=np.complex128)).ravel()
    r = np.abs(np.asarray(reference, dtype=np.complex128)).ravel()
    scale = float(x @ r) / max(float(x @ x), 1e-30)
    return _relative(scale * x, r)
