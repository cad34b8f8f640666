"""Scan-specific calibration: coil sensitivities from the reference lines a scan carries.

Numpy only, no stream knowledge: the PISF recon, the SENSE floor and the classical chains share
it. The reference lines are a contiguous block of fully sampled ky lines around the k-space
centre (embedded ACS lines, a separate reference scan, or interleaved calibration lines: the
caller passes the calibration k-space and which ky lines hold reference data).

ESPIRiT (Uecker et al., MRM 2014), computed in the fast way:
1. calibration matrix of all k x k patches of the reference block (all coils), keep the
   right singular vectors above `threshold` x the largest singular value (the signal subspace);
2. the image-domain operator of that subspace is, per pixel, a C x C matrix G(r) whose entries
   are Fourier transforms of kernel cross-correlations (support (2k-1)^2): C^2 small FFTs
   instead of one per kernel;
3. the sensitivity at r is G(r)'s top eigenvector (eigenvalue ~1 inside the object), found by
   batched power iteration, its phase referenced to the first (strongest virtual) coil.
   G is a trigonometric polynomial of degree k - 1 per axis and the maps are smooth, so steps 2-3
   run on a coarse grid (every f-th pixel, at least DEFAULT_GRID points per axis) and the maps are
   interpolated onto the image grid (`espirit_maps`, grid=None: every pixel).
4. two maps (soft SENSE, `espirit_maps(maps=2 | "auto")`): the second eigenvector by deflated
   power iteration on the same coarse-grid operator (`second_eigenvectors`), and the maps as the
   Cholesky factor of the eigenvalue-weighted projector (`two_maps`). Where the object is larger
   than the field of view along phase encoding, the coil images of an aliased pixel mix two
   sensitivities and G(r) has two eigenvalues ~1; one map cannot represent that.
   Rule (`second_map_signal`): share of the object (lambda_1 > 0.9) where lambda_2 > 0.9, on the
   calibration grid, with the sense chain's kernel (`calibration_kernel`). Measured on every
   case of the dev sets: 0.000 on phantom, cimax, brain16_4ch, phantom_4ch, <= 0.030 on brain16
   (R 8, 8 lines; 0 elsewhere; largest lambda_2 0.70-0.96), 0.126-0.201 on brain16_folded and
   0.180-0.203 on phantom_folded: two maps from SECOND_MAP_SHARE = 0.07 up.
   Cost (one thread, CPU time, minimum of 25, 24 x 64 reference blocks; shared machine): one
   map 12-125 ms, two maps 1.05-1.67x, maps="auto" where one map results 1.0-1.5x (timings in
   the issue 18 report).
No eigenvalue crop in the calibration: on in-vivo brain data a crop at 0.9 cost 10 dB in SENSE (it
zeroes maps inside the head where the eigenvalue dips), while the regularised solvers keep the
background small anyway. Re-measured for issue 18 (SENSE l2, every dev case): no crop level wins
on every case; the SENSE images crop one map at 0.8 from R 4 up (`espirit_crop_level`, applied
per image since R is known only then: the calibration, shared and cached, keeps its maps).
"""
from __future__ import annotations

import numpy as np

from .reference import MIN_CALIBRATION_REFERENCE_LINES, reference_run

DEFAULT_KERNEL = 6           # MIN_CALIBRATION_REFERENCE_LINES (numerics/reference.py) follows it
DEFAULT_THRESHOLD = 0.02
NOISE_FACTOR = 2.0
DEFAULT_GRID = 64            # calibration grid points per axis (espirit_maps)
# Two maps (soft SENSE): a pixel counts towards the second map's signal where its second
# eigenvalue exceeds SECOND_MAP_LEVEL, and `espirit_maps(maps="auto")` returns two maps when
# that area is at least SECOND_MAP_SHARE of the object (`second_map_signal`; measured values in
# the module docstring, step 4). The second map is weighted by its eigenvalue: 0 below SECOND_MAP_RAMP[0],
# 1 above SECOND_MAP_RAMP[1] (`second_map_weight`).
SECOND_MAP_LEVEL = 0.9
SECOND_MAP_SHARE = 0.07
# ramp measured (two-map SENSE, lambda best of 0.001-0.1 per case, mean over the folded dev sets):
# (0.8, 0.9) brain16_folded 32.65 / phantom_folded 27.83 dB; (0.9, 0.95) 31.48 / 28.07; step at
# 0.95 (BART's crop) 30.52 / 27.89; (0.7, 0.9) 32.32 / 27.67: the brain's 12-line cases reach
# lambda_2 ~0.97 only, a high ramp drops the second map there (-3 to -5 dB)
SECOND_MAP_RAMP = (0.8, 0.9)
SECOND_MAP_ITERATIONS = 6    # deflated power iterations for the second vector (`second_eigenvectors`)
# Eigenvalue crop of the SENSE images (issue 18 part 2, `espirit_crop_level`): one map zeroed where
# its eigenvalue is <= ESPIRIT_CROP_LEVEL, on slices whose mask has R >= ESPIRIT_CROP_FROM_ACCELERATION
# (ny / image lines, embedded ACS counted). Measured (l2 SENSE, lambda best of 0.003-0.1 per case,
# this rule vs no crop, mean / worst case dB): phantom +0.17/-0.16, brain16 +0.57/0.00, cimax
# +0.40/-0.10, brain16_4ch +0.36/-0.13, phantom_4ch +0.41/0.00; from R 3 up cimax lost -1.43 and
# brain16_4ch -0.58 on a case (the losses sit at R 2-3, where the data fill the background well);
# two maps (folded sets): no crop level gained (runs/issue18_maps/crop3_tuned.json). The cached
# calibrations stay uncropped: R is known only when the image lines have come.
ESPIRIT_CROP_LEVEL = 0.8
ESPIRIT_CROP_FROM_ACCELERATION = 4.0
# Few coils with a separate reference (image lines a pure equispaced mask, no centre among them):
# BART's 0.95 crop, one or two maps, from R 3 (2.5 allows the achieved R of 2.98-3.01). Sense core
# vs tuned BART l2, before -> after (runs/eval18_fix): brain16_4ch R3 -5.60 -> +0.34, R4 -3.40 ->
# -1.24; phantom_4ch R3 -4.48 -> -0.11, R4 -2.30 -> -0.37; phantom (8 coils) R3 -3.47 -> -0.09,
# R4 -3.23 -> -0.89; at 16 coils it lost (brain16 R3 +0.46 -> -1.45, cimax R3 +0.37 -> -1.73),
# at R 2 too (4 coils -0.4, -0.3). Not the calibration region: the full readout moved these cases
# by <= 0.03 dB; nor lambda (x0.1, x10 lost) or iterations (100: R4 brain +1.4, others 0).
FEW_COILS_CROP_LEVEL = 0.95
FEW_COILS_CROP_MAX_COILS = 8
FEW_COILS_CROP_FROM_ACCELERATION = 2.5


def calibration_matrix(reference: np.ndarray, kernel: int) -> np.ndarray:
    """All kernel x kernel patches of reference [C, ly, lx] as rows: [patches, C * k * k]."""
    coils = reference.shape[0]
    windows = np.lib.stride_tricks.sliding_window_view(reference, (kernel, kernel), axis=(1, 2))
    return windows.transpose(1, 2, 0, 3, 4).reshape(-1, coils * kernel * kernel)


def calibration_gram(reference: np.ndarray, kernel: int) -> np.ndarray:
    """calibration_matrix(reference, kernel)^H @ calibration_matrix(...) [C k^2, C k^2], complex64,
    computed along the readout as cross-correlations instead of the (C k^2)^2 x patches product
    (5x faster at 24 x 256 x 8-16). With alpha = (coil, kernel row) and b, b' the kernel columns,
    entry (alpha b, beta b') sums conj(X_alpha(x)) X_beta(x + b' - b) over the readout columns x of
    the windows with offset b, [b, b + px). Columns k-1 .. px-1 belong to every window: their
    sum, for the 2k - 1 lags at once, is a product of readout spectra (one small matrix product
    per readout frequency); the 2(k - 1) edge columns are added per window."""
    reference = np.asarray(reference, dtype=np.complex64)
    coils, ly, lx = reference.shape
    k = kernel
    if lx < 2 * k:                                                    # no interior columns
        rows = calibration_matrix(reference, k)
        return rows.conj().T @ rows
    py, px = ly - k + 1, lx - k + 1
    taps, stacked = 2 * k - 1, coils * k

    def by_kernel_row(block: np.ndarray) -> np.ndarray:             # [n, p, (c, a)] = block[c, p + a]
        windows = np.lib.stride_tricks.sliding_window_view(block, py, axis=1)   # [C, k, n, py]
        return windows.transpose(2, 3, 0, 1).reshape(block.shape[2], py, stacked)

    interior = reference.copy()
    interior[:, :, :k - 1] = 0
    interior[:, :, px:] = 0
    spectrum = (by_kernel_row(np.fft.fft(interior, axis=2)).conj().transpose(0, 2, 1)
                @ by_kernel_row(np.fft.fft(reference, axis=2)))      # [lx, alpha, beta]
    lags = np.arange(-(k - 1), k)
    to_lags = (np.exp(2j * np.pi * np.outer(lags, np.arange(lx)) / lx) / lx).astype(np.complex64)
    common = (to_lags @ spectrum.reshape(lx, -1)).reshape(taps, stacked, stacked)
    common = common.transpose(1, 2, 0)                                # [alpha, beta, lag]
    rows = by_kernel_row(reference)                                   # [lx, py, alpha]
    padded = np.zeros((lx + 2 * (k - 1), py, stacked), dtype=np.complex64)
    padded[k - 1:k - 1 + lx] = rows
    lagged = np.lib.stride_tricks.sliding_window_view(padded, taps, axis=0)   # [x, p, beta, lag]
    edges = np.r_[0:k - 1, px:lx]
    columns = (rows[edges].conj().transpose(0, 2, 1) @ lagged[edges].reshape(len(edges), py, -1)
               ).reshape(len(edges), stacked, stacked, taps)         # [edge column, alpha, beta, lag]
    gram = np.empty((stacked, k, stacked, k), dtype=np.complex64)
    for b in range(k):               # window b: left edge columns b .. k-2, right edge columns px .. px+b-1
        window = common + columns[b:k - 1].sum(axis=0) + columns[k - 1:k - 1 + b].sum(axis=0)
        gram[:, b] = window[:, :, k - 1 - b:2 * k - 1 - b]           # lag b' - b for b' = 0 .. k-1
    return gram.reshape(stacked * k, stacked * k)


def signal_kernels(reference: np.ndarray, kernel: int, threshold: float,
                   noise_factor: float = NOISE_FACTOR) -> np.ndarray:
    """Signal-subspace kernels [C, k, k, n] of the reference block [C, ly, lx]: singular vectors
    above `threshold` x the largest singular value and above `noise_factor` x the median one.
    The median lies in the noise tail of the spectrum (the signal subspace is a small part of
    the C k^2 dimensions): on noisy references (e.g. ismrmrd-tools' Shepp-Logan at -n 0.05,
    whose noise floor is ~0.03 of the largest) the relative threshold alone keeps nearly every
    vector and the maps become arbitrary; on the real datasets here it changes nothing.

    The Gram matrix is accumulated in complex64 (`calibration_gram`; its rounding, ~3e-7 of the
    largest entry, is far below the cut at threshold^2 = 4e-4 of the largest eigenvalue) and
    decomposed in complex128: `leading_subspace` when it can prove the same cut, else in full."""
    coils = reference.shape[0]
    gram = calibration_gram(reference, kernel).astype(np.complex128)
    vectors = leading_subspace(gram, threshold, noise_factor)
    if vectors is None:
        values, vectors = np.linalg.eigh(gram)                    # ascending
        values, vectors = values[::-1], vectors[:, ::-1]
        singular = np.sqrt(np.maximum(values, 0.0))
        cut = max(threshold * singular[0], noise_factor * float(np.median(singular)))
        vectors = vectors[:, :max(1, int(np.sum(singular >= cut)))]
    return vectors.reshape(coils, kernel, kernel, -1)


def leading_subspace(gram: np.ndarray, threshold: float, noise_factor: float,
                     iterations: int = 4) -> np.ndarray | None:
    """The eigenvectors [n, keep] of the Hermitian PSD gram [n, n] (complex128) whose singular
    value (sqrt of the eigenvalue) is >= threshold x the largest, by subspace iteration on a
    block of n / 5 vectors (complex64 iterations, one complex128 iteration and Rayleigh-Ritz):
    a third of the time of a full eigh at 16 coils (n = 576). None (use the full eigh) when the
    result could differ from it: when the median singular value might reach the cut / noise_factor
    (bound: every eigenvalue outside the block is below (trace - Ritz sum) / (n/2 - block)), when
    the signal subspace fills most of the block, or when a kept Ritz pair has not converged.
    On the dev datasets the kept subspace matches the full eigh's to a principal-angle sine of
    <= 1e-4, and the maps inside the object to 2.4e-6."""
    size = gram.shape[0]
    block = max(72, size // 5)
    if 2 * block >= size:
        return None
    start = np.random.default_rng(0).standard_normal((size, 2 * block)).astype(np.float32)
    vectors = start.view(np.complex64)                              # fixed seed: same maps every run
    single = gram.astype(np.complex64)
    for _ in range(iterations):
        vectors, _ = np.linalg.qr(single @ vectors)
    vectors, _ = np.linalg.qr(gram @ vectors.astype(np.complex128))
    applied = gram @ vectors
    ritz_values, rotation = np.linalg.eigh(vectors.conj().T @ applied)
    ritz_values, rotation = ritz_values[::-1], rotation[:, ::-1]
    largest = max(float(ritz_values[0]), 1e-300)
    cut = threshold ** 2 * largest                                # on eigenvalues
    tail = max(0.0, float(np.real(np.trace(gram))) - float(ritz_values.sum())) / (size / 2 - block)
    keep = max(1, int(np.sum(ritz_values >= cut)))
    if noise_factor ** 2 * tail >= cut or keep > block - 8:
        return None
    residual = applied @ rotation[:, :keep] - (vectors @ rotation[:, :keep]) * ritz_values[:keep]
    if np.max(np.linalg.norm(residual, axis=0)) > 1e-5 * largest:
        return None
    return vectors @ rotation[:, :keep]


def coarse_shape(shape: tuple[int, int], grid: int | None) -> tuple[int, int]:
    """Points per axis of the calibration grid: n / f for the largest factor f of n that leaves
    at least `grid` points (every f-th pixel; every pixel when grid is None or n < 2 grid). When
    n has no factor of at least half of n // grid (a prime-like n), ceil(n / (n // grid)) points
    at fractional pixel positions instead."""
    if not grid:
        return tuple(int(n) for n in shape)
    points = []
    for n in (int(n) for n in shape):
        most = max(1, n // int(grid))
        factor = next(f for f in range(most, 0, -1) if n % f == 0)
        points.append(n // factor if 2 * factor > most else -(-n // most))
    return tuple(points)


def grid_positions(n: int, points: int) -> np.ndarray:
    """Image positions (pixels from the centre, ifftc convention) of `points` equispaced samples
    over a field of view of n pixels, the first at -n // 2 (every pixel when points == n)."""
    return -(n // 2) + np.arange(points) * (n / points)


def centred_dft_rows(shifts: np.ndarray, n: int, points: int | None = None) -> np.ndarray:
    """[points, len(shifts)]: the centred inverse DFT (unnormalised, over n) of a signal that is
    nonzero only at k-space offsets `shifts` from the centre, evaluated at `grid_positions(n,
    points)` (every image position by default)."""
    position = grid_positions(n, n if points is None else points)
    return np.exp(2j * np.pi * np.outer(position, shifts) / n).astype(np.complex64)


def kernel_correlations(kernels: np.ndarray) -> np.ndarray:
    """[2k-1, 2k-1, C, C] complex64: conj of the kernels' cross-correlations sum_j K_jc * K_jd
    at k-space offsets -(k-1)..k-1 (C^2 small FFTs instead of one per kernel)."""
    coils, k, _, n_kernels = kernels.shape
    grid = 2 * k                                                  # >= 2k - 1: no wrap-around
    padded = np.zeros((coils, grid, grid, n_kernels), dtype=np.complex128)
    padded[:, :k, :k] = kernels
    spectra = np.fft.fft2(padded, axes=(1, 2)).reshape(coils, grid * grid, n_kernels)
    products = np.matmul(spectra.transpose(1, 0, 2), spectra.conj().transpose(1, 2, 0))   # [g^2, C, C]
    correlation = np.fft.ifft2(products.reshape(grid, grid, coils, coils), axes=(0, 1))
    shifts = np.arange(-(k - 1), k)
    return correlation[shifts[:, None] % grid, shifts[None, :] % grid].conj().astype(np.complex64)


def image_space_operator(kernels: np.ndarray, shape: tuple[int, int],
                         points: tuple[int, int] | None = None) -> np.ndarray:
    """Per-pixel C x C matrices G, laid out [py, px, C, C] (complex64), of the kernels'
    image-domain projection on the `points` grid (`grid_positions` over `shape`; every pixel by
    default): G(r)[c, d] = sum over kernels j of conj(K_jc(r)) K_jd(r) / k^2, with K_jc(r) the
    image-domain kernel. Each entry is a trigonometric polynomial (the Fourier transform of a
    kernel cross-correlation of support (2k-1)^2), so any grid is two small matrix products."""
    coils, k = kernels.shape[0], kernels.shape[1]
    py, px = points or shape
    small = kernel_correlations(kernels) / np.float32(k * k)      # [2k-1, 2k-1, C, C]
    taps = small.shape[0]
    shifts = np.arange(-(k - 1), k)
    along_x = centred_dft_rows(shifts, shape[1], px)              # conj of the -shifts rows
    along_y = centred_dft_rows(shifts, shape[0], py)
    columns = np.matmul(along_x, small.reshape(taps, taps, -1))    # [2k-1, px, C*C]
    return (along_y @ columns.reshape(taps, -1)).reshape(py, px, coils, coils)


def low_resolution_start(reference: np.ndarray, shape: tuple[int, int],
                         points: tuple[int, int] | None = None) -> np.ndarray:
    """Unit-norm coil vectors [C, py, px] of the reference block's low-resolution coil images
    (constant where they vanish) on the `points` grid over `shape`: the power iteration's start.
    On a coarse grid the block is cropped to the grid's band (a smoother start, same role)."""
    from .fft import ifftc

    coils, ly, lx = reference.shape
    py, px = points or shape
    cy, cx = min(ly, py), min(lx, px)
    grid = np.zeros((coils, py, px), dtype=np.complex64)
    y0, x0 = py // 2 - cy // 2, px // 2 - cx // 2
    grid[:, y0:y0 + cy, x0:x0 + cx] = reference[:, ly // 2 - cy // 2:ly // 2 - cy // 2 + cy,
                                                lx // 2 - cx // 2:lx // 2 - cx // 2 + cx]
    images = ifftc(grid, axes=(1, 2))
    norm = np.sqrt(np.sum(np.abs(images) ** 2, axis=0))
    start = np.where(norm > 1e-6 * max(float(norm.max()), 1e-30), images / np.maximum(norm, 1e-30),
                     1 / np.sqrt(coils))
    return start.astype(np.complex64)


def top_eigenvectors(operator: np.ndarray, start: np.ndarray,
                     iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Power iteration on per-pixel matrices operator [py, px, C, C] from start [C, py, px]:
    (unit vectors [py, px, C], Rayleigh quotients [py, px]). A batched matrix-vector product
    over pixels; one product on 64x64 pixels took 0.36 ms at 16 coils (per-coil multiply-add
    1.2 ms, einsum 1.9 ms) and 0.33 ms at 8 (0.16 ms, 0.58 ms): the multiply-add wins only where
    both are negligible."""
    vector = np.ascontiguousarray(np.moveaxis(start, 0, -1))[..., None]      # [py, px, C, 1]
    for _ in range(iterations):
        vector = operator @ vector
        vector /= np.maximum(np.sqrt(np.sum(vector.real ** 2 + vector.imag ** 2, axis=-2, keepdims=True)),
                             np.float32(1e-30))
    eigenvalue = np.sum((vector.conj() * (operator @ vector)).real, axis=(-2, -1))
    return vector[..., 0], eigenvalue


def second_eigenvectors(operator: np.ndarray, first: np.ndarray, first_value: np.ndarray,
                        iterations: int, start: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The two leading eigenpairs of per-pixel matrices operator [py, px, C, C] given the first
    from `top_eigenvectors` (first [py, px, C], first_value [py, px]): power iteration on the
    deflated operator G - lambda_1 v1 v1^H from `start` [C, py, px] plus a little of a fixed
    vector (that vector alone without a start), then
    Rayleigh-Ritz on the span of both (2 x 2, closed form), which also separates the pair where
    v1 had not converged (lambda_2 close to lambda_1). Returns (Ritz vectors [py, px, C, 2],
    Ritz values [py, px, 2], descending).

    The second vector converges at the rate lambda_3 / lambda_2: fast where a second sensitivity
    carries signal (lambda_2 ~ 1, a folded object), slowly where lambda_2 is small (weighted out
    there). Its Rayleigh quotient does not exceed lambda_2 (up to v1's own error), so the
    `second_map_signal` rule does not fire on an unconverged vector. Deflation rather than a
    [C, 2] block per pixel: the block's product cost as much as two products, and
    `top_eigenvectors` stays the one-map path (its maps bit-identical whether or not the second
    is computed)."""
    tiny = np.float32(1e-30)
    first = first[..., None]                                                   # [py, px, C, 1]
    coils = first.shape[-2]
    # a fixed chirp over the coils (no pixel is orthogonal to it by accident of smoothness)
    chirp = np.exp(1j * np.pi * np.arange(coils) ** 2 / coils).astype(np.complex64)[:, None]
    if start is None:
        second = np.broadcast_to(chirp, first.shape).copy()
    else:
        second = np.ascontiguousarray(np.moveaxis(start, 0, -1))[..., None] + np.float32(0.1) * chirp

    def orthonormalise(second):
        second -= first * np.sum(first.conj() * second, axis=-2, keepdims=True)
        second *= (1 / np.maximum(np.sqrt(squared_norm(second[..., 0])), tiny))[..., None, None]
        return second

    # deflated once (G - lambda_1 v1 v1^H): each step is then one product, as for the first vector;
    # normalised every other step only (values shrink by lambda_2^2 < 1 in between, far from
    # float32's denormals) and projected off v1 at the end
    deflated = operator - (first_value[..., None, None] * first) * first.conj().swapaxes(-1, -2)
    second = orthonormalise(second)
    for step in range(iterations):
        second = deflated @ second
        if step % 2 == 1 or step == iterations - 1:
            second = orthonormalise(second)
    applied = operator @ second
    p = first_value.astype(np.float64)
    q = np.sum(applied.conj() * first, axis=(-2, -1)).conj()                   # v1^H G v2
    r = np.sum(second.conj() * applied, axis=(-2, -1)).real
    half_gap = np.sqrt(((p - r) / 2) ** 2 + np.abs(q) ** 2)
    top, bottom = (p + r) / 2 + half_gap, (p + r) / 2 - half_gap
    # top eigenvector of [[p, q], [q*, r]]: (top - r, q*) where p >= r, else (q, top - p): the
    # larger of the two equivalent forms, so it never vanishes
    a = np.where(p >= r, top - r, q).astype(np.complex64)
    b = np.where(p >= r, np.conj(q), top - p).astype(np.complex64)
    norm = np.maximum(np.sqrt(np.abs(a) ** 2 + np.abs(b) ** 2), tiny)
    a, b = (a / norm)[..., None], (b / norm)[..., None]
    first, second = first[..., 0], second[..., 0]
    ritz = np.stack([a * first + b * second, -np.conj(b) * first + np.conj(a) * second], axis=-1)
    return ritz, np.stack([top, bottom], axis=-1).astype(np.float32)


def squared_norm(vectors: np.ndarray) -> np.ndarray:
    """sum |v|^2 over the last axis of complex64 vectors [..., C] (contiguous along C)."""
    view = vectors.view(np.float32) if vectors.flags.c_contiguous else np.ascontiguousarray(vectors).view(np.float32)
    return np.einsum("...i,...i->...", view, view)


def second_map_weight(eigenvalue: np.ndarray, low: float, high: float) -> np.ndarray:
    """Weight of the second map at a pixel from its eigenvalue: 0 below `low`, 1 above `high`,
    linear between (BART's crop is the step low == high)."""
    if high <= low:
        return (eigenvalue > low).astype(np.float32)
    return np.clip((eigenvalue - low) / (high - low), 0, 1).astype(np.float32)


def second_map_signal(eigenvalues: np.ndarray, level: float = SECOND_MAP_LEVEL) -> float:
    """Share of the object (pixels whose first eigenvalue exceeds `level`) where the second
    eigenvalue exceeds it too: the area of the image a second sensitivity explains, i.e. where
    two parts of the object overlap (folded along phase encoding). eigenvalues [2, ...]."""
    inside = eigenvalues[0] > level
    return float(np.sum(inside & (eigenvalues[1] > level)) / max(1, int(np.sum(inside))))


def cubic_weights(offset: np.ndarray) -> np.ndarray:
    """[len(offset), 4] Keys cubic convolution weights (a = -0.5) of the samples at -1, 0, 1, 2
    for fractional positions `offset` in [0, 1): third-order accurate, exact for quadratics."""
    t = offset[:, None] - np.arange(-1, 3)[None, :]
    t = np.abs(t)
    return np.where(t <= 1, 1.5 * t ** 3 - 2.5 * t ** 2 + 1,
                    np.where(t < 2, -0.5 * t ** 3 + 2.5 * t ** 2 - 4 * t + 2, 0.0)).astype(np.float32)


def periodic_cubic(values: np.ndarray, axis: int, n: int) -> np.ndarray:
    """Samples of `values` at grid_positions(n, m) along `axis` (m points, periodic over the field of
    view like every image-domain function of the DFT) interpolated onto all n pixels."""
    points = values.shape[axis]
    if points == n:
        return values
    moved = np.moveaxis(values, axis, -1)
    if n % points == 0:
        # every f-th pixel: each output phase within a sample interval has fixed weights, so the
        # result is 4 shifted slices per phase (5-8x faster than gathering 4 taps per pixel)
        factor = n // points
        weights = cubic_weights(np.arange(factor) / factor)
        padded = np.concatenate([moved[..., -1:], moved, moved[..., :2]], axis=-1)
        result = np.empty(moved.shape[:-1] + (points, factor), dtype=np.result_type(values, np.float32))
        for phase in range(factor):
            column = padded[..., 0:points] * weights[phase, 0]
            for tap in range(1, 4):
                column += padded[..., tap:tap + points] * weights[phase, tap]
            result[..., phase] = column
        return np.moveaxis(result.reshape(moved.shape[:-1] + (n,)), -1, axis)
    position = np.arange(n) * (points / n)
    base = np.floor(position).astype(np.int64)
    weights = cubic_weights(position - base)
    result = np.take(moved, base - 1, axis=-1, mode="wrap") * weights[:, 0]
    for tap in range(1, 4):
        result += np.take(moved, base + tap - 1, axis=-1, mode="wrap") * weights[:, tap]
    return np.moveaxis(result, -1, axis)


def espirit_maps(reference: np.ndarray, shape: tuple[int, int], kernel: int = DEFAULT_KERNEL,
                 threshold: float = DEFAULT_THRESHOLD, iterations: int = 12,
                 crop: float = 0.0, grid: int | None = DEFAULT_GRID,
                 maps: int | str = 1, second_iterations: int = SECOND_MAP_ITERATIONS) -> tuple[np.ndarray, np.ndarray]:
    """ESPIRiT sensitivities and eigenvalues from the reference block [C, ly, lx] (centred in
    k-space, any lx <= nx; the full readout width gives the sharpest maps). maps=1: maps
    [C, ny, nx] (complex64, unit root-sum-of-squares where the eigenvalue is > 0) and
    eigenvalues [ny, nx]. maps=2 (soft SENSE): maps [2, C, ny, nx] and eigenvalues [2, ny, nx]
    (`two_maps`). maps="auto": two where `second_map_signal` on the calibration grid reaches
    SECOND_MAP_SHARE (a folded object), else one (then bit-identical to maps=1).

    The power iteration starts from the low-resolution coil images of the reference block (per
    pixel close to the sensitivities, i.e. to the first eigenvector): from a constant start, 12
    iterations had not converged on the 14-channel Siemens slice (low-resolution projection
    residual 0.128, a streak through the SENSE and PISF v2 images; 0.023 after 40 iterations),
    from this start 6 reach 0.022; SENSE on the evaluation datasets moved by <= 0.1 dB.

    grid: the operator and the power iteration run on every f-th pixel (`coarse_shape`: at least
    `grid` points per axis; None: every pixel) and the maps are interpolated (cubic) onto the
    image grid: 1/16 of the pixels at 256x256, 1/36 at 384x384. What is interpolated is
    u = v conj(v_0), the first column of the projector v v^H: smooth wherever v is, with no phase
    wrap where coil 0 is weak (interpolating the phase-referenced map instead rang there: 4e-2 vs
    2e-3 worst gauge-invariant error on the in-vivo brain at 32 points); u / |u| is the map
    referenced to coil 0 again. Against per-pixel eigenvectors on the full grid, inside the object:
    mean error 2e-6 (phantom 256, cimax 128) to 2e-5 (simulated), max 1e-4 (real phantoms) to
    3e-2 at a few pixels where the eigenvalue gap closes (simulated, edge of the FOV); SENSE and
    the PISF model on the 39 evaluation cases moved by <= 0.04 dB (mean -0.001 / -0.000 dB)."""
    if maps not in (1, 2, "auto"):
        raise ValueError(f"maps must be 1, 2 or 'auto', not {maps!r}")
    reference = np.asarray(reference)
    coils, ly, lx = reference.shape
    ny, nx = (int(n) for n in shape)
    kernel = min(kernel, ly, lx)
    points = coarse_shape((ny, nx), grid)
    operator = image_space_operator(signal_kernels(reference, kernel, threshold), (ny, nx), points)
    start = low_resolution_start(reference, (ny, nx), points)
    vector, eigenvalue = top_eigenvectors(operator, start, iterations)
    if maps == 1:
        return one_map(vector, eigenvalue, (ny, nx), crop)
    # the second's start: the neighbours' low-resolution coil vectors. Where two parts of the
    # object overlap, they mix the two sensitivities in other proportions than at the pixel,
    # so they lie mostly in the two-dimensional signal subspace (brain16_folded, two-map SENSE
    # at 6 iterations: 0.0-0.2 dB below 12, against 0.0-0.6 dB from a random start)
    second_start = np.roll(start, 1, axis=1) + 1j * np.roll(start, 1, axis=2)
    ritz_vectors, ritz_values = second_eigenvectors(operator, vector, eigenvalue, second_iterations, second_start)
    if maps == "auto" and second_map_signal(np.moveaxis(ritz_values, -1, 0)) < SECOND_MAP_SHARE:
        return one_map(vector, eigenvalue, (ny, nx), crop)
    return two_maps(ritz_vectors, ritz_values, (ny, nx), crop)


def to_image_grid(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """values [..., py, px] on the calibration grid, interpolated (periodic cubic) onto shape."""
    return periodic_cubic(periodic_cubic(values, values.ndim - 2, shape[0]), values.ndim - 1, shape[1])


def unit_projector_column(column: np.ndarray) -> np.ndarray:
    """The map u / |u| of a projector column u [C, ny, nx] whose coil 0 is real >= 0 (u = v
    conj(v_0)): coil 0 of u is real (real interpolation weights); where the cubic undershoots it
    below 0 the sign flip keeps the map's coil 0 real positive."""
    norm = np.sqrt(np.sum(column.real ** 2 + column.imag ** 2, axis=0))
    scale = np.where(column[0].real < 0, -1.0, 1.0).astype(np.float32) / np.maximum(norm, 1e-30)
    return column * scale


def one_map(vector: np.ndarray, eigenvalue: np.ndarray, shape: tuple[int, int],
            crop: float) -> tuple[np.ndarray, np.ndarray]:
    """Maps [C, ny, nx] and eigenvalues [ny, nx] on the image grid from the top eigenvectors
    [py, px, C] and eigenvalues [py, px] on the calibration grid (`espirit_maps`, maps=1)."""
    vector = np.moveaxis(vector, -1, 0)                                       # [C, py, px]
    projector_column = vector * vector[0].conj()                              # u = v conj(v_0)
    projector_column[0] = np.abs(vector[0]) ** 2                              # exactly real, >= 0
    maps = unit_projector_column(to_image_grid(projector_column, shape))
    eigenvalue = to_image_grid(eigenvalue, shape)
    if crop > 0:
        maps = maps * (eigenvalue > crop)
    return maps.astype(np.complex64), eigenvalue.astype(np.float32)


def two_maps(vectors: np.ndarray, values: np.ndarray, shape: tuple[int, int], crop: float,
             ramp: tuple[float, float] = SECOND_MAP_RAMP) -> tuple[np.ndarray, np.ndarray]:
    """Soft-SENSE maps [2, C, ny, nx] and eigenvalues [2, ny, nx] from the two leading Ritz pairs
    (vectors [py, px, C, 2], values [py, px, 2]) on the calibration grid.

    Where two sensitivities carry signal (lambda_1 ~ lambda_2 ~ 1) the two eigenvectors are not
    unique, only their span is, so they cannot be interpolated one by one. What is smooth is the
    weighted projector P = v1 v1^H + w v2 v2^H (w = `second_map_weight` of lambda_2), and the maps
    are its Cholesky factor with coil 0 as the first pivot: map 1 = P e_0 / |P e_0| (the one-map
    rule where w = 0), map 2 = a column R e_j of R = P - map1 map1^H (rank one, trace w), scaled
    to norm sqrt(w). Interpolated are P e_0 (as for one map) and R e_j for the two coils j whose
    R_jj is largest on the calibration grid (each image pixel takes the j with the larger R_jj,
    so no pivot vanishes), the latter only on the rows where w > 0 (R = 0 elsewhere): the folded
    band, ~30 % of the rows on the folded dev sets. For Tikhonov SENSE only S S^H = P matters (the
    RSS over the maps' images is invariant under any per-pixel unitary mixing of the maps), so
    the choice of pivot per pixel does not change the image."""
    ny, nx = shape
    first, second = vectors[..., 0], vectors[..., 1]                          # [py, px, C]
    weight = second_map_weight(values[..., 1], *ramp)[..., None]
    projector_first = first * first[..., :1].conj() + weight * second * second[..., :1].conj()   # P e_0
    projector_first[..., 0] = projector_first[..., 0].real
    coarse_map = projector_first / np.maximum(np.linalg.norm(projector_first, axis=-1, keepdims=True), 1e-30)

    def residual_column(j):                                                   # R e_j [py, px, C]
        return (first * first[..., j:j + 1].conj() + weight * second * second[..., j:j + 1].conj()
                - coarse_map * coarse_map[..., j:j + 1].conj())

    residual_diagonal = np.abs(first) ** 2 + weight * np.abs(second) ** 2 - np.abs(coarse_map) ** 2
    pivots = [int(j) for j in np.argsort(residual_diagonal.reshape(-1, first.shape[-1]).sum(axis=0))[::-1][:2]]
    map_first = unit_projector_column(to_image_grid(np.moveaxis(projector_first, -1, 0), shape))
    eigenvalues = to_image_grid(np.moveaxis(values, -1, 0), shape)            # [2, ny, nx]
    band = np.any(weight[..., 0] > 0, axis=1)                                 # calibration rows with w > 0
    columns = np.moveaxis(np.stack([residual_column(j) for j in pivots]), -1, 1)   # [2, C, py, px]
    columns = band_to_image_grid(columns, band, shape)                        # [2, C, ny, nx]
    diagonal = np.stack([columns[i, j].real for i, j in enumerate(pivots)])
    chosen = np.where((diagonal[0] >= diagonal[1])[None], columns[0], columns[1])
    norm = np.sqrt(np.sum(chosen.real ** 2 + chosen.imag ** 2, axis=0))
    map_second = chosen * (np.sqrt(second_map_weight(eigenvalues[1], *ramp)) / np.maximum(norm, 1e-30))
    if crop > 0:
        map_first = map_first * (eigenvalues[0] > crop)
    return np.stack([map_first, map_second]).astype(np.complex64), eigenvalues.astype(np.float32)


def espirit_crop_level(maps: np.ndarray, acceleration: float, coils: int | None = None,
                       separate_reference: bool = False) -> float:
    """The eigenvalue below which SENSE zeroes the maps of a slice (0.0: no crop): with a separate
    reference and at most FEW_COILS_CROP_MAX_COILS coils (the scan's, before compression),
    FEW_COILS_CROP_LEVEL from R FEW_COILS_CROP_FROM_ACCELERATION (one or two maps); else
    ESPIRIT_CROP_LEVEL for one map [C, ny, nx] at R >= ESPIRIT_CROP_FROM_ACCELERATION, else none
    (two maps [2, C, ny, nx], lower R; measurements beside the constants)."""
    if (separate_reference and coils is not None and coils <= FEW_COILS_CROP_MAX_COILS
            and acceleration >= FEW_COILS_CROP_FROM_ACCELERATION):
        return FEW_COILS_CROP_LEVEL
    if maps.ndim == 3 and acceleration >= ESPIRIT_CROP_FROM_ACCELERATION:
        return ESPIRIT_CROP_LEVEL
    return 0.0


def cropped_maps(maps: np.ndarray, eigenvalues: np.ndarray, level: float) -> np.ndarray:
    """maps [C, ny, nx] zeroed where eigenvalues [ny, nx] <= level (a new array: the calibration
    they came from, possibly cached for other images, keeps its maps); level 0.0: maps as they are."""
    if level <= 0:
        return maps
    return maps * (eigenvalues > level).astype(maps.real.dtype)


def band_to_image_grid(values: np.ndarray, rows: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """`to_image_grid` of values [..., py, px] that are zero outside the calibration rows `rows`
    (bool [py]): only those rows along x and only the image rows whose cubic taps touch them
    along y are computed (the rest stays zero)."""
    ny, nx = shape
    points = values.shape[-2]
    out = np.zeros(values.shape[:-2] + (ny, nx), dtype=np.result_type(values, np.float32))
    if not rows.any():
        return out
    along_x = np.zeros(values.shape[:-1] + (nx,), dtype=out.dtype)
    along_x[..., rows, :] = periodic_cubic(values[..., rows, :], values.ndim - 1, nx)
    position = np.arange(ny) * (points / ny)
    base = np.floor(position).astype(np.int64)
    taps = (base[:, None] + np.arange(-1, 3)[None, :]) % points              # [ny, 4]
    needed = np.flatnonzero(rows[taps].any(axis=1))
    weights = cubic_weights(position[needed] - base[needed])                  # [rows, 4]
    result = along_x[..., taps[needed, 0], :] * weights[:, 0, None]
    for tap in range(1, 4):
        result += along_x[..., taps[needed, tap], :] * weights[:, tap, None]
    out[..., needed, :] = result
    return out


def calibration_kernel(reference_lines: int) -> int:
    """ESPIRiT kernel size for a reference block of `reference_lines` lines: DEFAULT_KERNEL from
    12 lines up, else max(3, lines // 2 - 1) (10 lines: 4, 8: 3, 7: 3). A 6 x 6 kernel on fewer
    than 12 lines leaves too few patches along phase encoding for its 36 C unknowns: SENSE
    (lam 0.01) on brain16 R8 (8 lines) 19.6 / 21.0 dB (equispaced / random) with 6, 22.6 / 24.3
    with 3; brain16_folded R5 (10 lines, two maps) 19.0 -> 28.5 dB with 4, R6 (7 lines) 15.4 ->
    25.9 with 3; at 12 lines (brain16 R5-R6) 4-6 are within 0.2 dB. The sense chain's rule;
    the PISF contracts keep the 6 x 6 kernel they were trained with (models/CONTRACT.md)."""
    if reference_lines >= 12:
        return DEFAULT_KERNEL
    return max(3, int(reference_lines) // 2 - 1)


def sense_calibration_options(reference_lines: int) -> dict:
    """`espirit_maps` options of the sense chain's calibration (and of its use as the PISF
    fallback) for a reference block of `reference_lines` lines: `calibration_kernel`'s kernel
    and two maps where the second carries signal (maps="auto")."""
    return {"maps": "auto", "kernel": calibration_kernel(reference_lines)}


def sensitivities(calibration_kspace: np.ndarray, reference_lines: np.ndarray,
                  shape: tuple[int, int] | None = None, **options) -> np.ndarray:
    """ESPIRiT maps [C, ny, nx] from calibration k-space [C, ny, nx] whose `reference_lines`
    [ny] hold reference data (the longest contiguous run is used)."""
    run = reference_run(reference_lines)
    if run.sum() < MIN_CALIBRATION_REFERENCE_LINES:
        raise ValueError(f"{int(run.sum())} contiguous reference lines; calibration needs at least "
                         f"{MIN_CALIBRATION_REFERENCE_LINES}")
    block = np.asarray(calibration_kspace)[:, run, :]
    maps, _ = espirit_maps(block, shape or calibration_kspace.shape[1:], **options)
    return maps


def compressed_maps(block: np.ndarray, shape: tuple[int, int], virtual_coils: int = 16,
                    **options) -> tuple[np.ndarray, np.ndarray]:
    """(compression matrix P [V, C], ESPIRiT maps [V, ny, nx] of the virtual coils) from the
    reference block [C, L, nx]: SVD compression to V = min(C, virtual_coils) coils on the block,
    then `espirit_maps` of the compressed block. The calibration step of the SENSE chain and of
    contract 2 (models/CONTRACT.md steps 2-3): data compressed with P match these maps."""
    matrix, maps, _ = compressed_calibration(block, shape, virtual_coils, **options)
    return matrix, maps


def compressed_calibration(block: np.ndarray, shape: tuple[int, int], virtual_coils: int = 16,
                           **options) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`compressed_maps` and the eigenvalue maps beside them (`espirit_maps`): what the SENSE
    images crop by (`espirit_crop_level`) once the slice's R is known."""
    from .coils import coil_compression_matrix, compress

    block = np.asarray(block, dtype=np.complex64)
    matrix = coil_compression_matrix(block, min(block.shape[0], int(virtual_coils)))
    maps, eigenvalues = espirit_maps(compress(block, matrix), shape, **options)
    return matrix, maps, eigenvalues
