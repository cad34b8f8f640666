"""One definition of reference lines (gadgets/numerics/reference.py): the run through the centre,
the reference block of a slice, and the named minimum each use enforces."""
from __future__ import annotations

import numpy as np
import pytest

from gadgets.numerics import reference
from gadgets.numerics.calibration import sensitivities
from gadgets.numerics.grappa import grappa_fill
from gadgets.numerics.pisf_inference import calibration_lines
from gadgets.numerics.reference import (FROM_CENTRE_OF_IMAGE_LINES, FROM_REFERENCE_LINES, centre_region,
                                        reference_block, reference_run)
from tests.test_calibration import centre_lines, synthetic_scan


def test_reference_run_picks_the_centre_block():
    lines = np.zeros(32, dtype=bool)
    lines[::4] = True                 # equispaced image lines
    lines[12:22] = True               # the reference block through the centre (16)
    run = reference_run(lines)
    assert run.sum() == 10 and run[12] and run[21] and not run[22]
    off_centre = np.zeros(32, dtype=bool)
    off_centre[2:5] = off_centre[20:28] = True
    assert np.flatnonzero(reference_run(off_centre)).tolist() == list(range(20, 28))
    assert reference_run(np.zeros(8, dtype=bool)).sum() == 0


def test_reference_block_takes_flagged_lines_else_the_centre_of_the_image_lines():
    kspace, _, _ = synthetic_scan(32, coils=4)
    mask = np.zeros(32, np.float32)
    mask[::2] = 1
    mask[14:20] = 1                                     # centre run of the image lines: 14..20
    flagged = centre_lines(32, 10)                      # 11..20, a separate reference scan
    separate = kspace * flagged[None, :, None] * 2      # distinguishable from the image data
    block, lines, source = reference_block(kspace * mask[None, :, None], mask, separate, flagged)
    assert (lines, source) == (10, FROM_REFERENCE_LINES)
    np.testing.assert_array_equal(block, separate[:, flagged])
    block, lines, source = reference_block(kspace * mask[None, :, None], mask)
    assert (lines, source) == (7, FROM_CENTRE_OF_IMAGE_LINES)
    np.testing.assert_array_equal(block, kspace[:, 14:21])
    assert centre_region(block, 4, 10).shape == (4, 4, 10)
    np.testing.assert_array_equal(centre_region(block, 4, 10), block[:, 1:5, 11:21])
    assert centre_region(block, 64, 64).shape == block.shape   # never larger than the block


def test_each_use_enforces_its_own_named_minimum():
    kspace, _, _ = synthetic_scan(32, coils=4)
    mask = np.zeros(32, np.float32)
    mask[::2] = 1
    grappa_min = reference.MIN_GRAPPA_REFERENCE_LINES
    grappa_fill(kspace * mask[None, :, None], mask, kspace[:, centre_lines(32, grappa_min)])
    with pytest.raises(ValueError, match=f"at least {grappa_min} contiguous"):
        grappa_fill(kspace * mask[None, :, None], mask, kspace[:, centre_lines(32, grappa_min - 1)])
    espirit_min = reference.MIN_CALIBRATION_REFERENCE_LINES
    assert sensitivities(kspace, centre_lines(32, espirit_min)).shape == kspace.shape
    with pytest.raises(ValueError, match=f"at least {espirit_min}"):
        sensitivities(kspace, centre_lines(32, espirit_min - 1))
    acs_min = reference.MIN_ACS_BLOCK_LINES
    for run, expected_block in ((acs_min, True), (acs_min - 1, False)):
        sampled = np.zeros(32, np.float32)
        sampled[::4] = 1
        sampled[centre_lines(32, run)] = 1
        chosen = calibration_lines(sampled)
        assert (chosen.sum() == run) == expected_block       # else every sampled line
    # the values the issue asked to keep (changing one changes which slices are reconstructed how)
    assert (grappa_min, espirit_min, acs_min, reference.MIN_CONVERTED_REFERENCE_LINES) == (4, 6, 4, 8)
