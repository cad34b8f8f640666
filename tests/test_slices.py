"""Slice preparation shared by the classical and PISF stages (gadgets/slices.py): image lines,
reference lines, ACS lines as data or not, and the 2D problems of a 3D slab."""
from __future__ import annotations

import numpy as np
import pytest

from gadgets import classical, pisf
from gadgets.context import InputError
from gadgets.numerics.fft import ifftc
from gadgets.numerics.reference import FROM_CENTRE_OF_IMAGE_LINES, FROM_REFERENCE_LINES
from gadgets.slices import SliceData, acs_as_data_default, partitions, slice_data
from tests.test_calibration import centre_lines, synthetic_scan
from tests.test_classical import _Context, slice_item


def test_both_stages_take_slice_preparation_from_one_module():
    assert classical.partitions is partitions and pisf.partitions is partitions
    assert classical.SliceData is SliceData and pisf.SliceData is SliceData


@pytest.mark.parametrize("mode, requested, expected", [
    ("embedded", "auto", True), ("separate", "auto", False), ("interleaved", "auto", False),
    ("separate", True, True), ("embedded", False, False)])
def test_acs_lines_are_data_by_default_only_when_embedded(mode, requested, expected):
    assert acs_as_data_default(_Context(mode), requested) is expected


def test_acs_only_lines_become_image_lines_only_as_data():
    kspace, _, _ = synthetic_scan(32, coils=4)
    mask = np.zeros(32, np.float32)
    mask[::4] = 1
    lines = centre_lines(32, 8)                      # 12..19, half of them not image lines
    item = slice_item(kspace, mask, lines, separate=True)
    as_data = slice_data(item, acs_as_data=True)
    only_calibrate = slice_data(item, acs_as_data=False)
    np.testing.assert_array_equal(as_data.mask > 0, (mask > 0) | lines)
    np.testing.assert_array_equal(as_data.kspace[:, lines], kspace[:, lines])
    np.testing.assert_array_equal(only_calibrate.mask, mask)
    assert not np.any(only_calibrate.kspace[:, lines & (mask == 0)])
    for data in (as_data, only_calibrate):
        block, count, source = data.reference_block()
        assert (count, source) == (8, FROM_REFERENCE_LINES)
        np.testing.assert_array_equal(block, kspace[:, lines])
    assert only_calibrate.acceleration == pytest.approx(4.0) and as_data.acceleration == pytest.approx(32 / 14)


def test_a_slice_without_flagged_lines_calibrates_on_the_centre_of_its_image_lines():
    kspace, _, _ = synthetic_scan(32, coils=4)
    mask = np.zeros(32, np.float32)
    mask[::3] = 1
    mask[centre_lines(32, 6)] = 1
    data = slice_data(slice_item(kspace, mask), acs_as_data=True)
    assert data.reference_kspace is None and data.reference_lines is None
    _, count, source = data.reference_block()
    assert source == FROM_CENTRE_OF_IMAGE_LINES and count >= 6


def test_a_3d_slab_undersampled_along_ky_becomes_one_problem_per_partition():
    kspace, _, _ = synthetic_scan(32, coils=4)
    mask = np.zeros(32, np.float32)
    mask[::2] = 1
    item = slice_item(kspace, mask, centre_lines(32, 8), planes=4)
    item.kspace[:, 1] *= -0.5                        # the partitions differ along kz
    planes = partitions(item, acs_as_data=False)
    assert len(planes) == 4
    expected = ifftc(item.kspace, axes=(1,))
    for z, plane in enumerate(planes):
        np.testing.assert_allclose(plane.kspace, expected[:, z], atol=1e-5)
        np.testing.assert_array_equal(plane.reference_lines, centre_lines(32, 8))
    item.sampled[1, 0] = ~item.sampled[1, 0]        # now also undersampled along kz
    with pytest.raises(InputError, match="undersampled along kz"):
        partitions(item, acs_as_data=False)
