"""fastMRI multicoil .h5 -> a `Source` for `pisf convert`.

Layout (fastMRI's data documentation and its SliceDataset): `kspace` complex64 [slice, coil,
readout (2x oversampled), phase encode] in the centred convention (image = fftshift(ifft2(
ifftshift(k)))); `ismrmrd_header` the scanner's ISMRMRD XML header, whose encoded matrix is the
k-space's (readout, PE) size and whose kspace_encoding_step_1 limits say which PE columns hold
acquired lines: columns ny // 2 - centre .. that + maximum (the rest is zero padding);
`reconstruction_rss` [slice, 320, 320] (train/val files; rows = readout); `mask` [PE] in
undersampled (test/challenge) files. Attributes `acquisition`, `max`, `norm`, `patient_id`.

Converted as the scanner header says (encoding, FOV, limits, system), with per-slice lines:
kspace_encode_step_1 = column - first acquired column. The files carry no slice geometry:
axial directions and slice positions one slice thickness apart are written, with a warning.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from gadgets.wire.validate import ScanIdentity
from tools.rawdata.source import (ArrayImage, ConvertError, Source, array_header, array_lines, default_positions,
                                  id_part)


def _file_header(header_text: str | None, nx: int, columns: int, warnings: list[str]):
    """The file's own ISMRMRD header when it parses and describes the k-space, else None (with a
    warning saying why; the caller then builds one)."""
    import ismrmrd.xsd as xsd

    if not header_text:
        warnings.append("no ismrmrd_header in the file: header built for 2x readout oversampling, FOV 256 mm")
        return None
    try:
        header = xsd.CreateFromDocument(header_text.rstrip("\0"))
        size = header.encoding[0].encodedSpace.matrixSize
        if (int(size.x), int(size.y)) != (nx, columns):
            warnings.append(f"the file's ISMRMRD header says encoded {size.x}x{size.y}, the k-space is "
                            f"{nx}x{columns}: header rebuilt from the k-space")
            return None
    except Exception as exc:  # noqa: BLE001 - any parser error: fall back to a built header
        warnings.append(f"the file's ismrmrd_header does not parse ({type(exc).__name__}): header rebuilt")
        return None
    return header


def read_fastmri_source(path: Path) -> Source:
    import h5py
    import ismrmrd.xsd as xsd

    warnings = []
    with h5py.File(path, "r") as f:
        if "kspace" not in f:
            raise ConvertError(f"{path}: unknown layout: no `kspace` dataset (fastMRI multicoil files have one)")
        dataset = f["kspace"]
        if dataset.ndim != 4 or not np.iscomplexobj(np.empty(0, dataset.dtype)):
            raise ConvertError(f"{path}: unknown layout: fastMRI multicoil `kspace` is complex [slice, coil, readout, PE], "
                               f"this one is {dataset.dtype} {dataset.shape}"
                               + (" (a single-coil file?)" if dataset.ndim == 3 else ""))
        slices, coils, nx, columns = (int(v) for v in dataset.shape)
        header_text = f["ismrmrd_header"][()] if "ismrmrd_header" in f else None
        mask = np.asarray(f["mask"][()]).astype(bool).ravel() if "mask" in f else None
        acquisition = f.attrs.get("acquisition", "")
    if isinstance(header_text, bytes):
        header_text = header_text.decode("utf-8", "replace")
    acquisition = acquisition.decode() if isinstance(acquisition, bytes) else str(acquisition)

    header = _file_header(header_text, nx, columns, warnings)
    if header is not None:
        enc = header.encoding[0]
        limit = enc.encodingLimits.kspace_encoding_step_1 if enc.encodingLimits is not None else None
        centre = int(limit.center) if limit is not None else columns // 2
        maximum = int(limit.maximum) if limit is not None else columns - 1
        minimum = int(limit.minimum) if limit is not None else 0
        first = columns // 2 - centre
        if first < 0 or first + maximum + 1 > columns or minimum < 0:
            raise ConvertError(f"{path}: the header's ky limits {minimum}..{maximum} (centre {centre}) do not fit "
                               f"{columns} PE columns")
        thickness = float(enc.encodedSpace.fieldOfView_mm.z or 1.0)
        lims = enc.encodingLimits
        lims.slice = xsd.limitType(minimum=0, maximum=slices - 1, center=slices // 2)
        for name in ("phase", "contrast", "repetition", "set", "average", "segment"):
            setattr(lims, name, xsd.limitType(minimum=0, maximum=0, center=0))
        if header.acquisitionSystemInformation is None:
            header.acquisitionSystemInformation = xsd.acquisitionSystemInformationType()
        header.acquisitionSystemInformation.receiverChannels = coils
        keys = [(s, 0, 0, 0, 0) for s in range(slices)]
        ky_first, ky_count = first + minimum, maximum - minimum + 1
        first_column = first
    else:
        keys = [(s, 0, 0, 0, 0) for s in range(slices)]
        thickness = 3.0
        header = array_header(coils=coils, nx=nx, ny=columns, recon=(nx // 2, columns), fov_mm=(256.0, 256.0, thickness),
                              oversampling=2.0, ky_limits=(0, columns - 1, columns // 2), keys=keys, system="fastMRI")
        first_column, ky_first, ky_count = 0, 0, columns
    warnings.append(f"fastMRI files carry no slice geometry: axial directions and slice positions {thickness:g} mm "
                    f"apart written")

    def loader(s):
        def load():
            with h5py.File(path, "r") as f:
                block = np.asarray(f["kspace"][s], dtype=np.complex64)  # [coil, readout, PE]
            return np.transpose(block, (0, 2, 1))                       # [coil, PE, readout]
        return load

    sampled = None
    if mask is not None:
        if mask.size != columns:
            raise ConvertError(f"{path}: `mask` has {mask.size} entries, the k-space {columns} PE columns")
        sampled = lambda key: mask  # noqa: E731
    positions = default_positions(slices, thickness)
    images = [ArrayImage(key, loader(key[0]), positions[key[0]]) for key in keys]
    lines = array_lines(images, first_column=first_column, column_range=(ky_first, ky_first + ky_count), sampled=sampled)
    description = (f"fastMRI multicoil {acquisition or 'k-space'}: {slices} slice(s), {coils} coils, "
                   f"{nx} readout samples x {columns} PE columns")
    # fastMRI's headers come from siemens_to_ismrmrd: keep a DEVICE_SUBJECT_SESSION_MEAS measurement ID
    measurement = header.measurementInformation
    identity = ScanIdentity.from_measurement_id(measurement.measurementID if measurement is not None else None)
    if identity is not None:
        identity = ScanIdentity(*(id_part(part) for part in (identity.device, identity.patient, identity.study)),
                                identity.measurement)
    return Source("fastmri", description, header, lines, warnings, identity=identity)
