"""tools/rawdata/masks.py, the one home of the tools' k-space masks: seeded masks are pinned to
what the five makers it replaced (convert.ky_mask, eval_data.embedded_mask, evaluate.fastmri_mask,
simulate.sampling_lines, synth's centre block) gave, and each maker keeps its rules for any input."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tools.rawdata import masks
from tools.rawdata.convert import ky_mask
from tools.evaluation.datasets import centre_lines, make_cases


def lines(mask) -> list[int]:
    return np.flatnonzero(mask).tolist()


# Computed with the pre-merge functions (identical on 134 400 seeded comparisons when the
# makers moved here); a change of rule or of the order of random draws shows here.
PINNED_CONVERSION = {
    "equispaced": [0, 4, 8, 12, 16, 20, 24, 28, 32, 36],
    "random": [2, 5, 8, 31],
    "fastmri": [0, 4, 9, 20, 28, 31],
    "fastmri-equispaced": [6, 14, 23, 32],
    "cmrxrecon": [0, 4, 8, 12, 16, 20, 24, 28, 32, 36],
    "cmrxrecon-kt": [1, 5, 9, 13, 17, 21, 25, 29, 33, 37],
}


@pytest.mark.parametrize("kind", masks.CONVERSION_KINDS)
def test_conversion_masks_are_pinned(kind):
    pattern, calibration = masks.conversion_mask(kind, 40, 20, 4, 6, np.random.default_rng(3), frame=1)
    assert lines(pattern) == PINNED_CONVERSION[kind]
    assert lines(calibration) == [17, 18, 19, 20, 21, 22]
    # `pisf convert` uses exactly this maker
    again = ky_mask(kind, 40, 20, 4, 6, np.random.default_rng(3), frame=1)
    assert all(np.array_equal(a, b) for a, b in zip(again, (pattern, calibration)))


def test_evaluation_simulation_and_fastmri_masks_are_pinned():
    mask, centre = masks.evaluation_mask(48, 4, "random", 8, np.random.default_rng(5))
    assert lines(mask) == [0, 20, 21, 22, 23, 24, 25, 26, 27, 32, 38, 40] and mask.dtype == np.float32
    assert lines(centre) == list(range(20, 28))
    mask, _ = masks.evaluation_mask(48, 4, "equispaced", 8, np.random.default_rng(5))
    assert lines(mask) == [6, 16, 20, 21, 22, 23, 24, 25, 26, 27, 36, 46]
    assert lines(masks.fastmri_mask(41, 4, 0.16, "random", np.random.default_rng(7))) == \
        [6, 17, 18, 19, 20, 21, 22, 23, 24, 32, 37]
    assert lines(masks.fastmri_mask(41, 4, 0.16, "equispaced", np.random.default_rng(7))) == \
        [9, 17, 18, 19, 20, 21, 22, 23, 30]
    pattern, acs = masks.simulation_lines(32, 3, 6, "random", 27, np.random.default_rng(11))
    assert lines(pattern) == [0, 2, 11, 13, 14, 15, 17, 18, 20] and lines(acs) == list(range(13, 19))
    pattern, _ = masks.simulation_lines(32, 3, 6, "equispaced", 27, np.random.default_rng(11))
    assert lines(pattern) == [1, 4, 7, 10, 13, 16, 19, 22, 25]


def test_evaluation_cases_use_the_evaluation_mask():
    for case in make_cases("phantom", 256):
        if case.embedded:
            mask, centre = masks.evaluation_mask(256, case.R, case.kind, centre_lines(256, case.R),
                                                 np.random.default_rng(case.seed))
            assert np.array_equal(case.mask, mask) and np.array_equal(case.reference_lines, centre)
        else:
            assert np.array_equal(case.mask, masks.separate_mask(256, int(case.R)))


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 400), count=st.integers(0, 450), data=st.data())
def test_centre_block_is_one_run_of_count_lines_about_the_centre(n, count, data):
    centre = data.draw(st.integers(0, n - 1))
    block = masks.centre_block(n, count, centre)
    expected = min(count, n)
    assert block.sum() == expected
    if expected:
        first = int(np.argmax(block))
        assert block[first:first + expected].all()                 # contiguous
        if 0 <= centre - count // 2 <= n - expected:
            assert first == centre - count // 2                     # unshifted when it fits


@settings(max_examples=200, deadline=None)
@given(n=st.integers(16, 400), accel=st.sampled_from([1, 2, 3, 4, 5.5, 8]), acs=st.integers(0, 40),
       kind=st.sampled_from(masks.CONVERSION_KINDS), seed=st.integers(0, 2 ** 31), frame=st.integers(0, 9))
def test_conversion_masks_keep_their_rules(n, accel, acs, kind, seed, frame):
    acs = min(acs, n - 1)
    pattern, calibration = masks.conversion_mask(kind, n, n // 2, accel, acs, np.random.default_rng(seed), frame)
    again = masks.conversion_mask(kind, n, n // 2, accel, acs, np.random.default_rng(seed), frame)
    assert all(np.array_equal(a, b) for a, b in zip((pattern, calibration), again))   # a seed is a mask
    assert pattern.dtype == calibration.dtype == bool and pattern.shape == calibration.shape == (n,)
    if kind in ("fastmri", "fastmri-equispaced"):
        assert calibration.sum() == acs
    else:
        assert np.array_equal(calibration, masks.centre_block(n, acs))
    step = max(1, int(round(accel)))
    if kind in ("equispaced", "cmrxrecon", "cmrxrecon-kt"):
        shift = frame if kind == "cmrxrecon-kt" else 0
        assert lines(pattern) == list(range((n // 2 + shift) % step, n, step))
    if kind == "random":
        assert not (pattern & calibration).any()
        outside = n - int(calibration.sum())
        assert pattern.sum() == max(0, min(outside, int(round(n / accel)) - int(calibration.sum())))


@settings(max_examples=100, deadline=None)
@given(ny=st.integers(64, 400), accel=st.sampled_from([3, 4, 5, 6, 8]), kind=st.sampled_from(["random", "equispaced"]),
       seed=st.integers(0, 2 ** 31))
def test_evaluation_masks_sample_about_ny_over_r_lines(ny, accel, kind, seed):
    count = centre_lines(ny, accel)
    mask, centre = masks.evaluation_mask(ny, accel, kind, count, np.random.default_rng(seed))
    assert np.array_equal(centre, masks.centre_block(ny, count)) and (mask[centre] == 1).all()
    total = int(round(ny / accel))
    if kind == "random":
        assert mask.sum() == total
    else:
        assert abs(mask.sum() - total) <= 2


@settings(max_examples=100, deadline=None)
@given(ny=st.integers(16, 300), accel=st.integers(1, 8), acs=st.integers(0, 40), fraction=st.floats(0.5, 1.0),
       kind=st.sampled_from(["random", "equispaced"]), seed=st.integers(0, 2 ** 31))
def test_simulation_lines_stay_below_the_partial_fourier_edge(ny, accel, acs, fraction, kind, seed):
    ky_max = min(int(np.ceil(fraction * ny - 1e-9)), ny) - 1
    pattern, acs_mask = masks.simulation_lines(ny, accel, acs, kind, ky_max, np.random.default_rng(seed))
    assert not pattern[ky_max + 1:].any()
    equispaced, _ = masks.simulation_lines(ny, accel, acs, "equispaced", ky_max, np.random.default_rng(seed))
    assert pattern.sum() == equispaced.sum()                          # random: as many lines
    assert np.array_equal(acs_mask, masks.centre_block(ny, acs))
