"""SENSE with Tikhonov regularisation, solved row by row (numpy; the PISF v2 floor).

After the inverse FFT along the fully sampled readout, the SENSE forward model y_c = M F (s_c x)
does not couple readout positions, so every row x of the slice is its own ny-unknown least-squares
problem: min_x sum_c ||M F(s_c x) - y_c||^2 + lam ||x||^2. Conjugate gradients runs on all rows at
once (one FFT along ky per coil and iteration, the shared operator sense_rows.RowSense), with each
row's own step sizes. This is what
BART `pics -l2` solves (same maps, same lambda up to BART's scaling), row-separably.
"""
from __future__ import annotations

import numpy as np

from .sense_rows import RowSense


def sense_tikhonov(hybrid: np.ndarray, mask: np.ndarray, maps: np.ndarray, lam: float = 0.01,
                   iterations: int = 30, tolerance: float = 1e-6) -> np.ndarray:
    """Complex image [ny, nx] from measured hybrid data [C, ny, nx] (ky, x; zero where not
    sampled), mask [ny] and maps [C, ny, nx]. lam is relative to the data: the system is
    (A^H A + lam * max(diag A^H A)) x = A^H y, so one lam fits any scaling of maps and data."""
    sampled = (np.asarray(mask) > 0.5)[None, :, None]
    maps = np.asarray(maps, dtype=np.complex64)
    diagonal = float(np.max(np.sum(np.abs(maps) ** 2, axis=0))) * sampled.mean()
    weight = np.float32(lam * max(diagonal, 1e-12))
    operator = RowSense.from_slice_maps(maps, mask)          # rows are the nx readout positions

    rhs = operator.adjoint(np.asarray(hybrid).transpose(2, 0, 1))                  # [nx, ny]
    x = np.zeros_like(rhs)
    residual = rhs.copy()
    direction = residual.copy()
    power = np.sum(np.abs(residual) ** 2, axis=-1, keepdims=True)   # per row (readout position)
    stop = tolerance * np.maximum(power, 1e-30)
    for _ in range(iterations):
        curved = operator.normal(direction) + weight * direction
        alpha = power / np.maximum(np.real(np.sum(direction.conj() * curved, axis=-1, keepdims=True)), 1e-30)
        x += alpha * direction
        residual -= alpha * curved
        new_power = np.sum(np.abs(residual) ** 2, axis=-1, keepdims=True)
        if np.all(new_power <= stop):
            break
        direction = residual + (new_power / np.maximum(power, 1e-30)) * direction
        power = new_power
    return np.ascontiguousarray(x.T)


# ----------------------------------------------------------------------------- l1-wavelet
def haar_forward(image: np.ndarray, levels: int) -> tuple[np.ndarray, list]:
    """Orthonormal 2D Haar transform of image [ny, nx] (sides divisible by 2^levels):
    (approximation, [(lh, hl, hh) per level, finest first])."""
    details = []
    approx = image
    scale = np.float32(1 / np.sqrt(2))
    for _ in range(levels):
        low, high = (approx[0::2] + approx[1::2]) * scale, (approx[0::2] - approx[1::2]) * scale
        details.append(((low[:, 0::2] - low[:, 1::2]) * scale, (high[:, 0::2] + high[:, 1::2]) * scale,
                        (high[:, 0::2] - high[:, 1::2]) * scale))
        approx = (low[:, 0::2] + low[:, 1::2]) * scale
    return approx, details


def haar_inverse(approx: np.ndarray, details: list) -> np.ndarray:
    scale = np.float32(1 / np.sqrt(2))
    for lh, hl, hh in reversed(details):
        low = np.empty((approx.shape[0], approx.shape[1] * 2), dtype=approx.dtype)
        high = np.empty_like(low)
        low[:, 0::2], low[:, 1::2] = (approx + lh) * scale, (approx - lh) * scale
        high[:, 0::2], high[:, 1::2] = (hl + hh) * scale, (hl - hh) * scale
        approx = np.empty((low.shape[0] * 2, low.shape[1]), dtype=approx.dtype)
        approx[0::2], approx[1::2] = (low + high) * scale, (low - high) * scale
    return approx


def wavelet_shrink(image: np.ndarray, threshold: float, levels: int, shift: tuple[int, int]) -> np.ndarray:
    """Soft-threshold the Haar detail coefficients of image [ny, nx] (complex), the transform
    taken after a cyclic shift (random shifts per iteration avoid blocky artefacts) on the largest
    part of the image whose sides divide by 2^levels (the rest is left as it is)."""
    block = 2 ** levels
    ny, nx = (image.shape[0] // block) * block, (image.shape[1] // block) * block
    shifted = np.roll(image, shift, axis=(0, 1))
    approx, details = haar_forward(shifted[:ny, :nx], levels)

    def soft(c):
        magnitude = np.abs(c)
        return c * np.maximum(1 - threshold / np.maximum(magnitude, 1e-30), 0).astype(np.float32)

    shifted[:ny, :nx] = haar_inverse(approx, [tuple(soft(c) for c in level) for level in details])
    return np.roll(shifted, (-shift[0], -shift[1]), axis=(0, 1))


def sense_l1_wavelet(hybrid: np.ndarray, mask: np.ndarray, maps: np.ndarray, lam: float = 0.002,
                     iterations: int = 60, levels: int = 4, seed: int = 0) -> np.ndarray:
    """SENSE with an l1 penalty on Haar wavelet coefficients (FISTA, random cyclic shifts):
    min_x 1/2 sum_c ||M F(s_c x) - y_c||^2 + lam max|A^H y| ||W x||_1 on the complex image
    [ny, nx] from hybrid data [C, ny, nx] (ky, x), mask [ny] and unit-RSS maps [C, ny, nx]
    (step 1: ||A^H A|| <= 1 for unit-RSS maps and an orthonormal partial FFT)."""
    operator = RowSense.from_slice_maps(maps, mask)          # rows are the nx readout positions

    def normal(x):                                            # image [ny, nx]
        return operator.normal(x.T).T

    rhs = np.ascontiguousarray(operator.adjoint(np.asarray(hybrid, dtype=np.complex64).transpose(2, 0, 1)).T)
    threshold = float(lam * np.abs(rhs).max())
    rng = np.random.default_rng(seed)
    x = rhs.astype(np.complex64)
    z, t = x.copy(), 1.0
    for _ in range(iterations):
        shift = tuple(int(v) for v in rng.integers(0, 2 ** levels, 2))
        updated = wavelet_shrink(z - (normal(z) - rhs), threshold, levels, shift).astype(np.complex64)
        t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
        z = updated + np.float32((t - 1) / t_next) * (updated - x)
        x, t = updated, t_next
    return x
