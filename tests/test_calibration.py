"""Scan-specific calibration (ESPIRiT) and the row-separable SENSE floor (numpy runtime cores)."""
from __future__ import annotations

import numpy as np
import pytest

from gadgets.numerics.calibration import (SECOND_MAP_SHARE, calibration_kernel, espirit_maps, second_map_signal,
                                          sensitivities)
from gadgets.numerics.fft import fftc, ifftc
from gadgets.numerics.sense import sense_l1_wavelet, sense_tikhonov
from gadgets.numerics.sense_rows import RowSenseMaps


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


# ----------------------------------------------------------------------------- two maps (soft SENSE)
def folded_scan(rows: int = 64, full_rows: int = 84, columns: int = 64, coils: int = 8):
    """An object spanning ~82 of `full_rows` rows acquired with a `rows`-line field of view
    along phase encoding: the coil images wrap with period `rows` (the object folds).
    Returns (k-space [C, rows, columns], RSS of the folded coil images)."""
    y, x = np.mgrid[-1:1:full_rows * 1j, -1:1:columns * 1j]
    image = ((x / 0.8) ** 2 + (y / 0.97) ** 2 < 1).astype(float)
    image += 0.6 * (((x - 0.2) / 0.25) ** 2 + (y / 0.4) ** 2 < 1) - 0.4 * ((x + 0.3) ** 2 + (y - 0.6) ** 2 < 0.03)
    image = image * np.exp(1j * (0.8 * x + 0.5 * y * y))
    angles = 2 * np.pi * (np.arange(coils) + 0.5) / coils
    sens = np.stack([np.exp(-((x - 1.3 * np.cos(a)) ** 2 + (y - 1.3 * np.sin(a)) ** 2) / 1.2)
                     * np.exp(1j * (a + 0.7 * x * np.sin(a))) for a in angles])
    coil_images = sens * image[None]
    folded = np.zeros((coils, rows, columns), dtype=complex)
    np.add.at(folded, (slice(None), (np.arange(full_rows) - full_rows // 2 + rows // 2) % rows), coil_images)
    return fftc(folded, axes=(1, 2)).astype(np.complex64), np.sqrt(np.sum(np.abs(folded) ** 2, axis=0))


def relative_error(estimate: np.ndarray, reference: np.ndarray) -> float:
    """||a |estimate| - reference|| / ||reference|| with the least-squares scale a."""
    estimate = np.abs(estimate)
    scale = np.vdot(estimate, reference).real / np.vdot(estimate, estimate).real
    return float(np.linalg.norm(scale * estimate - reference) / np.linalg.norm(reference))


def undersampled(kspace: np.ndarray, acceleration: int, centre: int = 24):
    ny = kspace.shape[1]
    lines = centre_lines(ny, centre)
    mask = np.zeros(ny, np.float32)
    mask[::acceleration] = 1
    mask[lines] = 1
    return kspace * mask[None, :, None], mask, lines


def test_second_map_carries_signal_only_where_the_object_folds():
    folded, _ = folded_scan()
    fitting, image, _ = synthetic_scan()
    for kspace, expect_two in ((folded, True), (fitting, False)):
        block = kspace[:, centre_lines(64, 24)]
        maps, eigenvalues = espirit_maps(block, (64, 64), maps=2)
        assert maps.shape == (2,) + kspace.shape and eigenvalues.shape == (2, 64, 64)
        share = second_map_signal(eigenvalues)
        assert (share >= SECOND_MAP_SHARE) == expect_two, share
        auto, auto_eigenvalues = espirit_maps(block, (64, 64), maps="auto")
        assert auto.ndim == (4 if expect_two else 3)
        if not expect_two:                        # one map: exactly the maps=1 result
            one, one_eigenvalues = espirit_maps(block, (64, 64))
            assert np.array_equal(auto, one) and np.array_equal(auto_eigenvalues, one_eigenvalues)
            # the second map is weighted out inside the object (it keeps a little signal at the
            # FOV's edge rows, where the non-periodic simulated coils wrap)
            assert np.abs(maps[1][:, np.abs(image) > 0.1]).max() == 0


@pytest.mark.parametrize("solver", ["l2", "l1"])
def test_two_map_sense_unfolds_a_folded_object(solver):
    """R 3 with 24 embedded reference lines on an object 1.3x the FOV: one map cannot represent
    the overlap (the coil images there mix two sensitivities); two maps can."""
    kspace, reference = folded_scan()
    measured, mask, lines = undersampled(kspace, 3)
    one, _ = espirit_maps(kspace[:, lines], (64, 64))
    two, _ = espirit_maps(kspace[:, lines], (64, 64), maps=2)
    hybrid = ifftc(measured, axes=(2,))

    def recon(maps):
        if solver == "l1":
            return sense_l1_wavelet(hybrid, mask, maps, lam=1e-4, iterations=80)
        return sense_tikhonov(hybrid, mask, maps, lam=1e-4, iterations=60)

    error_one, error_two = relative_error(recon(one), reference), relative_error(recon(two), reference)
    assert error_two < 0.05
    assert error_one > 3 * error_two


def test_two_map_sense_equals_one_map_where_the_object_fits():
    kspace, image, _ = synthetic_scan()
    measured, mask, lines = undersampled(kspace, 3)
    one, _ = espirit_maps(kspace[:, lines], (64, 64))
    two, _ = espirit_maps(kspace[:, lines], (64, 64), maps=2)
    hybrid = ifftc(measured, axes=(2,))
    x_one = sense_tikhonov(hybrid, mask, one, lam=1e-3)
    x_two = sense_tikhonov(hybrid, mask, two, lam=1e-3)
    inside = np.abs(image) > 0.1
    # forced two maps: 0.5 % apart (0.37 vs 0.66 % error), the second map's few edge rows (see
    # above) alias into the object at R 3; maps="auto" keeps one map here (test above)
    assert np.linalg.norm((np.abs(x_two) - np.abs(x_one))[inside]) < 1e-2 * np.linalg.norm(x_one[inside])
    reference = np.sqrt(np.sum(np.abs(ifftc(kspace, axes=(1, 2))) ** 2, axis=0))
    assert relative_error(x_two[inside], reference[inside]) < relative_error(x_one[inside], reference[inside]) + 5e-3


def test_several_maps_operator_is_the_soft_sense_normal_operator():
    """RowSenseMaps against the explicit A x = M F sum_m S_m x_m: adjoint and normal operator."""
    rng = np.random.default_rng(4)
    maps_count, coils, ny, nx = 2, 3, 16, 5
    maps = (rng.standard_normal((maps_count, coils, ny, nx)) + 1j * rng.standard_normal((maps_count, coils, ny, nx))
            ).astype(np.complex64)
    mask = (rng.random(ny) < 0.5).astype(np.float32)
    x = (rng.standard_normal((maps_count, ny, nx)) + 1j * rng.standard_normal((maps_count, ny, nx))).astype(np.complex64)
    y = (rng.standard_normal((coils, ny, nx)) + 1j * rng.standard_normal((coils, ny, nx))).astype(np.complex64)

    def forward(x):                          # hybrid space (ky, x): FFT along ky only
        return fftc(np.sum(maps * x[:, None], axis=0), axes=(1,)) * mask[None, :, None]

    def adjoint(y):
        return np.sum(maps.conj() * ifftc(y * mask[None, :, None], axes=(1,))[None], axis=1)

    operator = RowSenseMaps.from_slice_maps(maps, mask)
    rows = np.ascontiguousarray(x.transpose(2, 0, 1))
    normal = operator.normal(rows).transpose(1, 2, 0)
    assert np.allclose(normal, adjoint(forward(x)), atol=1e-4)
    assert np.allclose(operator.adjoint(y.transpose(2, 0, 1)).transpose(1, 2, 0), adjoint(y), atol=1e-4)


def test_calibration_kernel_shrinks_with_few_reference_lines():
    assert [calibration_kernel(n) for n in (6, 7, 8, 10, 11, 12, 24)] == [3, 3, 3, 4, 4, 6, 6]


def test_pisf_guard_sends_a_folded_slice_to_the_two_map_sense_fallback(monkeypatch):
    """The PISF model takes one map: its stage calibrates with maps="auto" and a slice whose
    second map carries signal goes to the fallback, whose SENSE uses both maps."""
    from pathlib import Path

    from gadgets import pisf as pisf_gadget
    from gadgets.pisf import FOLDED_REASON
    from tests.test_classical import slice_item
    from tests.test_pisf_guard import RANGES, Context, StubModel, run

    model = StubModel(RANGES)
    monkeypatch.setattr(pisf_gadget, "shared_reconstructor", lambda *a, **k: model)
    monkeypatch.setattr(pisf_gadget, "resolve_model", lambda name: Path("stub.onnx"))
    recon = pisf_gadget.PisfRecon(Context(), model="stub.onnx")
    kspace, reference = folded_scan()
    _, mask, lines = undersampled(kspace, 4, centre=16)             # R 2.5, inside the trained 2-9
    texts, images = run(recon, slice_item(kspace, mask, lines))
    assert model.calls == 0 and len(texts) == 1 and FOLDED_REASON in texts[0]
    meta = images[0].meta
    assert meta["PISF_Guard"] == f"fallback: {FOLDED_REASON}"
    assert meta["PISF_Method"] == "SENSE" and meta["PISF_EspiritMaps"] == "2"
    # two maps at the chains' default lambda: 5.9 % error; one map's SENSE: 16 %
    assert relative_error(images[0].data[0], reference) < 0.08
    # the same stage on an object that fits runs the model
    fitting, _, _ = synthetic_scan()
    texts, images = run(recon, slice_item(fitting, mask, lines))
    assert texts == [] and model.calls == 1 and images[0].meta["PISF_Method"] == "PISF"


def test_folded_dataset_wraps_the_parents_coil_images():
    """tools.evaluation.datasets.folded_dataset: a smaller phase-encoding FOV at the same
    resolution is the parent's coil images summed over shifts by the new row count."""
    from tools.evaluation.datasets import Dataset, dataset_cases, folded_dataset, normalised, reference_from_kspace

    kspace, _, _ = synthetic_scan(64, coils=4)
    parent_kspace = normalised(kspace)
    parent = Dataset("synthetic", parent_kspace, reference_from_kspace(parent_kspace), "synthetic, 4 coils")
    folded = folded_dataset(parent, 48, max_acceleration=6)
    assert folded.name == "synthetic_folded" and folded.shape == (4, 48, 64)
    coil_images = ifftc(parent.kspace.astype(np.complex128), axes=(1, 2))
    wrapped = coil_images[:, 8:56].copy()                  # new row r holds parent rows 8 + r, r - 40, r + 56
    wrapped[:, :8] += coil_images[:, 56:]
    wrapped[:, 40:] += coil_images[:, :8]
    got = ifftc(folded.kspace.astype(np.complex128), axes=(1, 2))
    scale = np.vdot(got, wrapped).real / np.vdot(got, got).real
    assert np.abs(scale * got - wrapped).max() < 1e-5 * np.abs(wrapped).max()
    assert folded.reference.max() == pytest.approx(1.0)
    assert max(case.R for case in dataset_cases(folded)) == 6


def test_eigenvalue_crop_applies_from_r4_with_one_map_and_not_at_r2_or_with_two_maps():
    """The SENSE core crops one map at ESPIRIT_CROP_LEVEL from R 4 up (the image is zero where the
    eigenvalue is at or below it), not at R 2, not with two maps (a folded object), never when off."""
    from gadgets.classical import ClassicalOptions, SliceData, reconstruct_classical
    from gadgets.numerics.calibration import ESPIRIT_CROP_LEVEL, compressed_calibration
    from gadgets.numerics.reference import centre_region

    def sense(kspace, mask, lines, crop):
        data = SliceData(kspace * mask[None, :, None], mask, kspace * lines[None, :, None], lines)
        return reconstruct_classical(data, "sense", ClassicalOptions(espirit_crop=crop))

    fitting, _, _ = synthetic_scan(coils=12)      # above FEW_COILS_CROP_MAX_COILS: not the few-coil crop
    folded, _ = folded_scan(coils=12)
    lines = centre_lines(64, 24)
    _, _, eigenvalues = compressed_calibration(centre_region(fitting[:, lines], 32, 64), (64, 64), 16)
    outside = eigenvalues <= ESPIRIT_CROP_LEVEL
    assert 0 < outside.mean() < 0.5                     # the crop has pixels to zero, the object keeps most
    for kspace, acceleration, expected in ((fitting, 4, "0.8 (one map, R 4.00)"), (fitting, 2, "none (R 2.00 below 4)"),
                                           (folded, 4, "none (two maps)")):
        mask = np.zeros(64, np.float32)
        mask[::acceleration] = 1                          # a separate reference: R is the image lines' alone
        auto, off = sense(kspace, mask, lines, "auto"), sense(kspace, mask, lines, "off")
        assert auto.meta["PISF_EspiritCrop"] == expected and off.meta["PISF_EspiritCrop"] == "none (off)"
        if expected.startswith("none"):
            assert np.array_equal(auto.magnitude, off.magnitude)
        else:
            assert auto.magnitude[outside].max() == 0 and off.magnitude[outside].min() > 0
            assert np.abs(auto.magnitude[~outside] - off.magnitude[~outside]).max() > 0


def test_a_cached_calibration_gives_each_image_the_crop_of_its_own_r():
    """One separate reference, calibrated once (reference_prep's cache), serves images at R 4, 2, 4:
    each is the image it would be calibrated alone (cropped, uncropped, cropped), so the crop of
    the first never reaches the cached maps the second takes."""
    import logging

    from gadgets.classical import SenseRecon
    from gadgets.items import ReconImage
    from gadgets.reference_prep import ReferencePrep
    from tests.test_classical import _Context, slice_item

    class Context(_Context):
        log = logging.getLogger("test")

        def is_cancelled(self):
            return False

        def check_cancelled(self, what=""):
            pass

    kspace, _, _ = synthetic_scan()
    lines = centre_lines(64, 24)
    items = []
    for acceleration in (4, 2, 4):
        mask = np.zeros(64, np.float32)
        mask[::acceleration] = 1
        items.append(slice_item(kspace, mask, lines, separate=True))
    context = Context("separate")
    prep, recon = ReferencePrep(context, background=False), SenseRecon(context)
    images = [o for o in recon(prep(items)) if isinstance(o, ReconImage)]
    assert [i.meta["PISF_CalibrationReused"] for i in images] == ["false", "true", "true"]
    assert [i.meta["PISF_EspiritCrop"].split(" ")[0] for i in images] == ["0.95", "none", "0.95"]   # 8 coils, separate: few-coil crop
    for item, image in zip(items, images):
        alone = [o for o in SenseRecon(Context("separate"))([item]) if isinstance(o, ReconImage)][0]
        assert "PISF_CalibrationReused" not in alone.meta            # calibrated inline, for itself
        assert alone.meta["PISF_EspiritCrop"] == image.meta["PISF_EspiritCrop"]
        assert np.array_equal(alone.data, image.data)
    assert not np.array_equal(images[0].data, images[1].data)
