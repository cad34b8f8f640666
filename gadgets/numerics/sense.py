"""SENSE with Tikhonov regularisation, solved row by row (numpy; the PISF v2 floor).

After the inverse FFT along the fully sampled readout, the SENSE forward model y_c = M F (s_c x)
does not couple readout positions, so every row x of the slice is its own ny-unknown least-squares
problem: min_x sum_c ||M F(s_c x) - y_c||^2 + lam ||x||^2. Conjugate gradients runs on all rows at
once (one FFT along ky per coil and iteration), with each row's own step sizes. This is what
BART `pics -l2` solves (same maps, same lambda up to BART's scaling), row-separably.
"""
from __future__ import annotations

import numpy as np

from .fft import fftc, ifftc


def sense_tikhonov(hybrid: np.ndarray, mask: np.ndarray, maps: np.ndarray, lam: float = 0.01,
                   iterations: int = 30, tolerance: float = 1e-6) -> np.ndarray:
    """Complex image [ny, nx] from measured hybrid data [C, ny, nx] (ky, x; zero where not
    sampled), mask [ny] and maps [C, ny, nx]. lam is relative to the data: the system is
    (A^H A + lam * max(diag A^H A)) x = A^H y, so one lam fits any scaling of maps and data."""
    sampled = (np.asarray(mask) > 0.5)[None, :, None]
    maps = np.asarray(maps, dtype=np.complex64)
    diagonal = float(np.max(np.sum(np.abs(maps) ** 2, axis=0))) * sampled.mean()
    weight = np.float32(lam * max(diagonal, 1e-12))
    conj_maps = maps.conj()

    def normal(x):
        return np.sum(conj_maps * ifftc(fftc(maps * x[None], axes=(1,)) * sampled, axes=(1,)), axis=0) + weight * x

    rhs = np.sum(conj_maps * ifftc(np.asarray(hybrid) * sampled, axes=(1,)), axis=0)
    x = np.zeros_like(rhs)
    residual = rhs.copy()
    direction = residual.copy()
    power = np.sum(np.abs(residual) ** 2, axis=0)          # per row (readout position)
    stop = tolerance * np.maximum(power, 1e-30)
    for _ in range(iterations):
        curved = normal(direction)
        alpha = power / np.maximum(np.real(np.sum(direction.conj() * curved, axis=0)), 1e-30)
        x += alpha * direction
        residual -= alpha * curved
        new_power = np.sum(np.abs(residual) ** 2, axis=0)
        if np.all(new_power <= stop):
            break
        direction = residual + (new_power / np.maximum(power, 1e-30)) * direction
        power = new_power
    return x
