"""Coil handling shared by the recon gadgets and mirrored by the training-data synthesis.

The PISF model has a fixed virtual-coil count; real data has 1..64 channels. The compression
and normalisation here are the runtime half of models/CONTRACT.md.
"""
from __future__ import annotations

import numpy as np

from .fft import ifftc


def coil_compression_matrix(calibration: np.ndarray, virtual_coils: int) -> np.ndarray:
    """SVD compression matrix P [virtual_coils, coils] from calibration samples [coils, n].

    Rows beyond the physical coil count are zero, so fewer coils are zero-padded.
    """
    coils = calibration.shape[0]
    u, _, _ = np.linalg.svd(calibration.reshape(coils, -1), full_matrices=False)
    kept = min(coils, virtual_coils)
    matrix = np.zeros((virtual_coils, coils), dtype=np.complex64)
    matrix[:kept] = u[:, :kept].conj().T
    return matrix


def compress(kspace: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply P to the coil axis (axis 0) of any-shaped data."""
    shape = kspace.shape
    return (matrix @ kspace.reshape(shape[0], -1)).reshape((matrix.shape[0],) + shape[1:])


def normalisation_scale(kspace: np.ndarray, mask: np.ndarray) -> float:
    """Max magnitude of the zero-filled coil images of K[coil, ky, kx] under mask[ky]."""
    image = ifftc(kspace * mask[None, :, None], axes=(-2, -1))
    scale = float(np.abs(image).max())
    return scale if scale > 0 else 1.0


def root_sum_of_squares(coil_images: np.ndarray, axis: int = 0) -> np.ndarray:
    return np.sqrt(np.sum(np.abs(coil_images) ** 2, axis=axis))
