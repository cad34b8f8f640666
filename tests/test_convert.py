"""`pisf convert`: Siemens twix, fastMRI, CMRxRecon and BART files -> ISMRMRD raw files that replay.

The real Siemens file (../shared/data) must give, through the server's zerofill chain, the image
an independent numpy reconstruction of its twix data gives. Small fastMRI, CMRxRecon and BART
files are written here from the formats' documentation; their images must come back with the
documented orientation, counters and order. Tests that need ../shared/data skip without it.
"""
from __future__ import annotations

import contextlib
import copy
import io
import struct
import subprocess
import sys

import h5py
import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
import pytest

from conftest import REPO, SHARED_DATA, shipped_chain_text
from gadgets.numerics.fft import fftc, ifftc
from gadgets.wire.client import read_raw, replay
from tools.rawdata.cfl import write_cfl
from tools.cli import main as pisf
from tools.rawdata.convert import Undersampling, convert, ky_mask
from tools.rawdata.groundtruth import read_groundtruth
from tools.evaluation.metrics import psnr, scale_match

TWIX = SHARED_DATA / "siemens_cimax_phantom_16ch_twix.dat"
BRAIN_CFL = SHARED_DATA / "brain_8coil_poisson_ksp.cfl"
FLOAT_ZEROFILL = shipped_chain_text("zerofill", image_finish={"data_type": "float", "scale": 1.0})


def rss(coil_images: np.ndarray, axis: int = 0) -> np.ndarray:
    return np.sqrt(np.sum(np.abs(coil_images) ** 2, axis=axis))


def served(server, path, config_text=FLOAT_ZEROFILL, config=None):
    result = replay(path, *server.address, config=config or "zerofill",
                    config_text=None if config else config_text)
    assert result.closed and not result.errors and result.error is None, (result.texts, result.error)
    return result


def flags(acquisition) -> set[str]:
    names = ("NOISE_MEASUREMENT", "PARALLEL_CALIBRATION", "PARALLEL_CALIBRATION_AND_IMAGING")
    out = {n for n in names if acquisition.is_flag_set(getattr(ismrmrd, f"ACQ_IS_{n}"))}
    for name in ("FIRST_IN_SLICE", "LAST_IN_SLICE", "LAST_IN_MEASUREMENT"):
        if acquisition.is_flag_set(getattr(ismrmrd, f"ACQ_{name}")):
            out.add(name)
    return out


def quiet(**kwargs):
    return dict(log=None, warn=lambda text: None, **kwargs)


# ----------------------------------------------------------------------------- Siemens twix
@pytest.fixture(scope="module")
def twix_path():
    if not TWIX.is_file():
        pytest.skip("../shared/data is absent")
    return TWIX


@pytest.fixture(scope="module")
def twix_reference(twix_path):
    """Independent numpy recon of the twix data: twixtools lines by line counter, centred 2D iFFT, RSS."""
    import twixtools

    with contextlib.redirect_stdout(io.StringIO()):
        scan = twixtools.read_twix(str(twix_path), verbose=False)[-1]
    lines = [m for m in scan["mdb"] if m.is_image_scan()]
    kspace = np.zeros((16, 128, 128), dtype=np.complex128)
    for m in lines:
        kspace[:, m.cLin, :] = m.data
    return kspace, rss(ifftc(kspace, axes=(-2, -1)))


def test_siemens_twix_converts_and_replays_as_the_numpy_recon(server, twix_path, twix_reference, tmp_path, capsys):
    out = tmp_path / "cimax.h5"
    assert pisf(["convert", str(twix_path), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Pulseq" in captured.err and "wrote" in captured.out  # the data, not the placeholder protocol, set the matrix
    header, acquisitions = read_raw(out)
    enc = xsd.CreateFromDocument(header).encoding[0]
    assert (enc.encodedSpace.matrixSize.x, enc.encodedSpace.matrixSize.y) == (128, 128)
    limits = enc.encodingLimits.kspace_encoding_step_1
    assert (limits.minimum, limits.maximum, limits.center) == (0, 127, 64)
    assert len(acquisitions) == 128 and [a.idx.kspace_encode_step_1 for a in acquisitions] == list(range(128))
    assert flags(acquisitions[0]) == {"FIRST_IN_SLICE"} and flags(acquisitions[-1]) == {"LAST_IN_SLICE", "LAST_IN_MEASUREMENT"}
    # geometry from the MDH: quaternion (W, X, Y, Z) = (0.707, 0, 0, 0.707), position (Sag, Cor, Tra)
    first = acquisitions[0]
    np.testing.assert_allclose(first.read_dir, (-1, 0, 0), atol=1e-6)
    np.testing.assert_allclose(first.phase_dir, (0, 1, 0), atol=1e-6)
    np.testing.assert_allclose(first.slice_dir, (0, 0, 1), atol=1e-6)
    np.testing.assert_allclose(first.position, (0, -25, 0), atol=1e-4)
    assert first.center_sample == 64 and first.active_channels == 16

    kspace, reference = twix_reference
    [received] = served(server, out).images
    image = received.image.data[0, 0].astype(np.float64)
    assert image.shape == (128, 128)
    np.testing.assert_allclose(image, reference, rtol=1e-5, atol=1e-6 * reference.max())
    np.testing.assert_allclose(received.image.read_dir, (-1, 0, 0), atol=1e-6)
    truth = read_groundtruth(out)
    np.testing.assert_allclose(truth.image(0, 0), reference, rtol=1e-5, atol=1e-6 * reference.max())


@pytest.mark.parametrize("mask, separate", [("random", False), ("equispaced", True)])
def test_undersampled_twix_replays_through_pisf_against_its_reference(server, twix_path, twix_reference, tmp_path,
                                                                      mask, separate):
    out = tmp_path / f"cimax_{mask}.h5"
    summary = convert(twix_path, out, undersampling=Undersampling(mask, 4, 24, separate, seed=1), **quiet())
    _, acquisitions = read_raw(out)
    calibration_only = [a for a in acquisitions if a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)]
    embedded = [a for a in acquisitions if a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)]
    centre = list(range(52, 76))
    if separate:  # the reference scan first, then pure every-4th image lines
        assert [a.idx.kspace_encode_step_1 for a in calibration_only] == centre and not embedded
        assert acquisitions[:24] == calibration_only
        assert [a.idx.kspace_encode_step_1 for a in acquisitions[24:]] == list(range(0, 128, 4))
    else:
        assert [a.idx.kspace_encode_step_1 for a in embedded] == centre and not calibration_only
        assert len(acquisitions) == 32 and summary["accel"] == pytest.approx(4.0)
    kspace, reference = twix_reference
    truth = read_groundtruth(out, arrays=True)
    np.testing.assert_allclose(truth.image(0, 0), reference, rtol=1e-5, atol=1e-6 * reference.max())
    mask = truth.arrays["mask"][0, 0].astype(bool)  # the image lines sent
    assert mask.sum() == len(acquisitions) - len(calibration_only)
    zero_filled = rss(ifftc(kspace * mask[None, :, None], axes=(-2, -1)))
    [received] = served(server, out).images
    np.testing.assert_allclose(received.image.data[0, 0], zero_filled, rtol=1e-5, atol=1e-6 * zero_filled.max())
    [received] = served(server, out, config="pisf").images  # the product chain, scored against the reference
    image = received.image.data[0, 0].astype(np.float64)
    assert image.shape == reference.shape and 10 < psnr(reference, scale_match(image, reference)) < 60


def synthetic_twix(tmp_path, twix_path):
    """The real file rewritten by twixtools: a noise-adjust line first, two interleaved slices, the
    lines 60..67 of slice 0 also sent as PATREFSCAN-only reference lines, lines 62..65 flagged
    PATREFANDIMASCAN, and line 3 of slice 1 reversed (REFLECT)."""
    import twixtools

    with contextlib.redirect_stdout(io.StringIO()):
        scan = twixtools.read_twix(str(twix_path), verbose=False, keep_acqend=True)[-1]
    local = [m.convert_to_local() for m in scan["mdb"]]
    lines, acqend = local[:-1], local[-1]
    noise = copy.deepcopy(lines[0])
    noise.clear_all_flags()
    noise.add_flag("NOISEADJSCAN")
    noise.data = (np.random.default_rng(0).standard_normal((16, 256)) * (1 + 1j)).astype(np.complex64)
    mdbs = [noise]
    for m in lines:
        if 60 <= m.cLin < 68:
            ref = copy.deepcopy(m)
            ref.clear_all_flags()
            ref.add_flag("PATREFSCAN")
            mdbs.append(ref)
        for s in (0, 1):
            line = copy.deepcopy(m)
            line.mdh.Counter.Sli = s
            data = np.asarray(m.data) * (1.0 if s == 0 else 0.5)
            if s == 1 and m.cLin == 3:
                line.add_flag("REFLECT")
                data = data[:, ::-1]
            line.data = np.ascontiguousarray(data)
            if s == 0 and 62 <= m.cLin < 66:
                line.add_flag("PATREFSCAN")
                line.add_flag("PATREFANDIMASCAN")
            mdbs.append(line)
    mdbs.append(acqend)
    path = tmp_path / "synthetic.dat"
    with contextlib.redirect_stdout(io.StringIO()):
        twixtools.write_twix(dict(scan, mdb=mdbs), str(path))
    return path


def test_twix_flags_slices_and_reflected_lines(server, twix_path, twix_reference, tmp_path):
    path = synthetic_twix(tmp_path, twix_path)
    out = tmp_path / "synthetic.h5"
    convert(path, out, **quiet())
    header, acquisitions = read_raw(out)
    assert flags(acquisitions[0]) == {"NOISE_MEASUREMENT"} and acquisitions[0].number_of_samples == 256
    reference_only = [a for a in acquisitions if a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)]
    assert [(a.idx.slice, a.idx.kspace_encode_step_1) for a in reference_only] == [(0, k) for k in range(60, 68)]
    embedded = [a for a in acquisitions if a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)]
    assert [(a.idx.slice, a.idx.kspace_encode_step_1) for a in embedded] == [(0, k) for k in range(62, 66)]
    lasts = [a for a in acquisitions if a.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE)]
    assert [(a.idx.slice, a.idx.kspace_encode_step_1) for a in lasts] == [(0, 127), (1, 127)]
    enc = xsd.CreateFromDocument(header).encoding[0]
    assert enc.encodingLimits.slice.maximum == 1
    kspace, _ = twix_reference
    reflected = next(a for a in acquisitions if a.idx.slice == 1 and a.idx.kspace_encode_step_1 == 3
                     and not a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION))
    np.testing.assert_allclose(reflected.data, 0.5 * kspace[:, 3, :], rtol=1e-5, atol=1e-6)  # back in kx order

    images = sorted(served(server, out).images, key=lambda r: r.image.slice)
    assert [r.image.slice for r in images] == [0, 1]
    first, second = (r.image.data[0, 0].astype(np.float64) for r in images)
    # both slices were whitened with the same noise: slice 1 is slice 0 at half the signal
    np.testing.assert_allclose(second, 0.5 * first, rtol=1e-4, atol=1e-6 * first.max())


# ----------------------------------------------------------------------------- bad input
def assert_one_line_error(capsys, out, rc, *words):
    captured = capsys.readouterr()
    assert rc != 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pisf convert: error: ") and "; " in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "a temporary file was left behind"


def test_not_a_twix_file_and_unknown_layouts_give_one_line(tmp_path, capsys):
    out = tmp_path / "out.h5"
    text = tmp_path / "notes.dat"
    text.write_text("this is not raw data\n" * 10)
    assert_one_line_error(capsys, out, pisf(["convert", str(text), "--out", str(out)]), "unknown layout")
    empty = tmp_path / "empty.dat"
    empty.write_bytes(b"")
    assert_one_line_error(capsys, out, pisf(["convert", str(empty), "--out", str(out)]), "unknown layout")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["images"] = np.zeros((2, 3))
    assert_one_line_error(capsys, out, pisf(["convert", str(other), "--out", str(out)]), "unknown layout", "images")
    cmr = tmp_path / "cine.mat"
    with h5py.File(cmr, "w") as f:
        f["kspace_full"] = np.zeros((4, 5, 6), dtype=np.complex64)
    assert_one_line_error(capsys, out, pisf(["convert", str(cmr), "--out", str(out)]), "unknown layout")
    missing = tmp_path / "missing.dat"
    assert_one_line_error(capsys, out, pisf(["convert", str(missing), "--out", str(out)]), "no such file")
    vb = tmp_path / "zeroed_vb.dat"  # a VB measurement header, then zeros: twixtools alone would loop forever
    vb.write_bytes(struct.pack("<II", 20_000, 1) + b"Config\0" + bytes(20_000 - 15) + bytes(4096))
    assert_one_line_error(capsys, out, pisf(["convert", str(vb), "--out", str(out)]), "declares no data")
    stem = tmp_path / "short"
    write_cfl(stem, np.ones((8, 8, 1, 2), dtype=np.complex64))
    stem.with_suffix(".cfl").write_bytes(stem.with_suffix(".cfl").read_bytes()[:100])
    assert_one_line_error(capsys, out, pisf(["convert", str(stem) + ".cfl", "--out", str(out)]), "truncated")


@pytest.mark.parametrize("keep", [20_000, 1_700_000, 3_366_000])
def test_truncated_twix_gives_one_line_and_no_output(twix_path, tmp_path, capsys, keep):
    """Cut in the protocol header, in the middle of the data, and just before the end."""
    cut = tmp_path / "cut.dat"
    with open(twix_path, "rb") as f:
        cut.write_bytes(f.read(keep))
    out = tmp_path / "cut.h5"
    assert_one_line_error(capsys, out, pisf(["convert", str(cut), "--out", str(out)]), "truncated")


def test_cli_bad_input_exit_status_without_traceback(tmp_path):
    bad = tmp_path / "bad.dat"
    bad.write_bytes(bytes(range(256)) * 64)
    run = subprocess.run([sys.executable, "-m", "tools.cli", "convert", str(bad), "--out", str(tmp_path / "o.h5")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and run.stderr.startswith("pisf convert: error: "), \
        run.stderr
    assert not (tmp_path / "o.h5").exists()


# ----------------------------------------------------------------------------- fastMRI
def fastmri_file(path, slices=3, coils=4, nx=64, columns=40, ky_max=35, ky_centre=18):
    """A fastMRI multicoil file as documented: kspace [slice, coil, readout (2x), PE] centred,
    zero-padded PE columns outside the header's ky limits, the scanner's ismrmrd_header,
    reconstruction_rss [slice, 32, 32] (rows = readout)."""
    rng = np.random.default_rng(3)
    ro, pe = np.meshgrid(np.arange(nx) - nx // 2, np.arange(columns) - columns // 2, indexing="ij")
    images = []
    for s in range(slices):  # a bar along the readout, off centre towards +PE, and a dot; moves with the slice
        obj = ((np.abs(ro) < 10) & (pe > 2 + s) & (pe < 8 + s)).astype(float) + ((ro - 6 - s) ** 2 + (pe + 8) ** 2 < 9)
        sens = np.exp(1j * rng.uniform(0, 6.28, (coils, 1, 1))) * (1 + 0.2 * rng.standard_normal((coils, nx, 1)))
        images.append(sens * obj[None])
    kspace = fftc(np.array(images), axes=(-2, -1)).astype(np.complex64)
    first = columns // 2 - ky_centre
    kspace[..., :first] = 0
    kspace[..., first + ky_max + 1:] = 0
    space = lambda x, y, fx, fy: xsd.encodingSpaceType(  # noqa: E731
        matrixSize=xsd.matrixSizeType(x=x, y=y, z=1), fieldOfView_mm=xsd.fieldOfViewMm(x=fx, y=fy, z=4.5))
    header = xsd.ismrmrdHeader(
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(systemVendor="SIEMENS", receiverChannels=coils),
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=123_000_000),
        encoding=[xsd.encodingType(
            trajectory=xsd.trajectoryType.CARTESIAN, encodedSpace=space(nx, columns, 280.0, 140.0),
            reconSpace=space(32, 32, 140.0, 140.0),
            encodingLimits=xsd.encodingLimitsType(
                kspace_encoding_step_1=xsd.limitType(minimum=0, maximum=ky_max, center=ky_centre),
                slice=xsd.limitType(minimum=0, maximum=0, center=0)))])
    coil_images = ifftc(kspace, axes=(-2, -1))
    reconstruction = rss(coil_images, axis=1)[:, nx // 2 - 16: nx // 2 + 16, columns // 2 - 16: columns // 2 + 16]
    with h5py.File(path, "w") as f:
        f["kspace"] = kspace
        f["ismrmrd_header"] = xsd.ToXML(header).encode()
        f["reconstruction_rss"] = reconstruction.astype(np.float32)
        f.attrs.update(acquisition="CORPD_FBK", max=float(reconstruction.max()), norm=1.0, patient_id="synthetic")
    return kspace, reconstruction


def test_fastmri_multicoil_converts_with_padding_counters_and_orientation(server, tmp_path):
    path = tmp_path / "file1000000.h5"
    kspace, reconstruction = fastmri_file(path)
    out = tmp_path / "fastmri.h5"
    convert(path, out, **quiet())
    header, acquisitions = read_raw(out)
    # the zero-padded PE columns 0, 1, 38, 39 are not lines; steps 0..35 per slice, slice by slice
    assert len(acquisitions) == 3 * 36
    assert [(a.idx.slice, a.idx.kspace_encode_step_1) for a in acquisitions] == [(s, k) for s in range(3) for k in range(36)]
    assert [a.idx.slice for a in acquisitions if a.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE)] == [0, 1, 2]
    np.testing.assert_array_equal(acquisitions[5].data, kspace[0, :, :, 2 + 5])  # column = step + first column
    positions = sorted({a.position[2] for a in acquisitions})
    assert np.allclose(np.diff(positions), 4.5)  # default geometry: slices a thickness apart
    images = served(server, out).images
    assert [r.image.slice for r in images] == [0, 1, 2]
    for received in images:
        image = received.image.data[0, 0]
        assert image.shape == (32, 32)  # [y = PE, x = readout]
        # fastMRI's own image has rows = readout: ours is its transpose
        np.testing.assert_allclose(image, reconstruction[received.image.slice].T, rtol=1e-4,
                                   atol=1e-5 * reconstruction.max())
    truth = read_groundtruth(out)
    np.testing.assert_allclose(truth.rss[:, 0], reconstruction.transpose(0, 2, 1), rtol=1e-4,
                               atol=1e-5 * reconstruction.max())


def test_fastmri_masks_follow_fastmri(tmp_path):
    path = tmp_path / "file1000001.h5"
    fastmri_file(path, slices=2, columns=200, ky_max=199, ky_centre=100, nx=16)
    out = tmp_path / "r4.h5"
    convert(path, out, undersampling=Undersampling("fastmri", 4, seed=5), **quiet())
    _, acquisitions = read_raw(out)
    kys = {s: [a.idx.kspace_encode_step_1 for a in acquisitions if a.idx.slice == s] for s in (0, 1)}
    assert kys[0] == kys[1]  # one mask per volume, as fastMRI
    centre = [a.idx.kspace_encode_step_1 for a in acquisitions
              if a.idx.slice == 0 and a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)]
    assert centre == list(range(92, 108))  # 8 % of 200 lines around the centre line 100
    assert 35 <= len(kys[0]) <= 65  # about 200 / 4
    mask = read_groundtruth(out, arrays=True).arrays["mask"]
    assert mask.shape == (2, 1, 200) and mask[0, 0].sum() == len(kys[0])


# ----------------------------------------------------------------------------- CMRxRecon
def cmrxrecon_file(path, frames=3, slices=2, coils=4, ny=24, nx=32, variable="kspace_full", mask=None):
    """MATLAB v7.3 as the challenge stores it: `kspace_full` (kx, ky, coil, slice, frame) complex,
    i.e. HDF5 [frame, slice, coil, ky, kx] of a real/imag compound, after a 512-byte MAT header."""
    rng = np.random.default_rng(4)
    y, x = np.meshgrid(np.arange(ny) - ny // 2, np.arange(nx) - nx // 2, indexing="ij")
    images = np.zeros((frames, slices, coils, ny, nx), dtype=np.complex128)
    for t in range(frames):
        for s in range(slices):  # a heart-like disc whose radius beats with the frame, off centre in y
            obj = ((y - 4) ** 2 + (x + s) ** 2 < (4 + t) ** 2) + 0.5 * (np.abs(x) < 12) * (np.abs(y + 6) < 2)
            images[t, s] = rng.uniform(0.5, 1.5, (coils, 1, 1)) * np.exp(0.3j * x / nx) * obj
    kspace = fftc(images, axes=(-2, -1))
    if mask is not None:
        kspace = kspace * mask
    compound = np.empty(kspace.shape, dtype=[("real", "<f4"), ("imag", "<f4")])
    compound["real"], compound["imag"] = kspace.real, kspace.imag
    with h5py.File(path, "w", userblock_size=512) as f:
        f[variable] = compound
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 .")
    return kspace


def test_cmrxrecon_cine_streams_slice_by_slice_and_phase_by_phase(server, tmp_path):
    path = tmp_path / "cine_sax.mat"
    kspace = cmrxrecon_file(path)
    out = tmp_path / "cine.h5"
    convert(path, out, **quiet())
    _, acquisitions = read_raw(out)
    order = [(a.idx.slice, a.idx.phase) for a in acquisitions]
    assert order == [(s, t) for s in range(2) for t in range(3) for _ in range(24)]
    lasts = [(a.idx.slice, a.idx.phase) for a in acquisitions if a.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE)]
    assert lasts == [(s, t) for s in range(2) for t in range(3)]
    assert np.all(np.diff([a.acquisition_time_stamp for a in acquisitions]) > 0)
    assert [acquisitions[24 * t].physiology_time_stamp[0] for t in range(3)] == [0, 133, 267]  # 1000 ms / 3 frames
    images = served(server, out).images
    assert [(r.image.slice, r.image.phase) for r in images] == [(s, t) for s in range(2) for t in range(3)]
    reference = rss(ifftc(kspace, axes=(-2, -1)), axis=2)  # the challenge's ifft2c over (ky, kx), RSS over coils
    for received in images:
        image = received.image.data[0, 0]
        assert image.shape == (24, 32)  # [y = ky, x = kx]
        np.testing.assert_allclose(image, reference[received.image.phase, received.image.slice], rtol=1e-4,
                                   atol=1e-5 * reference.max())
    truth = read_groundtruth(out)
    assert truth.rss.shape == (2, 3, 24, 32)


def test_cmrxrecon_kt_mask_moves_with_the_frame_and_undersampled_input_converts_as_is(tmp_path, capsys):
    path = tmp_path / "cine_lax.mat"
    cmrxrecon_file(path, frames=4, slices=1, ny=48)
    out = tmp_path / "kt.h5"
    convert(path, out, undersampling=Undersampling("cmrxrecon-kt", 4), **quiet())
    _, acquisitions = read_raw(out)
    by_phase = {t: {a.idx.kspace_encode_step_1 for a in acquisitions if a.idx.phase == t} for t in range(4)}
    centre = set(range(16, 32))
    assert all(centre <= kys for kys in by_phase.values())
    outer = [sorted(kys - centre) for kys in by_phase.values()]
    assert outer[0] == [0, 4, 8, 12, 32, 36, 40, 44] and outer[1] == [1, 5, 9, 13, 33, 37, 41, 45]
    assert len({tuple(o) for o in outer}) == 4

    # a challenge `kspace_sub04` variable (zeros where not acquired, 24-line centre) converts as it is
    mask = np.zeros((48, 1), dtype=bool)
    mask[::4] = True
    mask[12:36] = True
    sub = tmp_path / "sub.mat"
    cmrxrecon_file(sub, frames=2, slices=1, ny=48, variable="kspace_sub04", mask=mask)
    out = tmp_path / "sub.h5"
    convert(sub, out, **quiet())
    _, acquisitions = read_raw(out)
    assert len(acquisitions) == 2 * int(mask.sum())
    calibration = {a.idx.kspace_encode_step_1 for a in acquisitions
                   if a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)}
    assert calibration == set(range(12, 37))  # the centre block and the next sampled line, contiguous
    assert read_groundtruth(out) is None
    rc = pisf(["convert", str(sub), "--out", str(tmp_path / "again.h5"), "--undersample", "equispaced"])
    assert_one_line_error(capsys, tmp_path / "again.h5", rc, "already undersampled")


# ----------------------------------------------------------------------------- BART
def test_bart_cfl_with_time_frames(server, tmp_path):
    rng = np.random.default_rng(6)
    nx, ny, coils, frames = 30, 20, 3, 2
    images = np.zeros((frames, coils, ny, nx), dtype=np.complex128)
    for t in range(frames):
        images[t, :, 3:8 + t, 5:25] = rng.uniform(0.5, 1.5, (coils, 1, 1))  # a bar near the top, growing in y
    kspace = fftc(images, axes=(-2, -1))
    cfl = np.zeros((nx, ny, 1, coils) + (1,) * 6 + (frames,), dtype=np.complex64)
    cfl[:, :, 0, :, 0, 0, 0, 0, 0, 0, :] = np.transpose(kspace, (3, 2, 1, 0))  # READ, PHS1, COIL, TIME
    write_cfl(tmp_path / "ksp", cfl)
    out = tmp_path / "bart.h5"
    convert(tmp_path / "ksp.cfl", out, **quiet())
    _, acquisitions = read_raw(out)
    assert [(a.idx.phase, a.idx.kspace_encode_step_1) for a in acquisitions] == [(t, k) for t in range(2) for k in range(ny)]
    assert acquisitions[0].number_of_samples == nx
    reference = rss(images, axis=1)
    for received in served(server, out).images:
        np.testing.assert_allclose(received.image.data[0, 0], reference[received.image.phase], rtol=1e-4, atol=1e-5)


def test_bart_poisson_brain_converts_without_ground_truth(server, tmp_path, capsys):
    if not BRAIN_CFL.is_file():
        pytest.skip("../shared/data is absent")
    out = tmp_path / "brain.h5"
    assert pisf(["convert", str(BRAIN_CFL), "--out", str(out)]) == 0
    assert "no ground truth" in capsys.readouterr().err
    header, acquisitions = read_raw(out)
    assert acquisitions[0].number_of_samples == 180 and acquisitions[0].active_channels == 8
    [received] = served(server, out).images
    assert received.image.data.shape[-2:] == (230, 180)
    assert read_groundtruth(out) is None


# ----------------------------------------------------------------------------- masks
def test_masks():
    rng = np.random.default_rng(0)
    pattern, calibration = ky_mask("equispaced", 128, 64, 4, 24, rng)
    assert np.flatnonzero(calibration).tolist() == list(range(52, 76))
    assert np.flatnonzero(pattern).tolist() == list(range(0, 128, 4))
    pattern, calibration = ky_mask("random", 128, 64, 4, 16, rng)
    assert (pattern | calibration).sum() == 32 and not (pattern & calibration).any()
    pattern, calibration = ky_mask("cmrxrecon", 100, 50, 8, None, rng)
    assert calibration.sum() == 24 and pattern[50] and pattern[42] and not pattern[43]
    pattern, calibration = ky_mask("fastmri-equispaced", 320, 160, 8, None, rng)
    assert calibration.sum() == 13  # 4 % of 320
    assert 320 / 8 - 3 <= (pattern | calibration).sum() <= 320 / 8 + 3
