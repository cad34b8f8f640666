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

from .sense_rows import RowSense, RowSenseMaps


def row_operator(maps: np.ndarray, mask: np.ndarray) -> RowSense:
    """The row operator of maps [C, ny, nx] (one map) or [M, C, ny, nx] (M maps, soft SENSE)."""
    maps = np.asarray(maps, dtype=np.complex64)
    if maps.ndim == 3:
        return RowSense.from_slice_maps(maps, mask)
    if maps.ndim == 4:
        return RowSenseMaps.from_slice_maps(maps, mask)
    raise ValueError(f"maps must be [coils, ny, nx] or [maps, coils, ny, nx]; got shape {maps.shape}")


def to_image_layout(rows: np.ndarray) -> np.ndarray:
    """Rows [nx, ny] -> image [ny, nx]; rows [nx, M, ny] -> per-map images [M, ny, nx]."""
    return np.ascontiguousarray(rows.T if rows.ndim == 2 else rows.transpose(1, 2, 0))


def to_row_layout(image: np.ndarray) -> np.ndarray:
    """The inverse of `to_image_layout`."""
    return np.ascontiguousarray(image.T if image.ndim == 2 else image.transpose(2, 0, 1))


def combine_maps(images: np.ndarray) -> np.ndarray:
    """One complex image [ny, nx] from per-map images [M, ny, nx]: magnitude = root-sum-of-squares
    over the maps (BART's soft-SENSE combination), phase = the first map's. An image [ny, nx]
    passes unchanged."""
    if images.ndim == 2:
        return images
    magnitude = np.sqrt(np.sum(images.real ** 2 + images.imag ** 2, axis=0))
    first = images[0]
    phase = np.where(np.abs(first) > 0, first / np.maximum(np.abs(first), 1e-30), 1)
    return (magnitude * phase).astype(np.complex64)


def coil_images(images: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Coil images [C, ny, nx] of an image [ny, nx] with maps [C, ny, nx], or of per-map images
    [M, ny, nx] with maps [M, C, ny, nx] (sum over the maps)."""
    if np.asarray(maps).ndim == 3:
        return maps * images[None]
    return np.sum(maps * images[:, None], axis=0)


def sense_tikhonov(hybrid: np.ndarray, mask: np.ndarray, maps: np.ndarray, lam: float = 0.01,
                   iterations: int = 30, tolerance: float = 1e-6, per_map: bool = False) -> np.ndarray:
    """Complex image [ny, nx] from measured hybrid data [C, ny, nx] (ky, x; zero where not
    sampled), mask [ny] and maps [C, ny, nx]. lam is relative to the data: the system is
    (A^H A + lam * max(diag A^H A)) x = A^H y, so one lam fits any scaling of maps and data.
    Several maps [M, C, ny, nx] (soft SENSE): A = sum_m M F S_m x_m, the unknown is x [M, ny, nx]
    and max(diag A^H A) is the largest sum_m,c |s_mc|^2 times the sampled fraction; the image is
    `combine_maps` of the per-map images (per_map: those images [M, ny, nx] instead)."""
    sampled = (np.asarray(mask) > 0.5)[None, :, None]
    maps = np.asarray(maps, dtype=np.complex64)
    power = np.sum(np.abs(maps) ** 2, axis=tuple(range(maps.ndim - 2)))        # [ny, nx]
    diagonal = float(np.max(power)) * sampled.mean()
    weight = np.float32(lam * max(diagonal, 1e-12))
    operator = row_operator(maps, mask)                     # rows are the nx readout positions
    inner = tuple(range(1, maps.ndim - 1))                  # per row: over (ny) or (M, ny)

    rhs = operator.adjoint(np.asarray(hybrid).transpose(2, 0, 1))               # [nx, (M,) ny]
    x = np.zeros_like(rhs)
    residual = rhs.copy()
    direction = residual.copy()
    power = np.sum(np.abs(residual) ** 2, axis=inner, keepdims=True)   # per row (readout position)
    stop = tolerance * np.maximum(power, 1e-30)
    for _ in range(iterations):
        curved = operator.normal(direction) + weight * direction
        alpha = power / np.maximum(np.real(np.sum(direction.conj() * curved, axis=inner, keepdims=True)), 1e-30)
        x += alpha * direction
        residual -= alpha * curved
        new_power = np.sum(np.abs(residual) ** 2, axis=inner, keepdims=True)
        if np.all(new_power <= stop):
            break
        direction = residual + (new_power / np.maximum(power, 1e-30)) * direction
        power = new_power
    images = to_image_layout(x)
    return images if per_map else combine_maps(images)


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
                     iterations: int = 60, levels: int = 4, seed: int = 0, per_map: bool = False) -> np.ndarray:
    """SENSE with an l1 penalty on Haar wavelet coefficients (FISTA, random cyclic shifts):
    min_x 1/2 sum_c ||M F(s_c x) - y_c||^2 + lam max|A^H y| ||W x||_1 on the complex image
    [ny, nx] from hybrid data [C, ny, nx] (ky, x), mask [ny] and unit-RSS maps [C, ny, nx]
    (step 1: ||A^H A|| <= 1 for unit-RSS maps and an orthonormal partial FFT).
    Several maps [M, C, ny, nx]: x [M, ny, nx], each map's wavelet coefficients thresholded on
    their own (as BART's pics), step 1 / L with L the largest per-pixel ||S(r)^H S(r)||
    (~1 for ESPIRiT maps, whose columns are orthogonal with norms <= 1); the image is
    `combine_maps` of the per-map images (per_map: those images [M, ny, nx])."""
    maps = np.asarray(maps, dtype=np.complex64)
    operator = row_operator(maps, mask)                     # rows are the nx readout positions
    several = maps.ndim == 4
    step = np.float32(1 / max(largest_map_gram(maps), 1e-12)) if several else None

    def normal(x):                                            # image [ny, nx] or [M, ny, nx]
        return to_image_layout(operator.normal(to_row_layout(x)))

    def shrink(x, threshold, shift):
        if not several:
            return wavelet_shrink(x, threshold, levels, shift)
        return np.stack([wavelet_shrink(image, threshold, levels, shift) for image in x])

    rhs = to_image_layout(operator.adjoint(np.asarray(hybrid, dtype=np.complex64).transpose(2, 0, 1)))
    threshold = float(lam * np.abs(rhs).max())
    rng = np.random.default_rng(seed)
    x = rhs.astype(np.complex64)
    z, t = x.copy(), 1.0
    for _ in range(iterations):
        shift = tuple(int(v) for v in rng.integers(0, 2 ** levels, 2))
        if several:
            updated = shrink(z - step * (normal(z) - rhs), float(step) * threshold, shift).astype(np.complex64)
        else:
            updated = shrink(z - (normal(z) - rhs), threshold, shift).astype(np.complex64)
        t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
        z = updated + np.float32((t - 1) / t_next) * (updated - x)
        x, t = updated, t_next
    return x if per_map or not several else combine_maps(x)


def largest_map_gram(maps: np.ndarray) -> float:
    """max over pixels of the largest eigenvalue of S(r)^H S(r) (S(r) = maps [M, C, ny, nx] at
    pixel r, C x M): the Lipschitz constant of A^H A for an orthonormal partial FFT."""
    gram = np.einsum("mcyx,ncyx->yxmn", maps.conj(), maps)
    return float(np.max(np.linalg.eigvalsh(gram)))
