"""The fast ESPIRiT paths (gadgets/numerics/calibration.py) give what the plain computation gives:
the readout-correlation Gram, the leading-subspace eigenvectors, the coarse-grid operator and
the interpolated maps. Correctness only; timings are in the commit and the calibration docstring."""
from __future__ import annotations

import numpy as np
import pytest

from gadgets.numerics import calibration as cal
from gadgets.numerics.coils import coil_compression_matrix, compress
from tests.test_calibration import centre_lines, synthetic_scan


@pytest.mark.parametrize("coils, lines, columns, kernel", [(8, 24, 64, 6), (3, 7, 11, 6), (2, 6, 6, 6), (5, 10, 30, 3)])
def test_calibration_gram_equals_the_patch_matrix_product(coils, lines, columns, kernel):
    rng = np.random.default_rng(coils + columns)
    block = (rng.standard_normal((coils, lines, columns)) + 1j * rng.standard_normal((coils, lines, columns)))
    rows = cal.calibration_matrix(block, kernel)
    expected = rows.conj().T @ rows
    gram = cal.calibration_gram(block.astype(np.complex64), kernel)
    assert gram.dtype == np.complex64
    assert np.abs(gram - expected).max() < 2e-6 * np.abs(expected).max()


def compressed_block(n: int, coils: int, lines: int, noise: float = 0.0):
    kspace, image, _ = synthetic_scan(n, coils)
    if noise:
        rng = np.random.default_rng(3)
        kspace = kspace + noise * np.abs(kspace).max() * (rng.standard_normal(kspace.shape)
                                                          + 1j * rng.standard_normal(kspace.shape))
    block = kspace[:, centre_lines(n, lines)].astype(np.complex64)
    return compress(block, coil_compression_matrix(block, coils)), image


def full_eigh_kernels(block: np.ndarray, kernel: int = 6, threshold: float = 0.02) -> np.ndarray:
    gram = cal.calibration_gram(block, kernel).astype(np.complex128)
    values, vectors = np.linalg.eigh(gram)
    singular = np.sqrt(np.maximum(values[::-1], 0))
    keep = int(np.sum(singular >= max(threshold * singular[0], cal.NOISE_FACTOR * np.median(singular))))
    return vectors[:, ::-1][:, :keep]


def test_leading_subspace_keeps_the_full_eigh_subspace():
    block, _ = compressed_block(96, 16, 24)
    expected = full_eigh_kernels(block)
    vectors = cal.leading_subspace(cal.calibration_gram(block, 6).astype(np.complex128), 0.02, cal.NOISE_FACTOR)
    assert vectors is not None and vectors.shape == expected.shape
    cosines = np.linalg.svd(expected.conj().T @ vectors, compute_uv=False)
    assert np.sqrt(1 - cosines.min() ** 2) < 1e-3                 # largest principal angle
    kernels = cal.signal_kernels(block, 6, 0.02)
    assert kernels.shape[-1] == expected.shape[1]


def test_noisy_reference_falls_back_to_the_full_eigh_median_rule():
    """Noise at 5 % of the k-space peak: the median singular value sets the cut, which the block
    iteration cannot prove, so the full decomposition keeps the same kernels as the plain rule."""
    block, _ = compressed_block(96, 16, 24, noise=0.05)
    gram = cal.calibration_gram(block, 6).astype(np.complex128)
    assert cal.leading_subspace(gram, 0.02, cal.NOISE_FACTOR) is None
    expected = full_eigh_kernels(block)
    kernels = cal.signal_kernels(block, 6, 0.02).reshape(expected.shape[0], -1)
    assert kernels.shape == expected.shape
    cosines = np.linalg.svd(expected.conj().T @ kernels, compute_uv=False)
    assert cosines.min() > 1 - 1e-8


def test_coarse_operator_is_the_full_operator_at_every_fth_pixel():
    block, _ = compressed_block(96, 8, 24)
    kernels = cal.signal_kernels(block, 6, 0.02)
    full = cal.image_space_operator(kernels, (96, 128))
    coarse = cal.image_space_operator(kernels, (96, 128), (48, 32))
    np.testing.assert_allclose(coarse, full[::2, ::4], atol=2e-6 * np.abs(full).max())
    assert np.allclose(full, full.conj().swapaxes(-1, -2), atol=1e-5 * np.abs(full).max())   # Hermitian per pixel


def exact_maps(block: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Per-pixel top eigenvectors of the full-grid operator (complex128 eigh), referenced to coil 0."""
    operator = cal.image_space_operator(cal.signal_kernels(block, 6, 0.02), shape).astype(np.complex128)
    _, vectors = np.linalg.eigh(operator)
    top = np.moveaxis(vectors[..., -1], -1, 0)
    return top * (top[0].conj() / np.abs(top[0]))


@pytest.mark.parametrize("n, coils, lines", [(128, 8, 24), (144, 16, 32)])
def test_coarse_grid_maps_agree_with_the_exact_maps(n, coils, lines):
    block, image = compressed_block(n, coils, lines)
    assert cal.coarse_shape((n, n), cal.DEFAULT_GRID) == (n // 2, n // 2)   # the coarse path runs
    maps, eigenvalue = cal.espirit_maps(block, (n, n))
    exact = exact_maps(block, (n, n))
    inside = np.abs(image) > 0.1
    error = np.abs(maps - exact)[:, inside]
    assert error.mean() < 1e-4 and error.max() < 5e-2               # max: few pixels at the FOV edge
    gauge = 1 - np.abs(np.sum(maps.conj() * exact, axis=0))[inside]  # phase-free, per pixel
    assert gauge.max() < 5e-3
    assert np.median(eigenvalue[inside]) > 0.95
    # a grid too coarse for the maps fails the same bound
    too_coarse, _ = cal.espirit_maps(block, (n, n), grid=12)
    assert np.abs(too_coarse - exact)[:, inside].mean() > 1e-4


def test_maps_have_unit_rss_and_coil_0_real_positive():
    block, image = compressed_block(128, 8, 24)
    for grid in (cal.DEFAULT_GRID, None, 20):                       # integer factor, full, fractional
        maps, _ = cal.espirit_maps(block, (128, 100), grid=grid)
        assert maps.shape == (8, 128, 100) and maps.dtype == np.complex64
        np.testing.assert_allclose(np.sqrt(np.sum(np.abs(maps) ** 2, axis=0)), 1.0, atol=1e-5)
        assert np.all(maps[0].imag == 0) and np.all(maps[0].real >= 0)


def test_coarse_shape_takes_every_fth_pixel_with_at_least_grid_points():
    assert cal.coarse_shape((256, 384), 64) == (64, 64)
    assert cal.coarse_shape((96, 144), 64) == (96, 72)              # n < 2 grid: every pixel
    assert cal.coarse_shape((400, 200), 64) == (80, 100)            # largest factor of n up to n // grid
    assert cal.coarse_shape((509, 256), 64) == (73, 64)             # prime: fractional positions
    assert cal.coarse_shape((256, 256), None) == (256, 256)


def test_periodic_cubic_reproduces_smooth_periodic_functions():
    for n, points in ((256, 64), (509, 73)):
        positions = cal.grid_positions(n, points)
        wave = lambda p: np.exp(2j * np.pi * 2 * p / n) + 0.3 * np.cos(2 * np.pi * 3 * p / n)
        interpolated = cal.periodic_cubic(wave(positions)[None].astype(np.complex64), 1, n)[0]
        assert np.abs(interpolated - wave(np.arange(n) - n // 2)).max() < 1e-3
