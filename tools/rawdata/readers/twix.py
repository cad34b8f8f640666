"""Siemens twix (.dat, VB and VD/VE multi-raid) -> a `Source` for `pisf convert`, read with twixtools.

Mapping (after siemens_to_ismrmrd, the reference converter):

| twix (MDH) | ISMRMRD acquisition |
|---|---|
| NOISEADJSCAN | ACQ_IS_NOISE_MEASUREMENT (also every line of an earlier noise-only measurement) |
| PATREFSCAN without PATREFANDIMASCAN | ACQ_IS_PARALLEL_CALIBRATION (reference only) |
| PATREFANDIMASCAN | ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING (embedded reference) |
| PHASCOR, (REF)PHASESTABSCAN, RTFEEDBACK/HPFEEDBACK, RETRO_DUMMYSCAN | phase correction, navigation/feedback, dummy: passed through, not image data |
| REFLECT | samples reversed to ascending kx; in EPI (below) ACQ_IS_REVERSE, samples in measured order |
| SYNCDATA, ACQEND | not acquisitions |
| cLin, cPar, cSlc, cEco, cPhs, cRep, cSet, cAve, cSeg | kspace_encode_step_1, _2, slice, contrast, phase, repetition, set, average, segment |
| CenterCol | center_sample |
| SliceData.SlicePos (Sag, Cor, Tra) | position (patient coordinates, mm) |
| SliceData.Quaternion (W, X, Y, Z) | phase_dir, read_dir, slice_dir (ISMRMRD quaternion_to_directions of (X, Y, Z, W)) |
| TimeStamp, PMUTimeStamp, ScanCounter, MeasUID | acquisition_time_stamp, physiology_time_stamp[0], scan_counter, measurement_uid |

FIRST/LAST_IN_SLICE and LAST_IN_MEASUREMENT are set by the converter per image (see tools/rawdata/convert.py),
not copied from LASTSCANINSLICE (which marks the end of a slice, not of each cine phase).

Header: matrix, field of view, oversampling and encoding limits from the protocol (MeasYaps
sKSpace / sSliceArray, Meas iRoFTLength / iPEFTLength / flReadoutOSFactor) when the data agree with
it; where they do not (Pulseq sequences leave a placeholder protocol), from the data: readout
length = samples per line, ky/kz limits = the counters' ranges, centre = the lines' CenterLin
(or the middle when every line says 0), with a warning. Frequency, field, vendor, model, patient
position, TR/TE/flip angle, acceleration and reference mode from the protocol. Identity as
siemens_to_ismrmrd forms it (`_identity`): measurement ID DeviceSerialNumber_Patient_Study_MeasUID.

EPI (`epi_readout`: ramp sampling in the protocol (alRegridMode > 1), or reflected image lines with
an EPI factor > 1 or phase-correction lines) is written as siemens_to_ismrmrd writes it, for a
reconstruction that regrids the ramps and corrects odd/even lines (Gadgetron's EPI chain):
trajectory `epi`, trajectory description ConventionalEPI (rampUpTime, rampDownTime, flatTopTime,
acqDelayTime, numSamples in the protocol's units, dwellTime in us), reflected lines flagged
ACQ_IS_REVERSE with their samples in measured order. The server here refuses it, and convert
writes no ground truth for it (a Cartesian FFT of the lines is not the image).
"""
from __future__ import annotations

import contextlib
import io
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gadgets.wire.validate import ScanIdentity
from tools.rawdata.source import ConvertError, Line, Source, id_part

RAID_HEADER_BYTES = 10240          # VD/VE multi-raid file header
RAID_ENTRY_BYTES = 152
NOT_LINES = ("SYNCDATA", "ACQEND")
OTHER_FLAGS = ("PHASCOR", "RTFEEDBACK", "HPFEEDBACK", "RETRO_DUMMYSCAN", "REFPHASESTABSCAN", "PHASESTABSCAN",
               "noname60")  # twixtools' "not an image scan" flags (each maps to a flag the runtime skips)
PATIENT_POSITIONS = ("HFP", "HFS", "HFDR", "HFDL", "FFP", "FFS", "FFDR", "FFDL")


# ----------------------------------------------------------------------------- file structure
def _raid_entries(head: bytes, size: int) -> list[tuple[int, int]] | None:
    """[(offset, length)] of a VD/VE multi-raid header, or None when the file is not VD/VE."""
    if len(head) < 8:
        return None
    first, count = struct.unpack("<II", head[:8])
    if not (first < 10000 and 0 < count <= 64):  # twixtools' own VD/VE test, plus at least one raid
        return None
    entries = []
    for k in range(count):
        start = 8 + k * RAID_ENTRY_BYTES + 8
        if start + 16 > len(head):
            return None
        offset, length = struct.unpack("<QQ", head[start:start + 16])
        entries.append((offset, length))
    return entries


def looks_like_twix(path: Path) -> bool:
    """A VD/VE multi-raid header pointing at a measurement header, or a VB measurement header
    (header length, then the `Config` buffer)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(RAID_HEADER_BYTES)
        entries = _raid_entries(head, size)
        if entries:
            offset = entries[0][0]
            if offset + 16 > size:
                return True  # a twix header whose data is cut off: check_twix says so
            f.seek(offset)
            return b"Config" in f.read(64)
    return len(head) >= 16 and b"Config" in head[8:24]


def check_twix(path: Path) -> None:
    """Structural checks before twixtools reads the file (it loops or guesses on malformed input)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(RAID_HEADER_BYTES)
        entries = _raid_entries(head, size)
        if entries is None:
            if len(head) < 16 or b"Config" not in head[8:24]:
                raise ConvertError(f"{path}: not a Siemens twix file (no VD/VE raid header and no VB measurement header)")
            (header_length,) = struct.unpack("<I", head[:4])
            if header_length >= size:
                raise ConvertError(f"{path}: truncated twix file: the measurement header declares {header_length} "
                                   f"bytes, the file has {size}")
            walk_readouts(f, header_length, size, False, path, 1)
            return
        for number, (offset, length) in enumerate(entries, 1):
            if offset < RAID_HEADER_BYTES or offset + 8 > size:
                raise ConvertError(f"{path}: truncated twix file: measurement {number} starts at byte {offset}, "
                                   f"the file has {size}")
            if length and offset + length > size:
                raise ConvertError(f"{path}: truncated twix file: measurement {number} needs bytes up to "
                                   f"{offset + length}, the file has {size}")
            f.seek(offset)
            header_length, _ = struct.unpack("<II", f.read(8))
            if b"Config" not in f.read(56):
                raise ConvertError(f"{path}: not a readable Siemens twix file (measurement {number} has no protocol header)")
            if offset + header_length > size:
                raise ConvertError(f"{path}: truncated twix file: the protocol header of measurement {number} "
                                   f"ends past the end of the file")
            walk_readouts(f, offset + header_length, offset + length if length else size, True, path, number)


def walk_readouts(f, start: int, end: int, vd: bool, path: Path, number: int) -> None:
    """Step through the readout headers from `start` as twixtools will (ACQEND/SYNCDATA: their DMA
    length; readouts: channels x (channel header + samples) + scan header), refusing a step of
    zero bytes, which would stop twixtools forever (a zeroed region, a corrupt header)."""
    scan_header, channel_header = (192, 32) if vd else (0, 128)
    acqend, syncdata = 1 << 0, 1 << 5
    position = start
    while position + 128 < end:  # twixtools' own loop condition
        f.seek(position)
        head = f.read(64)
        if len(head) < 52:
            return
        (flags_and_dma,) = struct.unpack_from("<I", head, 0)
        mask_at, samples_at = (40, 48) if vd else (20, 28)
        (mask,) = struct.unpack_from("<Q", head, mask_at)
        samples, channels = struct.unpack_from("<HH", head, samples_at)
        if mask & acqend or mask & syncdata:
            step = flags_and_dma % (1 << 25)
            if mask & acqend:
                return
        else:
            step = channels * (channel_header + 8 * samples) + scan_header
        if step == 0 or (not vd and channels == 0):
            raise ConvertError(f"{path}: not a readable Siemens twix file (measurement {number}: a readout header "
                               f"at byte {position} declares no data; the file is corrupt or zero-filled there)")
        position += step


def read_twix(path: Path) -> list[dict]:
    """twixtools.read_twix with ACQEND kept (to detect truncation), its console output captured,
    and its exceptions turned into one-line errors."""
    import twixtools

    check_twix(path)
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            measurements = twixtools.read_twix(str(path), verbose=False, keep_acqend=True, parse_pmu=False,
                                               parse_geometry=False)
    except Exception as exc:
        raise ConvertError(f"{path}: not a readable Siemens twix file ({type(exc).__name__}: {exc})") from None
    if "Error parsing twix header" in output.getvalue():
        raise ConvertError(f"{path}: not a readable Siemens twix file (its protocol header does not parse)")
    if not measurements:
        raise ConvertError(f"{path}: no measurement in the twix file")
    for number, measurement in enumerate(measurements, 1):
        hdr = measurement.get("hdr") or {}
        if "MeasYaps" not in hdr or "Meas" not in hdr:
            raise ConvertError(f"{path}: measurement {number} has no protocol (MeasYaps/Meas)")
        mdbs = measurement["mdb"]
        if not mdbs or not mdbs[-1].is_flag_set("ACQEND"):
            raise ConvertError(f"{path}: truncated or corrupt twix file: measurement {number} ends after {len(mdbs)} "
                               f"readouts without the end-of-acquisition block")
    return measurements


# ----------------------------------------------------------------------------- protocol helpers
def _get(mapping, *keys, default=None):
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return default
        mapping = mapping[key]
    return mapping


def _number(value, default=None):
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def quaternion_directions(quaternion) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(read_dir, phase_dir, slice_dir) of a Siemens MDH quaternion (W, X, Y, Z). Siemens' rotation
    has columns (phase, read, slice); ISMRMRD's quaternion_to_directions of (X, Y, Z, W) gives them
    in that order (as siemens_to_ismrmrd passes them)."""
    from twixtools.quat import quaternion_to_directions

    w, x, y, z = (float(v) for v in quaternion)
    if abs(w * w + x * x + y * y + z * z - 1.0) > 1e-3:
        raise ValueError("not a unit quaternion")
    phase, read, slice_ = quaternion_to_directions((x, y, z, w))
    return np.array(read), np.array(phase), np.array(slice_)


# ----------------------------------------------------------------------------- source
def read_twix_source(path: Path, measurement: int | None = None) -> Source:
    """The Source of one measurement (default: the last) of a twix file: readouts sorted into
    noise / reference / image / other, a header from the protocol and the data, and the lines."""
    path = Path(path)
    measurements = read_twix(path)
    index = _measurement_index(measurements, measurement)
    scan = measurements[index]
    hdr = scan["hdr"]
    yaps, meas, dicom = hdr["MeasYaps"], hdr["Meas"], hdr.get("Dicom", {})
    warnings: list[str] = []
    version = "VD/VE" if "raidfile_hdr" in scan else "VB"

    readouts = _sort_readouts(measurements, index, path)
    matrix = _matrix(meas, yaps, readouts, warnings, path)
    encoding = _encoding(matrix, meas, yaps, readouts, warnings)
    dwell_ns = _number((_get(yaps, "sRXSPEC", "alDwellTime") or [0])[0], 0.0) or 0.0
    epi = epi_readout(meas, yaps, readouts)
    if epi is not None:
        _write_epi(encoding, epi, dwell_ns / 1000.0)
        warnings.append(epi.describe() + ": written as EPI (header trajectory epi, ramp times in its trajectory "
                        "description, reversed lines flagged ACQ_IS_REVERSE, as siemens_to_ismrmrd does); a Cartesian "
                        "FFT of these lines is not the image, so this server refuses it")
    header = _header(encoding, yaps, meas, dicom, readouts, warnings)
    lines, geometry_failed = _lines(readouts, dwell_ns / 1000.0 if dwell_ns else 0.0, version == "VB", path,
                                    reverse_flag=epi is not None)
    if geometry_failed:
        warnings.append("some lines carry no valid slice orientation: axial directions written for them")
    model = str(dicom.get("ManufacturersModelName") or "Siemens")
    description = (f"Siemens twix {version} ({model}, {dicom.get('SoftwareVersions', '').strip() or 'unknown software'}), "
                   f"measurement {index + 1} of {len(measurements)}: {readouts.coils} coils, {matrix.samples} samples "
                   f"per line, readout oversampling {matrix.oversampling:g}")
    return Source("twix", description, header, lines, warnings, identity=_identity(meas, dicom, readouts))


def _identity(meas: dict, dicom: dict, readouts: "Readouts") -> ScanIdentity:
    """DeviceSerialNumber_PatientID_StudyID_MeasUID, the measurement ID siemens_to_ismrmrd forms:
    the patient is IRIS.RECOMPOSE's PatientLOID, else its PatientID; the study its StudyLOID
    (twixtools flattens these into the `Meas` keys). Where siemens_to_ismrmrd cuts five characters
    off a LOID (meant for a 'LOID:' prefix) we remove only a literal 'LOID:' prefix; '_' inside a
    part becomes '-', since Gadgetron splits the ID at its first three underscores."""
    def text(value) -> str:
        if isinstance(value, float) and value.is_integer():
            return str(int(value))  # twixtools reads "213010" as 213010.0
        value = str(value or "").strip()
        return value[len("LOID:"):] if value.upper().startswith("LOID:") else value

    device = text(dicom.get("DeviceSerialNumber") or meas.get("DeviceSerialNumber")) or "SIEMENS"
    patient = text(meas.get("PatientLOID")) or text(meas.get("PatientID")) or text(dicom.get("PatientID")) or "UNKNOWN-PATIENT"
    study = text(meas.get("StudyLOID")) or text(dicom.get("StudyID")) or "UNKNOWN-STUDY"
    measurement = text(meas.get("MeasUID")) or str(int(readouts.image[0].mdh.MeasUID))
    return ScanIdentity(id_part(device), id_part(patient), id_part(study), measurement)


def _measurement_index(measurements: list[dict], measurement: int | None) -> int:
    if measurement is None:
        return len(measurements) - 1
    if 1 <= measurement <= len(measurements):
        return measurement - 1
    raise ConvertError(f"--measurement {measurement}: the file holds {len(measurements)} measurement(s)")


def _kind_of(mdb) -> str:
    """noise, other (phase correction, feedback, dummy), reference (PATREFSCAN only) or image."""
    if mdb.is_flag_set("NOISEADJSCAN"):
        return "noise"
    if any(mdb.is_flag_set(name) for name in OTHER_FLAGS):
        return "other"
    if mdb.is_flag_set("PATREFSCAN") and not mdb.is_flag_set("PATREFANDIMASCAN"):
        return "reference"
    return "image"


@dataclass
class Readouts:
    """The readouts of one measurement, sorted."""
    noise: list          # noise lines of earlier noise-only measurements
    mdbs: list           # every readout of the measurement (no SYNCDATA/ACQEND), in order
    kinds: list[str]     # _kind_of each of mdbs
    data: list           # image and reference readouts
    image: list          # image readouts
    coils: int


def _sort_readouts(measurements: list[dict], index: int, path: Path) -> Readouts:
    # Noise: the image measurement's own noise lines, and earlier measurements made only of noise
    # (a separate noise-adjust scan of a multi-raid file).
    noise_mdbs = []
    for earlier in measurements[:index]:
        lines = [m for m in earlier["mdb"] if not any(m.is_flag_set(n) for n in NOT_LINES)]
        if lines and all(m.is_flag_set("NOISEADJSCAN") for m in lines):
            noise_mdbs.extend(lines)
    mdbs = [m for m in measurements[index]["mdb"] if not any(m.is_flag_set(n) for n in NOT_LINES)]
    kinds = [_kind_of(m) for m in mdbs]
    data_mdbs = [m for m, k in zip(mdbs, kinds) if k in ("image", "reference")]
    image_mdbs = [m for m, k in zip(mdbs, kinds) if k == "image"]
    if not image_mdbs:
        raise ConvertError(f"{path}: measurement {index + 1} has no imaging lines")
    coils = {int(m.mdh.UsedChannels) for m in data_mdbs}
    if len(coils) > 1:
        raise ConvertError(f"{path}: lines with different channel counts {sorted(coils)}")
    for m in data_mdbs[-1:]:
        try:
            m.data
        except ValueError:
            raise ConvertError(f"{path}: truncated twix file: the last readout's samples are cut off") from None
    return Readouts(noise_mdbs, mdbs, kinds, data_mdbs, image_mdbs, coils.pop())


@dataclass
class Matrix:
    """Encoded matrix and ky/kz limits (protocol where the data agree with it, else the data)."""
    nx: int
    ny: int
    nz: int
    samples: int
    oversampling: float
    fits_y: bool           # the protocol's line count describes the data
    ky_min: int
    ky_max: int
    ky_centre: int
    partitions: list[int]
    kz_centre: int


def _matrix(meas: dict, yaps: dict, readouts: Readouts, warnings: list[str], path: Path) -> Matrix:
    data_mdbs, image_mdbs = readouts.data, readouts.image
    oversampling = _number(meas.get("flReadoutOSFactor"), 2.0) or 2.0
    samples = max(int(m.mdh.SamplesInScan) for m in data_mdbs)
    centre_col = Counter(int(m.mdh.CenterCol) for m in data_mdbs).most_common(1)[0][0]
    proto_nx = int(_number(meas.get("iRoFTLength"), 0) or _number(_get(yaps, "sKSpace", "lBaseResolution"), 0) * oversampling)
    lines = [int(m.cLin) for m in data_mdbs]
    partitions = [int(m.cPar) for m in data_mdbs]
    proto_ny = int(_number(meas.get("iPEFTLength"), 0) or _number(_get(yaps, "sKSpace", "lPhaseEncodingLines"), 0))
    fits_x = proto_nx >= samples and 0 <= proto_nx // 2 - centre_col and proto_nx // 2 - centre_col + samples <= proto_nx
    fits_y = proto_ny > max(lines)
    if fits_x:
        nx = proto_nx
    else:
        nx = max(samples, 2 * max(centre_col, samples - centre_col))
    if not (fits_x and fits_y):
        warnings.append(f"the twix protocol ({proto_nx} readout samples x {proto_ny} lines) does not describe the "
                        f"data ({samples} samples x lines {min(lines)}..{max(lines)}; a Pulseq sequence?): "
                        f"matrix and encoding limits taken from the data")
    ny = proto_ny if fits_y else max(lines) + 1
    centre_lines = Counter(int(m.mdh.CenterLin) for m in image_mdbs).most_common(1)[0][0]
    ky_min, ky_max = min(lines), max(lines)
    if centre_lines == 0 and ky_min == 0 and ky_max > 0:
        centre_lines = ny // 2
        warnings.append(f"the lines carry no k-space centre line (CenterLin 0 on every line, as Pulseq writes it): "
                        f"ky centre taken as {centre_lines} (the middle of {ny} lines)")
    if not ky_min <= centre_lines <= ky_max:
        raise ConvertError(f"{path}: the k-space centre line {centre_lines} lies outside the acquired lines "
                           f"{ky_min}..{ky_max}")
    nz = max(partitions) + 1
    centre_par = Counter(int(m.mdh.CenterPar) for m in image_mdbs).most_common(1)[0][0] if nz > 1 else 0
    if nz > 1 and centre_par == 0:
        centre_par = nz // 2
    return Matrix(nx, ny, nz, samples, oversampling, fits_y, ky_min, ky_max, centre_lines, partitions, centre_par)


def _encoding(matrix: Matrix, meas: dict, yaps: dict, readouts: Readouts, warnings: list[str]):
    """The ISMRMRD encoding: encoded and recon space (FOV, oversampling), limits, parallel imaging."""
    import ismrmrd.xsd as xsd

    data_mdbs = readouts.data
    nx, ny, nz, oversampling = matrix.nx, matrix.ny, matrix.nz, matrix.oversampling
    slice_info = (_get(yaps, "sSliceArray", "asSlice") or [{}])[0]
    readout_fov = _number(slice_info.get("dReadoutFOV"))
    phase_fov = _number(slice_info.get("dPhaseFOV"))
    thickness = _number(slice_info.get("dThickness"), 1.0)
    if not readout_fov or not phase_fov:
        readout_fov = phase_fov = 256.0
        warnings.append("the twix protocol has no field of view: 256 mm assumed")
    recon_x = max(1, int(round(nx / oversampling)))
    phase_os = _number(meas.get("flPhaseOS"), 0.0) or 0.0
    phase_os = phase_os if 0 < phase_os < 1 and matrix.fits_y else 0.0
    recon_y = int(round(ny / (1 + phase_os))) if phase_os else ny

    def counter_limit(values, centre=0):
        values = list(values)
        return xsd.limitType(minimum=min(values), maximum=max(values), center=centre)

    encoding = xsd.encodingType(
        trajectory=xsd.trajectoryType.CARTESIAN,
        encodedSpace=xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=nx, y=ny, z=nz),
            fieldOfView_mm=xsd.fieldOfViewMm(x=readout_fov * oversampling, y=phase_fov * (1 + phase_os), z=thickness)),
        reconSpace=xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=recon_x, y=recon_y, z=nz),
            fieldOfView_mm=xsd.fieldOfViewMm(x=readout_fov, y=phase_fov, z=thickness)),
        encodingLimits=xsd.encodingLimitsType(
            kspace_encoding_step_0=xsd.limitType(minimum=0, maximum=nx - 1, center=nx // 2),
            kspace_encoding_step_1=xsd.limitType(minimum=matrix.ky_min, maximum=matrix.ky_max, center=matrix.ky_centre),
            kspace_encoding_step_2=xsd.limitType(minimum=min(matrix.partitions), maximum=max(matrix.partitions),
                                                 center=matrix.kz_centre),
            slice=counter_limit(m.cSlc for m in data_mdbs), contrast=counter_limit(m.cEco for m in data_mdbs),
            phase=counter_limit(m.cPhs for m in data_mdbs), repetition=counter_limit(m.cRep for m in data_mdbs),
            set=counter_limit(m.cSet for m in data_mdbs), average=counter_limit(m.cAve for m in data_mdbs),
            segment=counter_limit(m.cSeg for m in data_mdbs)),
    )
    pat = _get(yaps, "sPat") or {}
    if int(_number(pat.get("ucPATMode"), 1) or 1) != 1:
        mode = {2: xsd.calibrationModeType.EMBEDDED, 4: xsd.calibrationModeType.SEPARATE,
                8: xsd.calibrationModeType.SEPARATE, 16: xsd.calibrationModeType.INTERLEAVED,
                32: xsd.calibrationModeType.INTERLEAVED, 64: xsd.calibrationModeType.INTERLEAVED}
        encoding.parallelImaging = xsd.parallelImagingType(
            accelerationFactor=xsd.accelerationFactorType(
                kspace_encoding_step_1=int(_number(pat.get("lAccelFactPE"), 1) or 1),
                kspace_encoding_step_2=int(_number(pat.get("lAccelFact3D"), 1) or 1)),
            calibrationMode=mode.get(int(_number(pat.get("ucRefScanMode"), 0) or 0), xsd.calibrationModeType.OTHER))
    return encoding


def _header(encoding, yaps: dict, meas: dict, dicom: dict, readouts: Readouts, warnings: list[str]):
    """The ISMRMRD header: the encoding plus system, frequency, patient position and sequence timing."""
    import ismrmrd.xsd as xsd

    frequency = _number(dicom.get("lFrequency")) or _number(_get(yaps, "sTXSPEC", "asNucleusInfo", default=[{}])[0].get("lFrequency"))
    field = _number(dicom.get("flMagneticFieldStrength")) or _number(_get(yaps, "sProtConsistencyInfo", "flNominalB0"))
    if not frequency:
        frequency = 42.577478e6 * (field or 3.0)
        warnings.append("the twix protocol has no Larmor frequency: derived from the field strength")
    position = str(dicom.get("tPatientPosition") or meas.get("tPatientPosition") or "")
    contrasts = int(_number(yaps.get("lContrasts"), 1) or 1)
    te = [v / 1000.0 for v in (yaps.get("alTE") or [])[:contrasts] if _number(v, 0) > 0]
    tr = [v / 1000.0 for v in (yaps.get("alTR") or [])[:1] if _number(v, 0) > 0]
    flip = [float(v) for v in (yaps.get("adFlipAngleDegree") or [])[:1]]
    protocol = str(dicom.get("tProtocolName") or yaps.get("tProtocolName") or "twix")
    header = xsd.ismrmrdHeader(
        measurementInformation=xsd.measurementInformationType(
            patientPosition=xsd.patientPositionType(position) if position in PATIENT_POSITIONS else xsd.patientPositionType.HFS,
            protocolName=protocol),
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(
            systemVendor=str(dicom.get("Manufacturer") or "SIEMENS"), systemModel=str(dicom.get("ManufacturersModelName") or ""),
            systemFieldStrength_T=field, receiverChannels=readouts.coils),
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=int(round(frequency))),
        encoding=[encoding],
        sequenceParameters=xsd.sequenceParametersType(TR=tr, TE=te, flipAngle_deg=flip),
    )
    if position not in PATIENT_POSITIONS:
        warnings.append(f"patient position {position or 'missing'} in the twix protocol: HFS written")
    return header


def _noise_dwell_us(mdb, vb: bool) -> float:
    # siemens_to_ismrmrd's rule for noise readouts (their dwell time is not in the MDH)
    n = int(mdb.mdh.SamplesInScan)
    return 10e6 / n / 130.0 if vb else int(76800.0 / n) / 10.0


def _lines(readouts: Readouts, sample_time_us: float, vb: bool, path: Path,
           reverse_flag: bool = False) -> tuple[list[Line], list[int]]:
    """The Lines in scanner order (earlier noise first) and a list that the builders fill with
    the scan counters of readouts without a valid orientation (known once they have run).
    `reverse_flag`: reflected lines keep their samples and are flagged ACQ_IS_REVERSE (EPI)."""
    geometry_failed: list[int] = []

    def make(mdb, kind):
        dwell_us = _noise_dwell_us(mdb, vb) if kind == "noise" else sample_time_us
        return lambda: _acquisition(mdb, dwell_us, readouts.coils, geometry_failed, path, reverse_flag)

    out: list[Line] = [Line("noise", None, 0, make(mdb, "noise")) for mdb in readouts.noise]
    for mdb, kind in zip(readouts.mdbs, readouts.kinds):
        key = (int(mdb.cSlc), int(mdb.cEco), int(mdb.cPhs), int(mdb.cRep), int(mdb.cSet))
        out.append(Line(kind, key if kind in ("image", "reference") else None, int(mdb.cLin),
                        make(mdb, kind), calibration=kind == "image" and mdb.is_flag_set("PATREFANDIMASCAN")))
    return out, geometry_failed


def _acquisition(mdb, sample_time_us: float, coils: int, geometry_failed: list[int], path: Path,
                 reverse_flag: bool = False):
    """One ISMRMRD acquisition of a twix readout (mapping in the module docstring)."""
    import ismrmrd

    data = np.asarray(mdb.data, dtype=np.complex64)
    if data.ndim != 2 or data.shape[0] != mdb.mdh.UsedChannels:
        raise ConvertError(f"{path}: readout {mdb.mdh.ScanCounter} has malformed data {data.shape}")
    reflected = mdb.is_flag_set("REFLECT")
    if reflected and not reverse_flag:
        data = data[:, ::-1]
    acquisition = ismrmrd.Acquisition.from_array(np.ascontiguousarray(data))
    head = acquisition.getHead()
    head.measurement_uid = int(mdb.mdh.MeasUID) & 0xFFFFFFFF
    head.scan_counter = int(mdb.mdh.ScanCounter)
    head.acquisition_time_stamp = int(mdb.mdh.TimeStamp)
    head.physiology_time_stamp[0] = int(mdb.mdh.PMUTimeStamp)
    head.available_channels = coils
    head.active_channels = data.shape[0]
    for c in range(data.shape[0]):
        head.channel_mask[c // 64] |= 1 << (c % 64)
    head.discard_pre, head.discard_post = int(mdb.mdh.CutOff.Pre), int(mdb.mdh.CutOff.Post)
    head.center_sample = int(mdb.mdh.CenterCol)
    head.sample_time_us = sample_time_us
    slice_data = mdb.mdh.SliceData
    head.position[:] = (slice_data.SlicePos.Sag, slice_data.SlicePos.Cor, slice_data.SlicePos.Tra)
    try:
        read, phase, slice_ = quaternion_directions(slice_data.Quaternion)
        head.read_dir[:], head.phase_dir[:], head.slice_dir[:] = read, phase, slice_
    except ValueError:
        geometry_failed.append(int(mdb.mdh.ScanCounter))
        head.read_dir[:], head.phase_dir[:], head.slice_dir[:] = (1, 0, 0), (0, 1, 0), (0, 0, 1)
    if hasattr(mdb.mdh, "PTABPosX"):
        head.patient_table_position[:] = (mdb.mdh.PTABPosX, mdb.mdh.PTABPosY, mdb.mdh.PTABPosZ)
    idx = head.idx
    idx.kspace_encode_step_1, idx.kspace_encode_step_2 = int(mdb.cLin), int(mdb.cPar)
    idx.slice, idx.contrast, idx.phase = int(mdb.cSlc), int(mdb.cEco), int(mdb.cPhs)
    idx.repetition, idx.set, idx.average, idx.segment = int(mdb.cRep), int(mdb.cSet), int(mdb.cAve), int(mdb.cSeg)
    acquisition.setHead(head)
    for twix_flag, ismrmrd_flags in _FLAG_MAP:
        if mdb.is_flag_set(twix_flag):
            for f in ismrmrd_flags:
                acquisition.set_flag(f)
    if reflected and reverse_flag:
        acquisition.set_flag(ismrmrd.ACQ_IS_REVERSE)
    return acquisition


# ----------------------------------------------------------------------------- EPI
@dataclass
class EpiReadout:
    """What marks a measurement as EPI, from the protocol and the lines."""
    sequence: str
    epi_factor: int
    regrid_mode: int            # Siemens alRegridMode: 1 none, 2 trapezoidal, 4 sinusoidal
    ramp_up_us: float
    flat_top_us: float
    ramp_down_us: float
    delay_us: float
    regrid_samples: int
    reflected_lines: int
    phase_correction_lines: int

    @property
    def ramp_sampled(self) -> bool:
        return self.regrid_mode > 1

    def describe(self) -> str:
        parts = [f"EPI ({self.sequence or 'unknown sequence'}, EPI factor {self.epi_factor})"]
        if self.ramp_sampled:
            kind = {2: "trapezoidal", 4: "sinusoidal"}.get(self.regrid_mode, f"mode {self.regrid_mode}")
            parts.append(f"ramp-sampled readouts ({kind} regridding: ramp up {self.ramp_up_us:g} us, flat top "
                         f"{self.flat_top_us:g} us, ramp down {self.ramp_down_us:g} us)")
        parts.append(f"{self.reflected_lines} reversed lines")
        parts.append(f"{self.phase_correction_lines} phase-correction lines")
        return ", ".join(parts)


def epi_readout(meas: dict, yaps: dict, readouts: Readouts) -> EpiReadout | None:
    """The EPI description of a measurement, or None when its readouts are not EPI."""
    def first(value, default=0.0):
        value = value[0] if isinstance(value, (list, tuple)) and value else value
        return _number(value, default) or default

    regrid_mode = int(first(meas.get("alRegridMode"), 1))
    epi_factor = int(_number((_get(yaps, "sFastImaging") or {}).get("lEPIFactor"), 1) or 1)
    reflected = sum(1 for m in readouts.image if m.is_flag_set("REFLECT"))
    phase_correction = sum(1 for m in readouts.mdbs if m.is_flag_set("PHASCOR"))
    if not (regrid_mode > 1 or (reflected and (epi_factor > 1 or phase_correction))):
        return None
    return EpiReadout(sequence=str(meas.get("tSequenceFileName") or yaps.get("tSequenceFileName") or "").split("\\")[-1],
                      epi_factor=epi_factor, regrid_mode=regrid_mode,
                      ramp_up_us=first(meas.get("alRegridRampupTime")), flat_top_us=first(meas.get("alRegridFlattopTime")),
                      ramp_down_us=first(meas.get("alRegridRampdownTime")),
                      delay_us=first(meas.get("alRegridDelaySamplesTime")),
                      regrid_samples=int(first(meas.get("alRegridDestSamples"))), reflected_lines=reflected,
                      phase_correction_lines=phase_correction)


def _write_epi(encoding, epi: EpiReadout, dwell_us: float) -> None:
    """Trajectory `epi` and the ConventionalEPI description (siemens_to_ismrmrd's parameter names)."""
    import ismrmrd.xsd as xsd

    longs = [("rampUpTime", epi.ramp_up_us), ("rampDownTime", epi.ramp_down_us), ("flatTopTime", epi.flat_top_us),
             ("acqDelayTime", epi.delay_us), ("numSamples", epi.regrid_samples)]
    encoding.trajectory = xsd.trajectoryType.EPI
    encoding.trajectoryDescription = xsd.trajectoryDescriptionType(
        identifier="ConventionalEPI",
        userParameterLong=[xsd.userParameterLongType(name=name, value=int(round(value))) for name, value in longs],
        userParameterDouble=[xsd.userParameterDoubleType(name="dwellTime", value=float(dwell_us))])
    encoding.echoTrainLength = epi.epi_factor


def _flag_map():
    import ismrmrd
    return (
        ("NOISEADJSCAN", (ismrmrd.ACQ_IS_NOISE_MEASUREMENT,)),
        ("PHASCOR", (ismrmrd.ACQ_IS_PHASECORR_DATA,)),
        ("RTFEEDBACK", (ismrmrd.ACQ_IS_NAVIGATION_DATA, ismrmrd.ACQ_IS_RTFEEDBACK_DATA)),
        ("HPFEEDBACK", (ismrmrd.ACQ_IS_HPFEEDBACK_DATA,)),
        ("RETRO_DUMMYSCAN", (ismrmrd.ACQ_IS_DUMMYSCAN_DATA,)),
        ("REFPHASESTABSCAN", (ismrmrd.ACQ_IS_PHASECORR_DATA,)),
        ("PHASESTABSCAN", (ismrmrd.ACQ_IS_PHASECORR_DATA,)),
        ("noname60", (ismrmrd.ACQ_IS_DUMMYSCAN_DATA,)),
    )


_FLAG_MAP = _flag_map()
