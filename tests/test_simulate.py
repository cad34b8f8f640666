"""Tests for tools/rawdata/simulate.py: file structure, flags, noise statistics and exact ground truth."""
from __future__ import annotations

import argparse

import h5py
import ismrmrd
import ismrmrd.xsd
import numpy as np
import pytest

from tools.rawdata import simulate as sim

MATRIX = 64
OS = 2


def read_raw(path):
    """(header, acquisitions) of an ISMRMRD file."""
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False) as dataset:
        header = ismrmrd.xsd.CreateFromDocument(dataset.read_xml_header())
        acqs = [dataset.read_acquisition(i) for i in range(dataset.number_of_acquisitions())]
    return header, acqs


def imaging(acqs):
    return [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]


def kspace_of(acqs, slice_, phase, coils, ny, nx_enc):
    """Acquired lines placed into a zero k-space [coil, ky, kx] (independent of the simulator)."""
    k = np.zeros((coils, ny, nx_enc), complex)
    for a in imaging(acqs):
        if a.idx.slice == slice_ and a.idx.phase == phase:
            k[:, a.idx.kspace_encode_step_1] = a.data
    return k


def ifft2c(k):
    """Centred orthonormal inverse 2D FFT written out with numpy (not gadgets.numerics.fft)."""
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=axes), norm="ortho"), axes=axes)


def crop_x(images, nx):
    start = images.shape[-1] // 2 - nx // 2
    return images[..., start:start + nx]


def rss(images):
    return np.sqrt(np.sum(np.abs(images) ** 2, axis=0))


@pytest.fixture(scope="module")
def undersampled(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "us.h5"
    result = sim.simulate(path, matrix=MATRIX, coils=6, accel=4, acs=12, slices=3, phases=2,
                          oversampling=OS, noise=0.0, seed=3, store_sensitivities=True)
    header, acqs = read_raw(path)
    return path, result, header, acqs


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "noisy.h5"
    result = sim.simulate(path, matrix=128, coils=8, accel=1, acs=0, slices=1, oversampling=OS,
                          noise=0.05, seed=11)
    header, acqs = read_raw(path)
    return path, result, header, acqs


def test_header_parses_and_describes_the_scan(undersampled):
    path, result, header, _ = undersampled
    enc = header.encoding[0]
    assert enc.trajectory == ismrmrd.xsd.trajectoryType.CARTESIAN
    assert (enc.encodedSpace.matrixSize.x, enc.encodedSpace.matrixSize.y, enc.encodedSpace.matrixSize.z) == (MATRIX * OS, MATRIX, 1)
    assert (enc.reconSpace.matrixSize.x, enc.reconSpace.matrixSize.y, enc.reconSpace.matrixSize.z) == (MATRIX, MATRIX, 1)
    assert enc.encodedSpace.fieldOfView_mm.x == pytest.approx(220.0 * OS)
    assert enc.reconSpace.fieldOfView_mm.x == pytest.approx(220.0)
    assert enc.reconSpace.fieldOfView_mm.z == pytest.approx(5.0)
    lim = enc.encodingLimits
    assert (lim.kspace_encoding_step_1.minimum, lim.kspace_encoding_step_1.maximum, lim.kspace_encoding_step_1.center) == (0, MATRIX - 1, MATRIX // 2)
    assert (lim.slice.minimum, lim.slice.maximum) == (0, 2)
    assert (lim.phase.minimum, lim.phase.maximum) == (0, 1)
    assert enc.parallelImaging.accelerationFactor.kspace_encoding_step_1 == 4
    assert enc.parallelImaging.calibrationMode == ismrmrd.xsd.calibrationModeType.EMBEDDED
    assert header.acquisitionSystemInformation.receiverChannels == 6
    assert header.experimentalConditions.H1resonanceFrequency_Hz == pytest.approx(127.73e6, rel=1e-3)
    assert header.sequenceParameters.TR == [2000.0] and header.sequenceParameters.TE == [80.0]
    assert result["header_xml"] == ismrmrd.xsd.ToXML(header)  # round trip is lossless


def test_line_counts_flags_and_order(undersampled):
    path, result, _, acqs = undersampled
    ny, centre = MATRIX, MATRIX // 2
    pattern = {ky for ky in range(ny) if (ky - centre) % 4 == 0}
    acs = set(range(centre - 6, centre + 6))
    assert not any(a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) for a in acqs)  # noise 0: no noise scan
    lines = imaging(acqs)
    assert len(lines) == 3 * 2 * len(pattern | acs)
    for s in range(3):
        for p in range(2):
            block = [a for a in lines if a.idx.slice == s and a.idx.phase == p]
            kys = [a.idx.kspace_encode_step_1 for a in block]
            assert kys == sorted(pattern | acs)  # ascending, no duplicates
            for a in block:
                ky = a.idx.kspace_encode_step_1
                both = a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
                only = a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
                assert both == (ky in acs and ky in pattern)
                assert only == (ky in acs and ky not in pattern)
            first = [a.is_flag_set(ismrmrd.ACQ_FIRST_IN_SLICE) for a in block]
            last = [a.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE) for a in block]
            assert first == [True] + [False] * (len(block) - 1)
            assert last == [False] * (len(block) - 1) + [True]
            assert np.array_equal(np.flatnonzero(result["mask"][s, p]), kys)
    # slice outer, phase inner; LAST_IN_MEASUREMENT only on the very last line
    order = [(a.idx.slice, a.idx.phase) for a in lines]
    assert order == sorted(order)
    assert [a.is_flag_set(ismrmrd.ACQ_LAST_IN_MEASUREMENT) for a in acqs].count(True) == 1
    assert acqs[-1].is_flag_set(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["dataset/pisf_groundtruth/mask"][()], result["mask"])


def test_acquisition_geometry_and_timing(undersampled):
    _, result, _, acqs = undersampled
    for a in acqs:
        assert a.data.shape == (6, MATRIX * OS)
        assert a.center_sample == MATRIX * OS // 2
        assert a.available_channels == a.active_channels == 6
        assert tuple(a.read_dir) == (1, 0, 0) and tuple(a.phase_dir) == (0, 1, 0) and tuple(a.slice_dir) == (0, 0, 1)
        assert tuple(a.patient_table_position) == (0, 0, 0)
        assert a.sample_time_us > 0
        assert a.position[2] == pytest.approx(result["slice_position_mm"][a.idx.slice])
    assert np.allclose(np.diff(result["slice_position_mm"]), 6.0)  # thickness 5 + gap 1
    stamps = np.array([a.acquisition_time_stamp for a in acqs], dtype=np.int64)
    assert np.all(np.abs(np.diff(stamps) - 2000.0 / 2.5) <= 1)  # one line per TR, 2.5 ms ticks


def test_noise_free_fully_sampled_recon_equals_ground_truth(tmp_path):
    path = tmp_path / "full.h5"
    result = sim.simulate(path, matrix=MATRIX, coils=4, accel=1, acs=0, slices=2, oversampling=OS,
                          noise=0.0, sequence="gre", seed=5)
    _, acqs = read_raw(path)
    assert len(acqs) == 2 * MATRIX
    with h5py.File(path, "r") as f:
        truth = f["dataset/pisf_groundtruth/rss"][()]
    assert truth.shape == (2, 1, MATRIX, MATRIX) and truth.dtype == np.float32
    for s in range(2):
        recon = rss(crop_x(ifft2c(kspace_of(acqs, s, 0, 4, MATRIX, MATRIX * OS)), MATRIX))
        assert np.linalg.norm(recon - truth[s, 0]) / np.linalg.norm(truth[s, 0]) < 1e-5
    # the object sits in the recon FOV: the cropped-away oversampled band is empty
    full = ifft2c(kspace_of(acqs, 0, 0, 4, MATRIX, MATRIX * OS))
    assert np.abs(full).max() > 100 * np.abs(full[..., :MATRIX // 4]).max()


def test_undersampled_zero_filled_matches_ground_truth_model(undersampled):
    """Zero-filled recon of the file's lines == the same lines built from sensitivities x combined."""
    path, result, _, acqs = undersampled
    with h5py.File(path, "r") as f:
        sens = f["dataset/pisf_groundtruth/sensitivities"][()]   # [slice, coil, y, x]
        combined = f["dataset/pisf_groundtruth/combined"][()]     # [slice, phase, y, x]
        mask = f["dataset/pisf_groundtruth/mask"][()]
    for s, p in ((0, 0), (2, 1)):
        recon = crop_x(ifft2c(kspace_of(acqs, s, p, 6, MATRIX, MATRIX * OS)), MATRIX)
        coil_images = sens[s] * combined[s, p]
        k_y = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(coil_images, axes=-2), axis=-2, norm="ortho"), axes=-2)
        model = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(k_y * mask[s, p][:, None], axes=-2),
                                            axis=-2, norm="ortho"), axes=-2)
        assert np.linalg.norm(recon - model) / np.linalg.norm(model) < 1e-5
        # and rss is the fully sampled RSS of the same coil images
        assert np.allclose(rss(coil_images), result["rss"][s, p], rtol=1e-4, atol=1e-6)
    # coil RSS is normalised to ~1 inside the head
    inside = result["rss"][1, 0] > 0.2 * result["rss"][1, 0].max()
    assert 0.7 < np.median(rss(sens[1])[inside]) < 1.3


def test_noise_readout_first_and_covariance(noisy, tmp_path):
    path, result, _, acqs = noisy
    first = acqs[0]
    assert first.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    assert sum(a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) for a in acqs) == 1
    assert first.data.shape == acqs[1].data.shape
    psi = result["noise_covariance"]
    coils = psi.shape[0]
    assert np.allclose(psi, psi.conj().T) and np.linalg.eigvalsh(psi).min() > 0
    levels = np.sqrt(np.real(np.diag(psi)))
    corr = np.abs(psi) / np.outer(levels, levels)
    neighbours = np.array([corr[i, (i + 1) % coils] for i in range(coils)])
    assert np.all((neighbours >= 0.1 - 1e-9) & (neighbours <= 0.3 + 1e-9))
    assert levels.max() / levels.min() > 1.05  # unequal coil noise levels
    with h5py.File(path, "r") as f:
        assert np.allclose(f["dataset/pisf_groundtruth/noise_covariance"][()], psi, rtol=1e-5)
    # noise readout: 256 samples -> relative Frobenius error ~ sqrt(coils / samples) ~ 0.18
    n = first.data
    sample = n @ n.conj().T / n.shape[1]
    assert np.linalg.norm(sample - psi) / np.linalg.norm(psi) < 0.45
    # the k-space lines carry the same covariance: subtract a noise-free twin (same seed)
    clean_path = tmp_path / "clean.h5"
    sim.simulate(clean_path, matrix=128, coils=8, accel=1, acs=0, slices=1, oversampling=OS, noise=0.0, seed=11)
    _, clean = read_raw(clean_path)
    diff = np.concatenate([a.data - b.data for a, b in zip(imaging(acqs), clean)], axis=1)
    sample = diff @ diff.conj().T / diff.shape[1]
    assert np.linalg.norm(sample - psi) / np.linalg.norm(psi) < 0.05


def test_partial_fourier_limits(tmp_path):
    path = tmp_path / "pf.h5"
    sim.simulate(path, matrix=MATRIX, coils=2, accel=2, acs=8, oversampling=1, noise=0.01,
                 partial_fourier=0.75, seed=1)
    header, acqs = read_raw(path)
    ky_max = int(np.ceil(0.75 * MATRIX)) - 1
    limit = header.encoding[0].encodingLimits.kspace_encoding_step_1
    assert (limit.minimum, limit.maximum, limit.center) == (0, ky_max, MATRIX // 2)
    kys = [a.idx.kspace_encode_step_1 for a in imaging(acqs)]
    expected = {ky for ky in range(ky_max + 1) if (ky - MATRIX // 2) % 2 == 0} | set(range(28, 36))
    assert kys == sorted(expected) and ky_max - 2 < max(kys) <= ky_max  # top lines never acquired
    with pytest.raises(ValueError):
        sim.simulate(tmp_path / "bad.h5", matrix=MATRIX, coils=2, acs=24, partial_fourier=0.55)


def test_random_mask_count_and_reproducibility(tmp_path):
    common = dict(matrix=MATRIX, coils=2, accel=4, acs=8, mask="random", slices=3, oversampling=1, noise=0.01)
    a = sim.simulate(tmp_path / "a.h5", seed=7, **common)
    b = sim.simulate(tmp_path / "b.h5", seed=7, **common)
    c = sim.simulate(tmp_path / "c.h5", seed=8, **common)
    assert np.array_equal(a["mask"], b["mask"])
    assert np.array_equal(a["rss"], b["rss"])
    assert not np.array_equal(a["mask"], c["mask"])
    assert not np.array_equal(a["mask"][0], a["mask"][1])  # a fresh draw per slice
    _, acqs = read_raw(tmp_path / "a.h5")
    for s in range(3):
        block = [x for x in imaging(acqs) if x.idx.slice == s]
        pattern = [x for x in block if not x.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)]
        assert len(pattern) == MATRIX // 4  # same count as the equispaced pattern
        acs = [x.idx.kspace_encode_step_1 for x in block
               if x.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
               or x.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)]
        assert acs == list(range(28, 36))


def test_slices_and_cine_phases_differ(undersampled):
    _, result, _, _ = undersampled
    gt = result["rss"]

    def rel(a, b):
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    assert rel(gt[0, 0], gt[2, 0]) > 0.05          # anatomy changes along z
    motion = rel(gt[1, 1], gt[1, 0])
    assert 0.02 < motion < 0.8                      # cine motion: changed, not a different object
    assert np.all(np.isfinite(gt)) and gt.min() >= 0


def test_gre_and_se_contrast_differ(tmp_path):
    common = dict(matrix=MATRIX, coils=2, accel=1, acs=0, oversampling=1, noise=0.0, seed=2)
    se = sim.simulate(tmp_path / "se.h5", sequence="se", **common)
    gre = sim.simulate(tmp_path / "gre.h5", sequence="gre", tr=250, te=2.3, flip=70, **common)
    header, _ = read_raw(tmp_path / "gre.h5")
    assert header.sequenceParameters.flipAngle_deg == [70.0]
    a, b = se["rss"][0, 0], gre["rss"][0, 0]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] < 0.95
    # GRE carries off-resonance phase (fat at -3.4 ppm out of phase at TE 2.3 ms at 3 T)
    assert np.std(np.angle(gre["combined"][0, 0][b > 0.2 * b.max()])) > 0.1


def test_cli_arguments_and_run(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    sim.add_arguments(parser)
    defaults = parser.parse_args(["--out", "x.h5"])
    assert (defaults.matrix, defaults.coils, defaults.accel, defaults.acs, defaults.mask,
            defaults.slices, defaults.phases, defaults.oversampling, defaults.sequence,
            defaults.seed) == (256, 8, 4, 24, "equispaced", 1, 1, 2, "se", 0)
    out = tmp_path / "cli.h5"
    args = parser.parse_args(["--out", str(out), "--matrix", "32", "--coils", "2", "--acs", "8",
                              "--partial-fourier", "0.75", "--noise", "0.01"])
    assert sim.run(args) == 0
    assert "R_eff" in capsys.readouterr().out
    header, acqs = read_raw(out)
    assert acqs[0].is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    assert header.encoding[0].encodingLimits.kspace_encoding_step_1.maximum == 23


def test_module_imports_no_torch():
    import subprocess
    import sys
    code = "import sys, tools.rawdata.simulate; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_ground_truth_lives_inside_the_raw_group(tmp_path):
    """One top-level group only: FIRE's client.py refuses files with several without -g."""
    from tools.rawdata.groundtruth import read_groundtruth

    path = tmp_path / "one_group.h5"
    result = sim.simulate(path, matrix=32, coils=2, accel=2, acs=8, noise=0.0)
    with h5py.File(path, "r") as f:
        assert list(f.keys()) == ["dataset"]
        assert {"xml", "data", "pisf_groundtruth"} <= set(f["dataset"].keys())
    truth = read_groundtruth(path)
    assert truth.path == "/dataset/pisf_groundtruth"
    np.testing.assert_array_equal(truth.rss, result["rss"])
    # files written before the move (ground truth at /pisf_groundtruth) still read
    with h5py.File(path, "a") as f:
        f.move("dataset/pisf_groundtruth", "pisf_groundtruth")
    assert read_groundtruth(path).path == "/pisf_groundtruth"


def _zerofill_chain_images(path):
    """{(slice, phase): ismrmrd.Image} of the zerofill chain run on the file (the served stages, in process)."""
    import logging

    from gadgets.chain import ChainRepository, run_stages
    from gadgets.context import StreamContext, parse_header
    from gadgets.wire.client import read_raw as read_stream

    header_text, acquisitions = read_stream(path, "dataset")
    context = StreamContext(header=parse_header(header_text), log=logging.getLogger("test.zerofill"))
    outputs = run_stages(ChainRepository.shared().load("zerofill").build(context), iter(acquisitions))
    return {(int(i.slice), int(i.phase)): i for i in outputs if hasattr(i, "image_series_index")}


def test_fully_sampled_low_noise_scan_through_zerofill_scores_over_40_db(tmp_path):
    """The ground truth is what an ideal recon of the scan gives (whitened-coil RSS): a fully
    sampled, low-noise slice through zerofill matches it to >= 40 dB (against the unwhitened RSS it
    scored 27.9 dB), in the chains' own units (image / PISF_ScaleFactor)."""
    from tools.evaluation.metrics import psnr, scale_match

    path = tmp_path / "full_low_noise.h5"
    result = sim.simulate(path, matrix=128, coils=8, accel=1, acs=0, slices=1, noise=0.002, seed=4,
                          store_sensitivities=True)
    image = _zerofill_chain_images(path)[(0, 0)]
    truth = result["rss"][0, 0]
    recon = image.data[0, 0].astype(np.float64)
    assert psnr(truth, scale_match(recon, truth)) >= 40.0
    # no scale match needed: undoing image_finish's factor gives the truth's intensities
    head = truth > 0.2 * truth.max()
    ratio = recon[head] / float(image.meta["PISF_ScaleFactor"]) / truth[head]
    assert abs(np.median(ratio) - 1.0) < 0.01
    # the stored truth is the whitened RSS of the noise-free coil images (sensitivities x object)
    with h5py.File(path, "r") as f:
        whitening = f["dataset/pisf_groundtruth/whitening"][()]
        coil_images = f["dataset/pisf_groundtruth/sensitivities"][0] * f["dataset/pisf_groundtruth/combined"][0, 0]
    assert not np.allclose(whitening, np.diag(np.diag(whitening)))  # correlated coils: a real mixing
    np.testing.assert_allclose(rss(np.tensordot(whitening, coil_images, axes=1)), truth, rtol=1e-3, atol=1e-3)
