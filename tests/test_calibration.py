"""Scan-specific calibration (ESPIRiT) and the row-separable SENSE floor (numpy runtime cores)."""
from __future__ import annotations

import numpy as np
import pytest

from gadgets.numerics.calibration import espirit_maps, sensitivities
from gadgets.numerics.fft import fftc, ifftc
from gadgets.numerics.sense import sense_tikhonov


def synthetic_scan(n: int = 64, coils: int = 8, seed: int = 0):
    """Object with edges and smooth phase, smooth complex coil sensitivities around it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    image = ((x / 0.8) ** 2 + (y / 0.9) ** 2 < 1).astype(float)
    image += 0.6 * (((x - 0.2) / 0.25) ** 2 + (y / 0.4) ** 2 < 1) - 0.4 * ((x + 0.3) ** 2 + (y - 0.3) ** 2 < 0.03)
    image = image * np.exp(1j * (0.8 * x + 0.5 * y * y))
    angles = 2 * np.pi * np.arange(coils) / coils + rng.uniform(0, 0.3)
    sens = np.stack([np.exp(-((x - 1.3 * np.cos(a)) ** 2 + (y - 1.3 * np.sin(a)) ** 2) / 1.2)
                     * np.exp(1j * (a + 0.7 * x * np.sin(a))) for a in angles])
    coil_images = sens * image[None]
    return fftc(coil_images, axes=(1, 2)).astype(np.complex64), image, sens


def centre_lines(n: int, count: int) -> np.ndarray:
    lines = np.zeros(n, dtype=bool)
    lines[n // 2 - count // 2:n // 2 - count // 2 + count] = True
    return lines


def test_espirit_maps_span_the_true_sensitivities():
    kspace, image, sens = synthetic_scan()
    lines = centre_lines(64, 24)
    maps, eigenvalue = espirit_maps(kspace[:, lines], (64, 64))
    inside = np.abs(image) > 0.1
    # ESPIRiT maps equal the true sensitivities up to a per-pixel phase and the RSS normalisation:
    # the coil images must lie in the span of the maps (projection residual small).
    coil_images = ifftc(kspace, axes=(1, 2))
    projection = maps * np.sum(maps.conj() * coil_images, axis=0)[None]
    residual = np.linalg.norm((coil_images - projection)[:, inside]) / np.linalg.norm(coil_images[:, inside])
    assert residual < 0.05
    assert np.allclose(np.sum(np.abs(maps) ** 2, axis=0)[inside], 1.0, atol=1e-3)
    assert np.median(eigenvalue[inside]) > 0.95
    # wrong geometry (maps of another coil arrangement) does not pass the same check
    _, _, other = synthetic_scan(seed=5)
    other_maps = np.roll(maps, 1, axis=0)
    wrong = other_maps * np.sum(other_maps.conj() * coil_images, axis=0)[None]
    assert np.linalg.norm((coil_images - wrong)[:, inside]) / np.linalg.norm(coil_images[:, inside]) > 0.3


def test_sensitivities_need_enough_reference_lines():
    kspace, _, _ = synthetic_scan()
    with pytest.raises(ValueError, match="contiguous reference lines"):
        sensitivities(kspace, centre_lines(64, 4))


@pytest.mark.parametrize("separate", [False, True])
def test_sense_floor_unfolds_equispaced_undersampling(separate):
    """R=3 equispaced: SENSE with maps from 24 reference lines recovers the image; the
    reference lines are used as data only when embedded."""
    kspace, image, _ = synthetic_scan()
    lines = centre_lines(64, 24)
    mask = np.zeros(64, np.float32)
    mask[1::3] = 1
    if not separate:
        mask[lines] = 1
    maps = sensitivities(kspace * lines[None, :, None], lines)
    measured = kspace * mask[None, :, None]
    x = sense_tikhonov(ifftc(measured, axes=(2,)), mask, maps, lam=1e-4, iterations=60)
    reference = np.sqrt(np.sum(np.abs(ifftc(kspace, axes=(1, 2))) ** 2, axis=0))
    zero_filled = np.sqrt(np.sum(np.abs(ifftc(measured, axes=(1, 2))) ** 2, axis=0))
    inside = np.abs(image) > 0.1

    def error(estimate):
        scale = np.vdot(estimate[inside], reference[inside]).real / np.vdot(estimate[inside], estimate[inside]).real
        return np.linalg.norm(scale * estimate[inside] - reference[inside]) / np.linalg.norm(reference[inside])

    assert error(np.abs(x)) < 0.03
    assert error(zero_filled) > 3 * error(np.abs(x))
