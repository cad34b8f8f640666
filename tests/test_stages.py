"""Stage-level behaviour: each gadget alone, fed hand-built acquisitions."""
from __future__ import annotations

import ismrmrd
import numpy as np
import pytest

from gadgets.accumulate import SliceAccumulator
from gadgets.context import InputError, StreamContext
from gadgets.items import KSpaceSlice, Notice
from gadgets.noise import NoisePrewhitening
from gadgets.numerics.fft import fftc, ifftc
from gadgets.oversampling import RemoveOversampling


def make_header(nx=64, ny=48, recon_nx=None, fov=(200.0, 150.0, 5.0), ky_limits=None, coils=4, slices=1):
    recon_nx = recon_nx or nx
    x = ismrmrd.xsd
    ky_min, ky_max, ky_centre = ky_limits or (0, ny - 1, ny // 2)
    encoding = x.encodingType(
        trajectory=x.trajectoryType.CARTESIAN,
        encodedSpace=x.encodingSpaceType(matrixSize=x.matrixSizeType(x=nx, y=ny, z=1),
                                         fieldOfView_mm=x.fieldOfViewMm(x=fov[0] * nx / recon_nx, y=fov[1], z=fov[2])),
        reconSpace=x.encodingSpaceType(matrixSize=x.matrixSizeType(x=recon_nx, y=ny, z=1),
                                       fieldOfView_mm=x.fieldOfViewMm(x=fov[0], y=fov[1], z=fov[2])),
        encodingLimits=x.encodingLimitsType(
            kspace_encoding_step_1=x.limitType(minimum=ky_min, maximum=ky_max, center=ky_centre),
            slice=x.limitType(minimum=0, maximum=slices - 1, center=0)),
    )
    return x.ismrmrdHeader(encoding=[encoding], experimentalConditions=x.experimentalConditionsType(H1resonanceFrequency_Hz=63_500_000),
                           acquisitionSystemInformation=x.acquisitionSystemInformationType(receiverChannels=coils))


def line(data, ky, flags=(), slice_=0, centre=None):
    acquisition = ismrmrd.Acquisition.from_array(np.ascontiguousarray(data, dtype=np.complex64))
    acquisition.idx.kspace_encode_step_1 = ky
    acquisition.idx.slice = slice_
    acquisition.center_sample = data.shape[1] // 2 if centre is None else centre
    acquisition.sample_time_us = 5.0
    for flag in flags:
        acquisition.set_flag(flag)
    return acquisition


def test_partial_fourier_lines_land_at_their_encoding_position():
    # Limits 0..35 with centre 24 in a 48-line matrix: ky index k goes to row k - 24 + 24.
    header = make_header(ny=48, ky_limits=(0, 35, 24))
    context = StreamContext(header)
    rng = np.random.default_rng(1)
    lines = [line(rng.standard_normal((4, 64)) + 0j, ky) for ky in range(0, 36)]
    lines[-1].set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
    out = list(SliceAccumulator(context)(iter(lines)))
    assert len(out) == 1 and isinstance(out[0], KSpaceSlice)
    buffered = out[0]
    assert buffered.sampled[0, :36].all() and not buffered.sampled[0, 36:].any()
    np.testing.assert_array_equal(buffered.kspace[:, 0, 10, :], lines[10].data)


def test_limits_centre_offsets_rows():
    header = make_header(ny=48, ky_limits=(0, 29, 12))  # centre 12 -> row offset +12
    context = StreamContext(header)
    data = np.ones((4, 64), np.complex64)
    out = list(SliceAccumulator(context)(iter([line(data, 0), line(data, 29, [ismrmrd.ACQ_LAST_IN_SLICE])])))
    assert np.flatnonzero(out[0].sampled[0]).tolist() == [12, 41]


def test_asymmetric_echo_is_placed_by_its_centre_sample():
    context = StreamContext(make_header(nx=64))
    data = np.arange(4 * 40, dtype=np.float32).reshape(4, 40) + 0j
    acquisition = line(data, 24, [ismrmrd.ACQ_LAST_IN_SLICE], centre=8)  # 8 samples before the echo
    buffered = list(SliceAccumulator(context)(iter([acquisition])))[0]
    np.testing.assert_array_equal(buffered.kspace[:, 0, 24, 24:64], data)  # 32 - 8 = 24
    assert not buffered.kspace[:, 0, 24, :24].any()


def test_acs_only_lines_calibrate_but_are_not_image_data():
    context = StreamContext(make_header())
    rng = np.random.default_rng(2)
    acs_only = line(rng.standard_normal((4, 64)) + 0j, 23, [ismrmrd.ACQ_IS_PARALLEL_CALIBRATION])
    acs_and_imaging = line(rng.standard_normal((4, 64)) + 0j, 24, [ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING])
    imaging = line(rng.standard_normal((4, 64)) + 0j, 26, [ismrmrd.ACQ_LAST_IN_SLICE])
    buffered = list(SliceAccumulator(context)(iter([acs_only, acs_and_imaging, imaging])))[0]
    assert np.flatnonzero(buffered.sampled[0]).tolist() == [24, 26]
    assert np.flatnonzero(buffered.calibration_sampled[0]).tolist() == [23, 24]
    np.testing.assert_array_equal(buffered.calibration[:, 0, 23], acs_only.data)
    assert buffered.acs_lines().shape == (4, 2, 64)


def test_open_slices_are_flushed_with_a_warning_at_end_of_stream():
    context = StreamContext(make_header(slices=2))
    data = np.ones((4, 64), np.complex64)
    stream = [line(data, 0, slice_=0), line(data, 2, slice_=0, flags=[ismrmrd.ACQ_LAST_IN_SLICE]),
              line(data, 0, slice_=1), line(data, 2, slice_=1)]
    out = list(SliceAccumulator(context)(iter(stream)))
    slices = [o for o in out if isinstance(o, KSpaceSlice)]
    notices = [o for o in out if isinstance(o, Notice)]
    assert [s.key.slice for s in slices] == [0, 1]
    assert slices[0].complete and not slices[1].complete
    assert len(notices) == 1 and "slice 1" in notices[0].text and "ended before its last line" in notices[0].text


def test_fully_sampled_slice_is_emitted_without_flags():
    context = StreamContext(make_header(ny=8))
    data = np.ones((4, 64), np.complex64)
    out = list(SliceAccumulator(context)(iter([line(data, ky) for ky in range(8)])))
    assert len(out) == 1 and out[0].complete


def test_line_outside_encoding_limits_is_refused():
    context = StreamContext(make_header(ny=48, ky_limits=(0, 35, 24)))
    with pytest.raises(InputError, match="outside the encoding limits"):
        list(SliceAccumulator(context)(iter([line(np.ones((4, 64)) + 0j, 40)])))


def test_oversampling_removal_keeps_the_central_field_of_view():
    context = StreamContext(make_header(nx=128, recon_nx=64))
    stage = RemoveOversampling(context)
    assert context.readout_samples == 64
    profile = np.zeros(128, np.complex64)
    profile[40:88] = np.linspace(1, 2, 48)  # object inside the central half
    kline = fftc(profile)[None].repeat(4, 0)
    cropped = list(stage(iter([line(kline, 24)])))[0]
    assert cropped.number_of_samples == 64 and cropped.center_sample == 32
    np.testing.assert_allclose(ifftc(cropped.data[0]), profile[32:96], atol=1e-5)


def test_oversampling_removal_handles_asymmetric_echo():
    context = StreamContext(make_header(nx=128, recon_nx=64))
    profile = np.zeros(128, np.complex64)
    profile[50:78] = 1.0
    full = fftc(profile)
    partial = full[20:][None].repeat(4, 0)  # echo at sample 64 - 20 = 44 of 108
    cropped = list(RemoveOversampling(context)(iter([line(partial, 24, centre=44)])))[0]
    reference = fftc(ifftc(np.concatenate([np.zeros(20), full[20:]]))[32:96])
    np.testing.assert_allclose(cropped.data[0], reference, atol=1e-4)


def test_prewhitening_decorrelates_coils():
    rng = np.random.default_rng(3)
    mixing = np.array([[1, 0, 0, 0], [0.5, 1, 0, 0], [0, 0.3, 2, 0], [0.1, 0, 0.2, 0.5]], np.complex64)

    def noise(n):
        return mixing @ ((rng.standard_normal((4, n)) + 1j * rng.standard_normal((4, n))) / np.sqrt(2))

    context = StreamContext(make_header(nx=4096))
    noise_line = line(noise(4096), 0, [ismrmrd.ACQ_IS_NOISE_MEASUREMENT])
    data_line = line(noise(4096), 3)
    out = list(NoisePrewhitening(context)(iter([noise_line, data_line])))
    assert len(out) == 1  # the noise readout is consumed
    whitened = out[0].data
    covariance = whitened @ whitened.conj().T / whitened.shape[1]
    np.testing.assert_allclose(covariance, np.eye(4), atol=0.08)
