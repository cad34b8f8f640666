"""Automatic Tikhonov lambda per scan (gadgets/numerics/regularisation.py): the curves are exact,
the scale is the solver's, and the chosen lambda beats badly wrong fixed ones on a simulated scan."""
from __future__ import annotations

import numpy as np
import pytest

from gadgets.numerics.fft import fftc, ifftc
from gadgets.numerics.regularisation import (LAMBDA_GRID, choose_lambda, corner_index, row_spectra,
                                             shoulder_index, tikhonov_curves)
from gadgets.numerics.sense import sense_tikhonov
from tests.test_calibration import centre_lines, synthetic_scan


def unit_maps(sens: np.ndarray) -> np.ndarray:
    return (sens / np.sqrt(np.sum(np.abs(sens) ** 2, axis=0, keepdims=True))).astype(np.complex64)


def noisy_scan(n=64, coils=6, step=3, reference=12, noise=0.02, seed=1):
    """(hybrid data, mask, unit-RSS true maps, truth image scaled as the maps see it)."""
    kspace, image, sens = synthetic_scan(n, coils=coils, seed=seed)
    rss = np.sqrt(np.sum(np.abs(sens) ** 2, axis=0))
    rng = np.random.default_rng(seed)
    kspace = kspace + noise * np.abs(kspace).max() / np.sqrt(n) * (
        rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape)).astype(np.complex64)
    mask = np.zeros(n, np.float32)
    mask[::step] = 1
    mask[centre_lines(n, reference)] = 1
    hybrid = ifftc(kspace * mask[None, :, None], axes=(-1,)).astype(np.complex64)
    return hybrid, mask, unit_maps(sens), image * rss


def image_error(image, truth):
    magnitude, reference = np.abs(image), np.abs(truth)
    magnitude = magnitude * np.vdot(magnitude, reference).real / np.vdot(magnitude, magnitude).real
    return float(np.linalg.norm(magnitude - reference) / np.linalg.norm(reference))


def test_curves_match_the_solver_residual_and_fit():
    hybrid, mask, maps, _ = noisy_scan(n=32, coils=4, step=2, reference=8)
    spectra = row_spectra(hybrid, mask, maps, rows=None)               # every row: exact
    grid = (1e-3, 1e-2, 1e-1)
    residual, fit, _ = tikhonov_curves(spectra, grid)
    sampled = mask[None, :, None] > 0.5
    for i, lam in enumerate(grid):
        image = sense_tikhonov(hybrid, mask, maps, lam=lam, iterations=300, tolerance=1e-12)
        predicted = fftc(maps * image[None], axes=(1,)) * sampled
        assert np.sum(np.abs(predicted - hybrid) ** 2) == pytest.approx(residual[i], rel=2e-3)
        assert np.sum(np.abs(predicted) ** 2) == pytest.approx(fit[i], rel=2e-3)


def test_lambda_scale_is_the_solvers_for_one_and_two_maps():
    hybrid, mask, maps, _ = noisy_scan(n=32, coils=4)
    one = row_spectra(hybrid, mask, maps, rows=8)
    assert one.diagonal_max == pytest.approx(float(np.max(np.sum(np.abs(maps) ** 2, 0))) * mask.mean(), rel=1e-5)
    two_maps = np.stack([maps, 0.3 * maps[:, ::-1]])                  # [M, C, ny, nx]
    two = row_spectra(hybrid, mask, two_maps, rows=8)
    assert two.eigenvalues.shape[1] == 2 * 32                          # both maps' unknowns per row
    assert two.diagonal_max == pytest.approx(
        float(np.max(np.sum(np.abs(two_maps) ** 2, axis=(0, 1)))) * mask.mean(), rel=1e-5)


def test_automatic_lambda_beats_badly_wrong_fixed_ones_on_a_noisy_scan():
    hybrid, mask, maps, truth = noisy_scan(n=64, coils=6, step=4, noise=0.003)
    choice = choose_lambda(hybrid, mask, maps)
    errors = {lam: image_error(sense_tikhonov(hybrid, mask, maps, lam=lam), truth) for lam in (1e-4, 1.0)}
    chosen = image_error(sense_tikhonov(hybrid, mask, maps, lam=choice.lam), truth)
    best = min(image_error(sense_tikhonov(hybrid, mask, maps, lam=lam), truth) for lam in LAMBDA_GRID[::4])
    assert choice.rule in ("corner", "gcv", "shoulder") and LAMBDA_GRID[0] <= choice.lam <= LAMBDA_GRID[-1]
    assert chosen < 0.8 * min(errors.values()), (choice.lam, chosen, errors)
    assert chosen < 1.25 * best, (choice.lam, chosen, best)


def test_corner_needs_an_interior_maximum():
    assert corner_index(np.array([0.0, -1, 0.5, 2.0, 0.7, 0.1, -0.2, 0.0])) == 3
    assert corner_index(np.array([5.0, 4, 3, 2, 1, 0.5, 0.2, 0.1])) is None        # bends most at the start
    assert corner_index(np.array([-1.0, -1, -1, -0.5, -0.8, -1, -1, -1])) is None  # no positive bend
    hidden = np.array([9.0, 8, 7, 1, 2, 1, 0.5, 0.8, 0.6, 0.1, 0.0])          # falls, two bumps after
    assert corner_index(hidden) is None and shoulder_index(hidden) == 7           # the later bump


def test_a_bad_grid_is_one_clear_error():
    hybrid, mask, maps, _ = noisy_scan(n=32, coils=4)
    with pytest.raises(ValueError, match="lambda grid must be increasing"):
        choose_lambda(hybrid, mask, maps, grid=(1e-2, 1e-3, 1e-1, 1, 2, 3, 4, 5))
