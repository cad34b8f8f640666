"""DICOM export: geometry, UIDs, windowing, series naming (gadgets/formats/dicom.py, `pisf dicom`)."""
from __future__ import annotations

import argparse

import ismrmrd
import numpy as np
import pydicom
import pytest

from gadgets.formats.dicom import geometry, write_dicom
from gadgets.wire.client import ReceivedImage, ReplayResult, write_images
from tools import cli

pytestmark = pytest.mark.timeout(60)


def _rotation(alpha: float, beta: float, gamma: float) -> np.ndarray:
    ca, sa, cb, sb, cg, sg = np.cos(alpha), np.sin(alpha), np.cos(beta), np.sin(beta), np.cos(gamma), np.sin(gamma)
    rz = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rx = np.array([[1, 0, 0], [0, cg, -sg], [0, sg, cg]])
    return rz @ ry @ rx


ROT = _rotation(0.3, -0.5, 0.7)  # a double-oblique orientation
READ, PHASE, SLICE = ROT[:, 0], ROT[:, 1], ROT[:, 2]
NX, NY = 96, 80
FOV = (240.0, 200.0, 5.0)


def make_image(series: int, index: int, slice_number: int, comment: str, centre=100.0, width=300.0,
               dtype=np.uint16) -> ismrmrd.Image:
    pixels = (np.arange(NY * NX).reshape(1, NY, NX) % 4000).astype(dtype)
    image = ismrmrd.Image.from_array(pixels, transpose=False)
    head = image.getHead()
    head.field_of_view = FOV
    head.position = tuple(float(v) for v in (np.array([10.0, -20.0, 30.0]) + slice_number * 6.0 * SLICE))
    head.read_dir = tuple(float(v) for v in READ)
    head.phase_dir = tuple(float(v) for v in PHASE)
    head.slice_dir = tuple(float(v) for v in SLICE)
    head.image_series_index = series
    head.image_index = index
    head.slice = slice_number
    head.measurement_uid = 4242
    image.setHead(head)
    image.data[:] = pixels.reshape(image.data.shape)
    meta = ismrmrd.Meta({"ImageComment": comment, "SeriesDescription": comment,
                         "WindowCenter": f"{centre:.1f}", "WindowWidth": f"{width:.1f}"})
    image.attribute_string = meta.serialize()
    return image


def images():
    out = []
    for series, comment in ((1, "zero-filled"), (2, "PISF fast, R 4.0")):
        for index, s in enumerate(range(3), 1):
            out.append(make_image(series, index, s, comment, centre=100.0 * series, width=300.0 + series))
    return out


def pixel_position(ds, row: float, column: float) -> np.ndarray:
    """Patient position of pixel (row, column) by the DICOM equation (C.7.6.2.1.1)."""
    orientation = np.array(ds.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    return (np.array(ds.ImagePositionPatient, dtype=float) + orientation[:3] * column_spacing * column
            + orientation[3:] * row_spacing * row)


def test_series_geometry_uids_and_windows(tmp_path):
    source = images()
    paths = write_dicom(source, tmp_path)
    assert len(paths) == 6
    datasets = [pydicom.dcmread(p) for p in paths]
    for ds, image in zip(datasets, source):
        head = image.getHead()
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.Modality == "MR" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert (ds.Rows, ds.Columns) == (NY, NX)
        np.testing.assert_array_equal(ds.pixel_array, np.asarray(image.data)[0, 0])
        assert ds.pixel_array.dtype == np.uint16 and ds.PixelRepresentation == 0
        # orientation, spacing, thickness
        np.testing.assert_allclose(np.array(ds.ImageOrientationPatient, float), np.concatenate([READ, PHASE]),
                                   atol=1e-5)
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [FOV[1] / NY, FOV[0] / NX], rtol=1e-5)
        assert float(ds.SliceThickness) == pytest.approx(FOV[2])
        # pixel (0, 0): the top-left pixel centre; pixel (ny/2, nx/2): the ISMRMRD image position
        centre = np.array(head.position[:], float)
        expected_corner = centre - NX // 2 * FOV[0] / NX * READ - NY // 2 * FOV[1] / NY * PHASE
        np.testing.assert_allclose(pixel_position(ds, 0, 0), expected_corner, atol=1e-3)
        np.testing.assert_allclose(pixel_position(ds, NY // 2, NX // 2), centre, atol=1e-3)
        # the far corner pixel centre stays inside the field of view by half a pixel
        far = pixel_position(ds, NY - 1, NX - 1) - centre
        assert np.dot(far, READ) == pytest.approx(FOV[0] / 2 - FOV[0] / NX, abs=1e-3)
        assert np.dot(far, PHASE) == pytest.approx(FOV[1] / 2 - FOV[1] / NY, abs=1e-3)
        # windowing and naming from the meta
        series = head.image_series_index
        assert float(ds.WindowCenter) == pytest.approx(100.0 * series)
        assert float(ds.WindowWidth) == pytest.approx(300.0 + series)
        assert ds.SeriesNumber == series
        assert ds.SeriesDescription == ("zero-filled" if series == 1 else "PISF fast, R 4.0")
    by_series = {}
    for ds in datasets:
        by_series.setdefault(ds.SeriesNumber, []).append(ds)
    assert sorted(by_series) == [1, 2]
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    series_uids = {n: {ds.SeriesInstanceUID for ds in group} for n, group in by_series.items()}
    assert all(len(uids) == 1 for uids in series_uids.values())  # stable within a series
    assert series_uids[1] != series_uids[2]  # different across series
    assert len({ds.SOPInstanceUID for ds in datasets}) == 6
    for group in by_series.values():
        assert [ds.InstanceNumber for ds in group] == [1, 2, 3]
        locations = [float(ds.SliceLocation) for ds in group]
        assert locations == sorted(locations)
    # deterministic: the same images give the same UIDs
    again = [pydicom.dcmread(p) for p in write_dicom(images(), tmp_path / "again")]
    assert [ds.SOPInstanceUID for ds in again] == [ds.SOPInstanceUID for ds in datasets]
    assert again[0].StudyInstanceUID == datasets[0].StudyInstanceUID


def test_signed_and_float_images(tmp_path):
    signed = make_image(3, 1, 0, "signed", dtype=np.int16)
    ds = pydicom.dcmread(write_dicom([signed], tmp_path)[0])
    assert ds.PixelRepresentation == 1 and ds.pixel_array.dtype == np.int16
    floating = make_image(4, 1, 0, "float", dtype=np.float32)
    ds = pydicom.dcmread(write_dicom([floating], tmp_path)[0])
    values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(values, np.asarray(floating.data)[0, 0], atol=float(ds.RescaleSlope))


def test_geometry_of_a_3d_image():
    image = make_image(1, 1, 0, "3d")
    head = image.getHead()
    head.matrix_size = (NX, NY, 4)
    head.field_of_view = (FOV[0], FOV[1], 20.0)
    geo = geometry(head)
    assert geo.thickness == pytest.approx(5.0)
    steps = np.diff(np.array(geo.positions), axis=0)
    np.testing.assert_allclose(steps, np.tile(5.0 * SLICE, (3, 1)), atol=1e-6)


def test_pisf_dicom_subcommand(tmp_path):
    result = ReplayResult(images=[ReceivedImage(image, None) for image in images()])
    h5 = tmp_path / "images.h5"
    group = write_images(result, h5, "replay one")
    assert cli.main(["dicom", str(h5), "--out", str(tmp_path / "dcm"), "--group", group]) == 0
    files = sorted((tmp_path / "dcm").rglob("*.dcm"))
    assert len(files) == 6
    assert sorted({f.parent.name for f in files}) == ["series_001", "series_002"]
    assert pydicom.dcmread(files[0]).SeriesDescription == "zero-filled"


def test_pisf_dicom_takes_the_latest_written_group_not_the_alphabetically_last(tmp_path, capsys):
    h5 = tmp_path / "images.h5"
    older = ReplayResult(images=[ReceivedImage(image, None) for image in images()[:3]])   # series 1 only
    newer = ReplayResult(images=[ReceivedImage(image, None) for image in images()[3:]])   # series 2 only
    write_images(older, h5, "pisf_zerofill_20261203_120000")
    write_images(newer, h5, "custom_name")  # written later, sorts first
    assert cli.main(["dicom", str(h5), "--out", str(tmp_path / "dcm")]) == 0
    out = capsys.readouterr().out
    assert "from group 'custom_name' (the latest of 2 groups; --group picks another)" in out, out
    assert sorted({f.parent.name for f in (tmp_path / "dcm").rglob("*.dcm")}) == ["series_002"]
    # appending to the older group again makes it the latest
    write_images(older, h5, "pisf_zerofill_20261203_120000")
    assert cli.main(["dicom", str(h5), "--out", str(tmp_path / "dcm2")]) == 0
    assert "from group 'pisf_zerofill_20261203_120000'" in capsys.readouterr().out


def test_pisf_dicom_on_raw_data_or_a_text_file_says_what_to_do(tmp_path, capsys):
    from tools.rawdata.simulate import simulate

    raw = tmp_path / "raw.h5"
    simulate(raw, matrix=16, coils=1, accel=1, acs=4, slices=1, noise=0.0, seed=1)
    notes = tmp_path / "notes.txt"
    notes.write_text("not images\n")
    for path, expected in ((raw, f"{raw} holds ISMRMRD raw data, not images; reconstruct it first: "
                                 f"`pisf replay {raw} -o images.h5`"),
                           (notes, f"{notes} is not an HDF5 file; give an ISMRMRD HDF5 file")):
        code = cli.main(["dicom", str(path), "--out", str(tmp_path / "dcm")])
        err = capsys.readouterr().err
        assert code != 0
        assert err.splitlines() == [err.strip()] and err.startswith(f"pisf dicom: error: {expected}"), err
        assert not (tmp_path / "dcm").exists()
