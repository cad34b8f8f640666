"""DICOM MR images from ISMRMRD images, for consoles and PACS (pydicom; no torch).

One DICOM file (MR Image Storage, Explicit VR Little Endian) per image plane, one series per
`image_series_index`. Geometry comes from the ISMRMRD image header; ISMRMRD and DICOM both use
patient coordinates LPS, so the vectors go over unchanged:

- rows of the pixel array run along `phase_dir` (y), columns along `read_dir` (x):
  ImageOrientationPatient = read_dir + phase_dir;
- PixelSpacing = [fov_y / ny (row spacing), fov_x / nx (column spacing)];
- `position` is the image centre in the centred-FFT sense: pixel (ny // 2, nx // 2) lies there
  (for odd sizes that is the exact centre of the field of view). The top-left pixel centre is
  ImagePositionPatient = position - (nx // 2) dx read_dir - (ny // 2) dy phase_dir, which is
  the corner Gadgetron's own DICOM finishing writes for even matrices;
- SliceThickness = fov_z / nz; a 3D image becomes nz files offset along slice_dir.

UIDs are derived deterministically (pydicom.uid.generate_uid with entropy sources): the study
UID from a study key (the measurement_uid, or what the caller gives), the series UID from the
study UID and the series index, the SOP instance UID from the series UID and the image index
(and plane), so re-exporting the same images gives the same UIDs and every image of a series
shares one SeriesInstanceUID.
"""
from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import ismrmrd
import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_PYDICOM_MAJOR = int(pydicom.__version__.split(".")[0])


def image_meta(image: ismrmrd.Image) -> dict:
    """The image's meta attributes as a dict (works with ismrmrd 1.14 and 1.15)."""
    text = image.attribute_string
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = (text or "").rstrip("\0")
    if not text:
        return {}
    try:
        return dict(ismrmrd.Meta.deserialize(text))
    except Exception:
        return {}


def _first(value):
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _number(value) -> float | None:
    try:
        return float(_first(value))
    except (TypeError, ValueError):
        return None


@dataclass
class Geometry:
    """Per-plane DICOM geometry of an ISMRMRD image header."""

    orientation: list[float]          # ImageOrientationPatient (row cosines = read_dir, column = phase_dir)
    spacing: list[float]              # PixelSpacing [row spacing (y), column spacing (x)]
    thickness: float
    positions: list[list[float]]      # ImagePositionPatient of pixel (0, 0), one per plane
    slice_locations: list[float] = field(default_factory=list)


def geometry(head: ismrmrd.ImageHeader) -> Geometry:
    nx, ny, nz = (int(v) for v in head.matrix_size)
    fov = np.array([float(v) for v in head.field_of_view], dtype=np.float64)
    read = np.array(head.read_dir[:], dtype=np.float64)
    phase = np.array(head.phase_dir[:], dtype=np.float64)
    normal = np.array(head.slice_dir[:], dtype=np.float64)
    if not np.any(normal):
        normal = np.cross(read, phase)
    centre = np.array(head.position[:], dtype=np.float64)
    dx, dy = fov[0] / max(nx, 1), fov[1] / max(ny, 1)
    dz = fov[2] / max(nz, 1)
    corner = centre - (nx // 2) * dx * read - (ny // 2) * dy * phase
    positions, locations = [], []
    for z in range(max(nz, 1)):
        plane = corner + (z - nz // 2) * dz * normal if nz > 1 else corner
        positions.append([float(v) for v in plane])
        locations.append(float(np.dot(centre + ((z - nz // 2) * dz * normal if nz > 1 else 0), normal)))
    return Geometry(orientation=[float(v) for v in np.concatenate([read, phase])],
                    spacing=[float(dy), float(dx)], thickness=float(dz), positions=positions,
                    slice_locations=locations)


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.8e}"[:16]


def study_uid(key: str) -> str:
    return generate_uid(entropy_srcs=["pisf-study", str(key)])


def series_uid(study: str, series_index: int) -> str:
    return generate_uid(entropy_srcs=["pisf-series", study, str(series_index)])


def instance_uid(series: str, image_index: int, plane: int = 0, ordinal: int = 0) -> str:
    return generate_uid(entropy_srcs=["pisf-image", series, str(image_index), str(plane), str(ordinal)])


def _pixels(image: ismrmrd.Image) -> tuple[np.ndarray, float, float]:
    """[z, y, x] pixels as uint16/int16, plus (rescale slope, intercept) for float data."""
    data = np.asarray(image.data)
    data = data.reshape((-1,) + data.shape[-3:])[0]  # first channel: [z, y, x]
    if np.iscomplexobj(data):
        data = np.abs(data)
    if data.dtype in (np.uint16, np.int16):
        return data, 1.0, 0.0
    if np.issubdtype(data.dtype, np.integer) and data.min() >= 0 and data.max() <= 65535:
        return data.astype(np.uint16), 1.0, 0.0
    data = data.astype(np.float64)
    low, high = float(data.min()), float(data.max())
    slope = (high - low) / 4095.0 if high > low else 1.0
    return np.rint((data - low) / slope).astype(np.uint16), slope, low


def _patient(header) -> dict:
    info = {"PatientName": "Anonymous", "PatientID": "PISF", "StudyDate": None, "StudyTime": None,
            "StudyDescription": "", "StudyID": "1", "AccessionNumber": "", "StudyInstanceUID": None,
            "Manufacturer": "", "ManufacturerModelName": "", "MagneticFieldStrength": None,
            "InstitutionName": "", "ProtocolName": "", "FrameOfReferenceUID": None}
    if header is None:
        return info
    subject = getattr(header, "subjectInformation", None)
    if subject is not None:
        info["PatientName"] = getattr(subject, "patientName", None) or info["PatientName"]
        info["PatientID"] = getattr(subject, "patientID", None) or info["PatientID"]
    study = getattr(header, "studyInformation", None)
    if study is not None:
        for ours, theirs in (("StudyDescription", "studyDescription"), ("StudyID", "studyID"),
                             ("AccessionNumber", "accessionNumber"), ("StudyInstanceUID", "studyInstanceUID")):
            value = getattr(study, theirs, None)
            if value:
                info[ours] = str(value)
        for ours, theirs in (("StudyDate", "studyDate"), ("StudyTime", "studyTime")):
            value = getattr(study, theirs, None)
            if value is not None:
                info[ours] = re.sub(r"[^0-9.]", "", str(value))[:14]
    system = getattr(header, "acquisitionSystemInformation", None)
    if system is not None:
        info["Manufacturer"] = getattr(system, "systemVendor", None) or ""
        info["ManufacturerModelName"] = getattr(system, "systemModel", None) or ""
        info["MagneticFieldStrength"] = getattr(system, "systemFieldStrength_T", None)
        info["InstitutionName"] = getattr(system, "institutionName", None) or ""
    measurement = getattr(header, "measurementInformation", None)
    if measurement is not None:
        info["ProtocolName"] = getattr(measurement, "protocolName", None) or ""
        info["FrameOfReferenceUID"] = getattr(measurement, "frameOfReferenceUID", None)
    return info


class DicomWriter:
    """Writes ismrmrd.Images as DICOM MR images under one study.

    `study_key` fixes the StudyInstanceUID (default: the ISMRMRD header's studyInstanceUID, else
    the first image's measurement_uid); `header` (ismrmrd.xsd header, optional) adds patient,
    study and system information.
    """

    def __init__(self, directory: Path | str, header=None, study_key: str | None = None):
        self.directory = Path(directory)
        self.header_info = _patient(header)
        self.study_key = study_key
        self.study_uid: str | None = self.header_info["StudyInstanceUID"]
        self.written: list[Path] = []
        self._ordinals: dict[tuple, int] = {}
        self._instances: dict[int, int] = {}  # series index -> last InstanceNumber (1, 2, ... per series)
        self.now = datetime.datetime.now()

    def _study(self, head) -> str:
        if self.study_uid is None:
            self.study_uid = study_uid(self.study_key if self.study_key is not None else head.measurement_uid)
        return self.study_uid

    def write(self, image: ismrmrd.Image) -> list[Path]:
        head = image.getHead()
        meta = image_meta(image)
        study = self._study(head)
        series_index = int(head.image_series_index)
        series = series_uid(study, series_index)
        geo = geometry(head)
        pixels, slope, intercept = _pixels(image)
        signed = pixels.dtype == np.int16
        # the same (series, image index) twice (e.g. several contrasts numbered alike) still gets new UIDs
        index_key = (series_index, int(head.image_index))
        ordinal = self._ordinals.get(index_key, 0)
        self._ordinals[index_key] = ordinal + 1
        description = str(_first(meta.get("SeriesDescription")) or _first(meta.get("ImageComment"))
                          or _first(meta.get("GADGETRON_SeriesDescription")) or f"PISF series {series_index}")
        comment = str(_first(meta.get("ImageComment")) or _first(meta.get("GADGETRON_ImageComment")) or description)
        centre = _number(meta.get("WindowCenter", meta.get("GADGETRON_WindowCenter")))
        width = _number(meta.get("WindowWidth", meta.get("GADGETRON_WindowWidth")))
        series_dir = self.directory / f"series_{series_index:03d}"
        series_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        nz = pixels.shape[0]
        for z in range(nz):
            sop = instance_uid(series, int(head.image_index), z, ordinal)
            ds = self._dataset(sop)
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series
            ds.SeriesNumber = series_index
            ds.SeriesDescription = description[:64]
            ds.ImageComments = comment[:10240]
            self._instances[series_index] = ds.InstanceNumber = self._instances.get(series_index, 0) + 1
            ds.AcquisitionNumber = int(head.repetition) + 1
            ds.ImageType = ["DERIVED", "PRIMARY", "M", "PISF"]
            ds.ImagePositionPatient = [_ds(v) for v in geo.positions[z]]
            ds.ImageOrientationPatient = [_ds(v) for v in geo.orientation]
            ds.PixelSpacing = [_ds(v) for v in geo.spacing]
            ds.SliceThickness = _ds(geo.thickness)
            ds.SliceLocation = _ds(geo.slice_locations[z])
            ds.FrameOfReferenceUID = self.header_info["FrameOfReferenceUID"] or generate_uid(
                entropy_srcs=["pisf-frame", study])
            ds.PositionReferenceIndicator = ""
            ds.Rows, ds.Columns = int(pixels.shape[1]), int(pixels.shape[2])
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1 if signed else 0
            if slope != 1.0 or intercept != 0.0:
                ds.RescaleSlope = _ds(slope)
                ds.RescaleIntercept = _ds(intercept)
                ds.RescaleType = "US"
            if centre is not None and width is not None:
                ds.WindowCenter = _ds(centre)
                ds.WindowWidth = _ds(max(width, 1.0))
            plane = np.ascontiguousarray(pixels[z].astype("<i2" if signed else "<u2"))
            ds.PixelData = plane.tobytes()
            path = series_dir / f"IM_{ds.InstanceNumber:06d}.dcm"
            if _PYDICOM_MAJOR >= 3:
                ds.save_as(path, enforce_file_format=True)
            else:
                ds.is_little_endian, ds.is_implicit_VR = True, False
                ds.save_as(path, write_like_original=False)
            paths.append(path)
        self.written.extend(paths)
        return paths

    def _dataset(self, sop: str) -> FileDataset:
        file_meta = FileMetaDataset()
        file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        file_meta.MediaStorageSOPInstanceUID = sop
        file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        file_meta.ImplementationClassUID = generate_uid(entropy_srcs=["pisf-inline implementation"])
        file_meta.ImplementationVersionName = "PISF_INLINE_01"
        ds = FileDataset(None, {}, file_meta=file_meta, preamble=b"\0" * 128)
        info = self.header_info
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = sop
        ds.Modality = "MR"
        ds.PatientName = str(info["PatientName"])
        ds.PatientID = str(info["PatientID"])
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyDate = info["StudyDate"] or self.now.strftime("%Y%m%d")
        ds.StudyTime = info["StudyTime"] or self.now.strftime("%H%M%S")
        ds.ContentDate = self.now.strftime("%Y%m%d")
        ds.ContentTime = self.now.strftime("%H%M%S")
        ds.StudyID = str(info["StudyID"])[:16]
        ds.AccessionNumber = str(info["AccessionNumber"])[:16]
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = str(info["StudyDescription"])[:64]
        ds.Manufacturer = str(info["Manufacturer"])[:64]
        ds.ManufacturerModelName = str(info["ManufacturerModelName"])[:64]
        ds.InstitutionName = str(info["InstitutionName"])[:64]
        ds.ProtocolName = str(info["ProtocolName"])[:64]
        if info["MagneticFieldStrength"]:
            ds.MagneticFieldStrength = _ds(float(info["MagneticFieldStrength"]))
        ds.ScanningSequence = "RM"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SoftwareVersions = "pisf-inline"
        return ds


def write_dicom(images: Iterable[ismrmrd.Image], directory: Path | str, header=None,
                study_key: str | None = None) -> list[Path]:
    """Write every image (one series per image_series_index); returns the files written."""
    writer = DicomWriter(directory, header=header, study_key=study_key)
    for image in images:
        writer.write(image)
    return writer.written


def read_image_groups(path: Path | str, group: str | None = None) -> tuple[str, list[ismrmrd.Image]]:
    """Images of `<group>/image_*` in an ISMRMRD file (`pisf replay --out`); default: the last group."""
    import h5py

    with h5py.File(path, "r") as f:
        groups = [name for name in f.keys() if isinstance(f[name], h5py.Group)
                  and any(k.startswith("image_") for k in f[name].keys())]
        if not groups:
            raise ValueError(f"{path}: no image groups (expected <group>/image_<series>)")
        if group is None:
            group = sorted(groups)[-1]
        elif group not in groups:
            raise ValueError(f"{path}: no image group {group!r} (have: {', '.join(groups)})")
        names = sorted(k for k in f[group].keys() if k.startswith("image_"))
    dataset = ismrmrd.Dataset(str(path), group, create_if_needed=False)
    try:
        images = []
        for name in names:
            for number in range(dataset.number_of_images(name)):
                images.append(dataset.read_image(name, number))
    finally:
        dataset.close()
    return group, images
