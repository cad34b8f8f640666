"""Scan-specific calibration: coil sensitivities from the reference lines a scan carries.

Numpy only, no stream knowledge: the PISF recon, the SENSE floor and the classical chains share
it. The reference lines are a contiguous block of fully sampled ky lines around the k-space
centre (embedded ACS lines, a separate reference scan, or interleaved calibration lines: the
caller passes the calibration k-space and which ky lines hold reference data).

ESPIRiT (Uecker et al., MRM 2014), first map only, computed in the fast way:
1. calibration matrix of all k x k patches of the reference block (all coils), keep the
   right singular vectors above `threshold` x the largest singular value (the signal subspace);
2. the image-domain operator of that subspace is, per pixel, a C x C matrix G(r) whose entries
   are Fourier transforms of kernel cross-correlations (support (2k-1)^2): C^2 small FFTs
   instead of one per kernel;
3. the sensitivity at r is G(r)'s top eigenvector (eigenvalue ~1 inside the object), found by
   batched power iteration, its phase referenced to the first (strongest virtual) coil.
No eigenvalue crop by default: on in-vivo brain data a crop at 0.9 cost 10 dB in SENSE (it zeroes
maps inside the head where the eigenvalue dips), while the regularised solvers keep the
background small anyway.
"""
from __future__ import annotations

import numpy as np

from .reference import MIN_CALIBRATION_REFERENCE_LINES, reference_run

DEFAULT_KERNEL = 6           # MIN_CALIBRATION_REFERENCE_LINES (numerics/reference.py) follows it
DEFAULT_THRESHOLD = 0.02
NOISE_FACTOR = 2.0


def calibration_matrix(reference: np.ndarray, kernel: int) -> np.ndarray:
    """All kernel x kernel patches of reference [C, ly, lx] as rows: [patches, C * k * k]."""
    coils = reference.shape[0]
    windows = np.lib.stride_tricks.sliding_window_view(reference, (kernel, kernel), axis=(1, 2))
    return windows.transpose(1, 2, 0, 3, 4).reshape(-1, coils * kernel * kernel)


def signal_kernels(reference: np.ndarray, kernel: int, threshold: float,
                   noise_factor: float = NOISE_FACTOR) -> np.ndarray:
    """Signal-subspace kernels [C, k, k, n] of the reference block [C, ly, lx]: singular vectors
    above `threshold` x the largest singular value and above `noise_factor` x the median one.
    The median lies in the noise tail of the spectrum (the signal subspace is a small part of
    the C k^2 dimensions): on noisy references (e.g. ismrmrd-tools' Shepp-Logan at -n 0.05,
    whose noise floor is ~0.03 of the largest) the relative threshold alone keeps nearly every
    vector and the maps become arbitrary; on the real datasets here it changes nothing."""
    coils = reference.shape[0]
    rows = calibration_matrix(reference.astype(np.complex128), kernel)
    gram = rows.conj().T @ rows
    values, vectors = np.linalg.eigh(gram)                        # ascending
    values, vectors = values[::-1], vectors[:, ::-1]
    singular = np.sqrt(np.maximum(values, 0.0))
    cut = max(threshold * singular[0], noise_factor * float(np.median(singular)))
    keep = max(1, int(np.sum(singular >= cut)))
    return vectors[:, :keep].reshape(coils, kernel, kernel, keep)


def centred_dft_rows(shifts: np.ndarray, n: int) -> np.ndarray:
    """[n, len(shifts)]: the centred inverse DFT (unnormalised) of a signal that is nonzero only
    at k-space offsets `shifts` from the centre, evaluated at every image position."""
    position = np.arange(n) - n // 2
    return np.exp(2j * np.pi * np.outer(position, shifts) / n).astype(np.complex64)


def image_space_operator(kernels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Per-pixel C x C matrices G, laid out [C, C, ny, nx], of the kernels' image-domain
    projection: G(r)[c, d] = sum over kernels j of conj(K_jc(r)) K_jd(r) / k^2, with K_jc(r) the
    image-domain kernel. Each entry is the Fourier transform of a kernel cross-correlation of
    support (2k-1)^2, evaluated by a separable DFT (two small matrix products per entry)."""
    coils, k, _, n_kernels = kernels.shape
    ny, nx = shape
    grid = 2 * k                                                  # >= 2k - 1: no wrap-around
    padded = np.zeros((coils, grid, grid, n_kernels), dtype=np.complex128)
    padded[:, :k, :k] = kernels
    spectra = np.fft.fft2(padded, axes=(1, 2)).reshape(coils, grid * grid, n_kernels)
    products = np.matmul(spectra.transpose(1, 0, 2), spectra.conj().transpose(1, 2, 0))   # [g^2, C, C]
    correlation = np.fft.ifft2(products.reshape(grid, grid, coils, coils), axes=(0, 1))
    shifts = np.arange(-(k - 1), k)
    small = correlation[shifts[:, None] % grid, shifts[None, :] % grid].astype(np.complex64)  # [2k-1, 2k-1, C, C]
    along_y = centred_dft_rows(-shifts, ny)                       # [ny, 2k-1]
    along_x = centred_dft_rows(-shifts, nx)                       # [nx, 2k-1]
    operator = np.einsum("ya,abcd,xb->cdyx", along_y, small, along_x, optimize=True)
    return np.ascontiguousarray(operator.conj()) / np.float32(k * k)


def low_resolution_start(reference: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Unit-norm coil vectors [C, ny, nx] of the reference block's zero-padded low-resolution coil
    images (constant where they vanish): the power iteration's start."""
    from .fft import ifftc

    coils, ly, lx = reference.shape
    ny, nx = shape
    grid = np.zeros((coils, ny, nx), dtype=np.complex64)
    y0, x0 = max(0, ny // 2 - ly // 2), max(0, nx // 2 - lx // 2)
    grid[:, y0:y0 + min(ly, ny), x0:x0 + min(lx, nx)] = reference[:, :ny, :nx]
    images = ifftc(grid, axes=(1, 2))
    norm = np.sqrt(np.sum(np.abs(images) ** 2, axis=0))
    start = np.where(norm > 1e-6 * max(float(norm.max()), 1e-30), images / np.maximum(norm, 1e-30),
                     1 / np.sqrt(coils))
    return start.astype(np.complex64)


def espirit_maps(reference: np.ndarray, shape: tuple[int, int], kernel: int = DEFAULT_KERNEL,
                 threshold: float = DEFAULT_THRESHOLD, iterations: int = 12,
                 crop: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """ESPIRiT sensitivities [C, ny, nx] (complex64, unit root-sum-of-squares where the
    eigenvalue is > 0) and eigenvalues [ny, nx] from the reference block [C, ly, lx] (centred in
    k-space, any lx <= nx; the full readout width gives the sharpest maps).

    The power iteration starts from the low-resolution coil images of the reference block (per
    pixel close to the sensitivities, i.e. to the first eigenvector): from a constant start, 12
    iterations had not converged on the 14-channel Siemens slice (low-resolution projection
    residual 0.128, a streak through the SENSE and PISF v2 images; 0.023 after 40 iterations),
    from this start 6 reach 0.022; SENSE on the evaluation datasets moved by <= 0.1 dB."""
    reference = np.asarray(reference)
    coils, ly, lx = reference.shape
    kernel = min(kernel, ly, lx)
    operator = image_space_operator(signal_kernels(reference, kernel, threshold), shape)   # [C, C, ny, nx]
    vector = low_resolution_start(reference, tuple(shape))
    for _ in range(iterations):
        vector = np.einsum("cdyx,dyx->cyx", operator, vector)
        vector /= np.maximum(np.sqrt(np.sum(np.abs(vector) ** 2, axis=0)), 1e-30)
    eigenvalue = np.real(np.sum(vector.conj() * np.einsum("cdyx,dyx->cyx", operator, vector), axis=0))
    first = vector[0]
    maps = vector * (first.conj() / np.maximum(np.abs(first), 1e-30))
    if crop > 0:
        maps = maps * (eigenvalue > crop)
    return maps.astype(np.complex64), eigenvalue.astype(np.float32)


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
    from .coils import coil_compression_matrix, compress

    block = np.asarray(block, dtype=np.complex64)
    matrix = coil_compression_matrix(block, min(block.shape[0], int(virtual_coils)))
    maps, _ = espirit_maps(compress(block, matrix), shape, **options)
    return matrix, maps
