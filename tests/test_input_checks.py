"""Inputs the server cannot reconstruct, or must not scale from, each get one clear TEXT or ERROR
(issue 19): non-Cartesian and EPI headers, reversed (EPI) lines, 2D undersampling within lines,
empty slices, and a first slice that would fix the series scale. Real files (the EPI twix and the
Poisson brain in ../shared/data) are converted with `pisf convert` and replayed; those tests skip
without ../shared."""
from __future__ import annotations

import ismrmrd
import numpy as np
import pytest

from conftest import SHARED_DATA
from gadgets.accumulate import EMPTY_SLICE_RECON, SliceAccumulator
from gadgets.chain import run_stages
from gadgets.context import StreamContext, parse_header
from gadgets.finish import ImageFinish
from gadgets.items import KSpaceSlice, Notice, ReconImage, SliceKey
from gadgets.numerics.sampling import sampling_of
from gadgets.numerics.sense_2d import fully_sampled_centre
from gadgets.wire.client import read_raw, replay
from tools.evaluation.metrics import psnr, scale_match
from tools.rawdata.convert import convert
from tools.rawdata.groundtruth import read_groundtruth
from tools.rawdata.kspace_stream import header_for
from tools.rawdata.simulate import simulate

pytestmark = pytest.mark.timeout(300)

EPI_TWIX = SHARED_DATA / "twix_skyra_epi_phantom" / "epi.dat"
BRAIN_CFL = SHARED_DATA / "brain_8coil_poisson_ksp.cfl"
CARTESIAN_CHAINS = ("zerofill", "grappa", "sense", "pisf")


@pytest.fixture(scope="module")
def three_slices(tmp_path_factory):
    path = tmp_path_factory.mktemp("input_checks") / "three.h5"
    simulate(path, matrix=48, coils=4, accel=2, acs=12, slices=3, noise=0.02, seed=11)
    return path


def with_header(header_text: str, change) -> str:
    header = ismrmrd.xsd.CreateFromDocument(header_text)
    change(header.encoding[0])
    return ismrmrd.xsd.ToXML(header)


def scaled_slice(acquisitions, slice_index: int, factor: float):
    """The stream with every data line of one slice multiplied by `factor` (0: an empty slice)."""
    out = []
    for acquisition in acquisitions:
        if acquisition.idx.slice == slice_index and not acquisition.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            acquisition = ismrmrd.Acquisition(acquisition.getHead(), (acquisition.data * factor).astype(np.complex64))
        out.append(acquisition)
    return out


def by_slice(result) -> dict[int, ismrmrd.Image]:
    return {r.image.slice: r.image for r in result.images}


# ----------------------------------------------------------------------------- headers and lines
@pytest.mark.parametrize("chain", CARTESIAN_CHAINS)
def test_radial_header_is_refused_by_every_cartesian_chain(server, three_slices, chain):
    header, acquisitions = read_raw(three_slices)
    radial = with_header(header, lambda enc: setattr(enc, "trajectory", ismrmrd.xsd.trajectoryType.RADIAL))
    result = replay(None, *server.address, config=chain, header_text=radial, acquisitions=acquisitions)
    assert result.closed and not result.images
    assert len(result.texts) == 1 and result.texts[0].startswith("ERROR"), result.texts
    assert "radial trajectory" in result.texts[0] and "Cartesian k-space only" in result.texts[0]


def test_reversed_lines_on_a_cartesian_header_are_refused_before_any_image(server, three_slices):
    header, acquisitions = read_raw(three_slices)
    for acquisition in acquisitions:
        if acquisition.idx.kspace_encode_step_1 % 2 and not acquisition.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            acquisition.set_flag(ismrmrd.ACQ_IS_REVERSE)
    result = replay(None, *server.address, config="zerofill", header_text=header, acquisitions=acquisitions)
    assert not result.images
    assert len(result.texts) == 1 and "ACQ_IS_REVERSE" in result.texts[0] and result.texts[0].startswith("ERROR")


def test_phase_correction_lines_are_named_once_and_every_slice_still_comes(server, three_slices):
    header, acquisitions = read_raw(three_slices)
    stream = []
    for acquisition in acquisitions:
        if acquisition.idx.kspace_encode_step_1 == 0 and not acquisition.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            navigator = ismrmrd.Acquisition(acquisition.getHead(), acquisition.data.copy())
            navigator.clear_flag(ismrmrd.ACQ_LAST_IN_SLICE)
            navigator.set_flag(ismrmrd.ACQ_IS_PHASECORR_DATA)
            stream.append(navigator)          # one per slice, as TSE sequences send them
        stream.append(acquisition)
    result = replay(None, *server.address, config="zerofill", header_text=header, acquisitions=stream)
    assert sorted(by_slice(result)) == [0, 1, 2] and not result.errors
    assert len(result.texts) == 1 and "ACQ_IS_PHASECORR_DATA" in result.texts[0]


def test_epi_twix_converts_as_epi_without_ground_truth_and_is_refused(server, tmp_path, capsys):
    if not EPI_TWIX.is_file():
        pytest.skip("../shared/data is absent")
    out = tmp_path / "epi.h5"
    summary = convert(EPI_TWIX, out)
    captured = capsys.readouterr()
    assert not summary["groundtruth"] and read_groundtruth(out) is None
    assert "no ground truth: the input is EPI" in captured.out            # the output line says why
    assert "ramp-sampled readouts (trapezoidal regridding" in captured.err
    header, acquisitions = read_raw(out)
    enc = ismrmrd.xsd.CreateFromDocument(header).encoding[0]
    assert enc.trajectory == ismrmrd.xsd.trajectoryType.EPI
    assert {p.name for p in enc.trajectoryDescription.userParameterLong} >= {"rampUpTime", "rampDownTime"}
    reversed_lines = [a for a in acquisitions if a.is_flag_set(ismrmrd.ACQ_IS_REVERSE)]
    assert len(reversed_lines) == 40 + 2   # 40 image lines, 2 of the 3 phase-correction lines
    for chain in ("zerofill", "pisf"):
        result = replay(out, *server.address, config=chain)
        assert not result.images
        assert len(result.texts) == 1 and result.texts[0].startswith("ERROR: EPI data"), result.texts
        assert "ramp-sampled readouts" in result.texts[0] and "odd/even phase correction" in result.texts[0]


# ----------------------------------------------------------------------------- 2D undersampling
def bart_reference_image(stem) -> np.ndarray:
    """Map 0 of the BART reference reconstruction, [phase encode, readout] as the server's images."""
    from tools.rawdata.readers.bart import read_dims

    dims = read_dims(stem)
    data = np.memmap(stem.with_suffix(".cfl"), dtype=np.complex64, mode="r", shape=tuple(dims), order="F")
    return np.abs(np.asarray(data[(0, slice(None), slice(None)) + (0,) * 13])).T


def test_poisson_brain_is_2d_undersampled_with_r_from_the_samples(server, tmp_path, capsys):
    """convert says R 7.90 from the samples and writes no ground truth; sense (and pisf, falling back)
    reconstruct it with 2D SENSE, grappa refuses, zerofill says what its image is."""
    if not BRAIN_CFL.is_file():
        pytest.skip("../shared/data is absent")
    out = tmp_path / "brain.h5"
    summary = convert(BRAIN_CFL, out)
    line = capsys.readouterr().out.splitlines()[-1]
    assert "R 7.90 from the samples (2D undersampled within lines: 12.7 % of the samples; 1.00 counting lines)" in line
    assert "no ground truth: the input is 2D undersampled" in line
    assert summary["accel"] == pytest.approx(7.90, abs=0.01) and read_groundtruth(out) is None
    reference = bart_reference_image(BRAIN_CFL.with_name("brain_8coil_poisson_ref"))
    quality = {}
    for chain in ("zerofill", "sense", "pisf"):
        result = replay(out, *server.address, config=chain)
        assert len(result.images) == 1 and not result.errors, (chain, result.texts)
        assert len(result.texts) == 1 and "R 7.90 from the samples" in result.texts[0], result.texts
        image = result.images[0].image
        pixels = image.data[0, 0].astype(np.float64)
        quality[chain] = psnr(reference, scale_match(pixels, reference))
        assert "pass" not in image.meta.get("PISF_Guard", "")
    assert "zero-filled" in replay(out, *server.address, config="zerofill").texts[0]
    # measured: zero-filled 24.25 dB; 2D SENSE 32.98 (the row-wise SENSE of before: 24.73)
    assert quality["zerofill"] < 25.0 and quality["sense"] > 31.0 and quality["pisf"] == pytest.approx(quality["sense"])
    result = replay(out, *server.address, config="grappa")
    assert not result.images and len(result.texts) == 1 and result.texts[0].startswith("ERROR")
    assert "2D undersampling within the lines" in result.texts[0] and "The sense chain reconstructs" in result.texts[0]


def test_sampling_counts_samples_not_lines_and_asymmetric_echoes_are_not_holes():
    rng = np.random.default_rng(3)
    kspace = np.zeros((2, 64, 80), np.complex64)
    kspace[:, :, 16:] = 1.0                                      # asymmetric echo: 64 of 80 samples per line
    asymmetric = sampling_of(kspace)
    assert not asymmetric.holes_in_lines and asymmetric.sample_acceleration == pytest.approx(1.0)
    mask = rng.random((64, 80)) < 0.25
    mask[:, [0, -1]] = True                                      # every line spans the readout
    kspace = (mask * (1 + 1j)).astype(np.complex64)[None].repeat(2, axis=0)
    poisson_like = sampling_of(kspace)
    assert poisson_like.holes_in_lines and poisson_like.line_acceleration == 1.0
    assert poisson_like.sample_acceleration == pytest.approx(mask.size / mask.sum())
    assert sampling_of(np.zeros((2, 8, 8), np.complex64)).empty
    centre = np.zeros((64, 80), bool)
    centre[32 - 7:32 + 8, 40 - 10:40 + 11] = True                 # 15 lines x 21 columns around (32, 40)
    lines, columns = fully_sampled_centre(centre | mask)
    assert lines >= 15 and columns >= 21 and fully_sampled_centre(mask & ~centre) == (0, 0)


# ----------------------------------------------------------------------------- empty slices and scaling
def test_empty_slice_gets_a_text_and_a_zero_image_before_the_next_slice(three_slices):
    header_text, acquisitions = read_raw(three_slices)
    context = StreamContext(ismrmrd.xsd.CreateFromDocument(header_text))
    outputs = list(run_stages([SliceAccumulator(context)], scaled_slice(acquisitions, 1, 0.0)))
    kinds = [(type(o).__name__, o.key.slice if hasattr(o, "key") else None) for o in outputs]
    assert kinds == [("KSpaceSlice", 0), ("Notice", None), ("ReconImage", 1), ("KSpaceSlice", 2)]
    assert "slice 1" in outputs[1].text and "only zeros" in outputs[1].text
    assert outputs[2].recon == EMPTY_SLICE_RECON and not outputs[2].data.any()


def test_empty_slice_over_the_wire_is_a_zero_image_and_the_others_are_unchanged(server, three_slices):
    header, acquisitions = read_raw(three_slices)
    plain = by_slice(replay(None, *server.address, config="zerofill", header_text=header, acquisitions=acquisitions))
    result = replay(None, *server.address, config="zerofill", header_text=header,
                    acquisitions=scaled_slice(read_raw(three_slices)[1], 1, 0.0))
    images = by_slice(result)
    assert sorted(images) == [0, 1, 2] and len(result.texts) == 1 and "slice 1" in result.texts[0]
    assert not images[1].data.any() and images[1].meta["PISF_Empty"] == "true"
    for s in (0, 2):
        np.testing.assert_array_equal(images[s].data, plain[s].data)


@pytest.mark.parametrize("factor", [0.0, 1e-4], ids=["all-zero", "near-empty"])
def test_a_bad_first_slice_does_not_spoil_the_scaling_of_later_slices(server, three_slices, factor):
    """Later slices as in the stream without slice 0 at all: same pixels, same PSNR, nothing clipped."""
    header, acquisitions = read_raw(three_slices)
    truth = read_groundtruth(three_slices)
    without = [a for a in acquisitions if a.idx.slice != 0 or a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    reference = by_slice(replay(None, *server.address, config="zerofill", header_text=header, acquisitions=without))
    result = replay(None, *server.address, config="zerofill", header_text=header,
                    acquisitions=scaled_slice(read_raw(three_slices)[1], 0, factor))
    images = by_slice(result)
    assert len(result.texts) == 1   # the empty slice's TEXT, or the series scale lowered at slice 1
    for s in (1, 2):
        ours, theirs = images[s], reference[s]
        assert float(ours.meta["PISF_ScaleFactor"]) == pytest.approx(float(theirs.meta["PISF_ScaleFactor"]))
        assert (ours.data >= 4095).mean() < 0.005
        ours_psnr = psnr(truth.image(s, 0), ours.data[0, 0] / float(ours.meta["PISF_ScaleFactor"]))
        theirs_psnr = psnr(truth.image(s, 0), theirs.data[0, 0] / float(theirs.meta["PISF_ScaleFactor"]))
        assert ours_psnr == pytest.approx(theirs_psnr, abs=0.01)


def test_pisf_reports_no_guard_pass_and_makes_no_image_from_zero_data(server, three_slices):
    header, acquisitions = read_raw(three_slices)
    zeros = acquisitions
    for s in range(3):
        zeros = scaled_slice(zeros, s, 0.0)
    result = replay(None, *server.address, config="pisf", header_text=header, acquisitions=zeros)
    assert result.closed and not result.errors and len(result.images) == 3
    assert len(result.texts) == 3 and all("only zeros" in t for t in result.texts)
    for received in result.images:
        image = received.image
        assert not image.data.any() and "PISF_Guard" not in image.meta and image.meta["PISF_Empty"] == "true"


def test_image_finish_lowers_a_series_scale_a_dark_first_image_set():
    context = StreamContext(parse_header(header_for(coils=2, ny=32, nx=32)))
    rng = np.random.default_rng(0)
    bright = rng.random((1, 32, 32)).astype(np.float32) * 10.0
    line = ismrmrd.Acquisition.from_array(np.zeros((2, 32), np.complex64)).getHead()
    images = [ReconImage(SliceKey(s, 0, 0, 0, 0), data, line, "test") for s, data in
              enumerate([bright * 1e-5, bright, bright * 1.5])]
    outputs = list(ImageFinish(context)(iter(images)))
    notices = [o for o in outputs if isinstance(o, Notice)]
    finished = [o for o in outputs if isinstance(o, ismrmrd.Image)]
    assert len(finished) == 3 and len(notices) == 1 and "image 2" in notices[0].text
    assert (finished[1].data >= 4095).mean() == 0 and (finished[2].data >= 4095).mean() < 0.01
    assert float(finished[0].meta["PISF_ScaleFactor"]) == pytest.approx(1e5 * float(finished[1].meta["PISF_ScaleFactor"]),
                                                                          rel=1e-3)


def test_gadgetron_buffers_path_refuses_the_same_headers(three_slices):
    """Inside Gadgetron the chain gets ReconData, not lines: its adapter refuses what the accumulator does."""
    from gadgets.context import InputError
    from gadgets.gadgetron_external.recondata import ReconDataAdapter

    header, _ = read_raw(three_slices)
    spiral = with_header(header, lambda enc: setattr(enc, "trajectory", ismrmrd.xsd.trajectoryType.SPIRAL))
    with pytest.raises(InputError, match="spiral trajectory"):
        ReconDataAdapter(StreamContext(parse_header(spiral)))
    epi = with_header(header, lambda enc: setattr(enc, "trajectory", ismrmrd.xsd.trajectoryType.EPI))
    with pytest.raises(InputError, match="EPI data"):
        ReconDataAdapter(StreamContext(parse_header(epi)))
    ReconDataAdapter(StreamContext(parse_header(header)))   # Cartesian: accepted
