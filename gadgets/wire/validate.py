"""Checks before data reach a chain: each acquisition against the header and the lines before
it, and the header against what real Gadgetron 4.7 accepts.

Acquisitions are checked on arrival, so a contradiction is reported by name and the chain can
still reconstruct every slice that was valid up to that point.

Header checks (what Gadgetron 4.7 and the ISMRMRD 1.14 C++ library it pins do with a header):

- `<version>`: ISMRMRD's C++ `serialize` throws "XML header version does not match library
  schema version." for any version but its own ISMRMRD_XMLHDR_VERSION (the library's minor
  version: 14), and Gadgetron serialises the header again for every external gadget and worker.
  Leave `<version>` out.
- the schema: `parse_header` (gadgets/context.py) already parses with ismrmrd-python's bindings of
  the ISMRMRD XSD (unknown elements, missing required ones and malformed values are refused);
  `xsd_problems` validates against an ismrmrd.xsd file as well (xmlschema; Debian's
  ismrmrd-schema or the one an ISMRMRD install puts in share/ismrmrd/schema).
- identity: Gadgetron's storage reads the measurement ID as DEVICE_SUBJECT_SESSION_MEAS
  (`(.*?)_(.*?)_(.*?)_(.*)`: scanner, patient, study), preferring subjectInformation/patientID,
  studyInformation/studyID and acquisitionSystemInformation/stationName where present;
  NoiseAdjustGadget dereferences measurementInformation and acquisitionSystemInformation and
  stores the noise covariance under the measurement ID, in a storage server.
"""
from __future__ import annotations

import os
import re
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import ismrmrd
import numpy as np

from ..context import Encoding, InputError


# Sizes a frame may declare, beyond what the scan's header says exactly:
TRAJECTORY_DIMENSIONS_MAX = 4        # kx, ky, kz and a density weight (non-Cartesian headers only)
NOISE_SAMPLES_MARGIN = 2             # noise lines may be longer than the imaging readout, at most this
                                     # times the longest readout the header allows (oversampled)
WAVEFORM_BYTES_MAX = 16 * 1024 * 1024  # physiology (ECG, PMU): kilobytes in practice; the chains drop it
_NOISE_BIT = 1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1)
# Counters checked against the header's encodingLimits when it declares them (kspace_encode_step_1/2
# and slice have their own checks and messages).
LIMITED_COUNTERS = ("contrast", "phase", "repetition", "set", "average", "segment")
# Lines outside the image's encoding space, whose counters scanners label their own way (the third
# phase-correction navigator of a Siemens EPI scan carries average 1 under limits 0..0): no counter check.
_AUXILIARY_BITS = sum(1 << (flag - 1) for flag in (
    ismrmrd.ACQ_IS_PHASECORR_DATA, ismrmrd.ACQ_IS_NAVIGATION_DATA, ismrmrd.ACQ_IS_RTFEEDBACK_DATA,
    ismrmrd.ACQ_IS_HPFEEDBACK_DATA, ismrmrd.ACQ_IS_DUMMYSCAN_DATA))


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2 ** 20:.1f} MiB"


class AcquisitionValidator:
    """Checks each acquisition against the scan's header.

    `check_header` needs only the 340-byte acquisition header, so the server's frame reader calls
    it (as `check_payload`) before the samples and trajectory are read: a size the header does
    not allow is refused before it is allocated. `check` adds what needs the samples.
    """

    def __init__(self, encoding: Encoding, slice_limit: int | None = None, trajectory: str | None = None,
                 counter_limits: dict[str, tuple[int, int]] | None = None):
        self.encoding = encoding
        self.slice_limit = slice_limit
        self.counter_limits = counter_limits or {}  # counter -> (minimum, maximum) the header declares
        self.channels = encoding.receiver_channels
        self.trajectory = trajectory  # the header's encoding trajectory ('cartesian', 'radial', ...), None unknown
        readout = max(encoding.encoded_matrix[0], 2 * encoding.recon_matrix[0])  # oversampled readout
        self.noise_samples_max = NOISE_SAMPLES_MARGIN * readout

    @staticmethod
    def for_header(header) -> "AcquisitionValidator":
        encoding = Encoding.from_header(header)
        limits = header.encoding[0].encodingLimits
        slice_limit = int(limits.slice.maximum) if limits is not None and limits.slice is not None else None
        trajectory = header.encoding[0].trajectory
        trajectory = str(getattr(trajectory, "value", trajectory)).lower() if trajectory is not None else None
        return AcquisitionValidator(encoding, slice_limit, trajectory, declared_counter_limits(limits))

    def check_payload(self, head) -> None:
        """The frame reader's hook: an AcquisitionHeader or WaveformHeader before its payload."""
        if isinstance(head, ismrmrd.WaveformHeader):
            nbytes = int(head.channels) * int(head.number_of_samples) * 4
            if nbytes > WAVEFORM_BYTES_MAX:
                raise InputError(f"a waveform (id {head.waveform_id}) declares {head.channels} channels x "
                                 f"{head.number_of_samples} samples ({_mib(nbytes)}), more than the "
                                 f"{_mib(WAVEFORM_BYTES_MAX)} allowed for physiology data; refused before reading it")
            return
        self.check_header(head)

    def check(self, acquisition: ismrmrd.Acquisition) -> None:
        self.check_header(acquisition)
        self.check_samples(acquisition)

    def check_samples(self, acquisition: ismrmrd.Acquisition) -> None:
        """What needs the samples (the server's reader ran `check_header` before reading them)."""
        if not np.isfinite(acquisition.data).all():
            raise InputError(f"acquisition {acquisition.scan_counter} contains NaN or infinite samples")

    def check_header(self, head) -> None:
        """Sizes and counters of one line (an AcquisitionHeader, or an Acquisition) against the header."""
        number = head.scan_counter
        channels = head.active_channels
        if self.channels is None:
            self.channels = channels  # no receiverChannels in the header: the first line sets it
        if channels != self.channels:
            raise InputError(f"acquisition {number} has {channels} channels; the header and earlier lines "
                             f"say {self.channels}")
        self._check_trajectory(head)
        samples, readout = head.number_of_samples, self.encoding.encoded_matrix[0]
        if head.flags & _NOISE_BIT:
            if samples > self.noise_samples_max:
                raise InputError(f"noise acquisition {number} has {samples} samples, more than "
                                 f"{self.noise_samples_max} ({NOISE_SAMPLES_MARGIN} x the header's oversampled "
                                 f"readout); refused before reading them")
            return
        if samples > readout:
            raise InputError(f"acquisition {number} has {samples} samples; the header's encoded readout "
                             f"matrix is {readout}")
        if head.center_sample >= samples:
            raise InputError(f"acquisition {number} has centre sample {head.center_sample} "
                             f"but only {samples} samples")
        self._check_counters(head)

    def _check_trajectory(self, head) -> None:
        dimensions = head.trajectory_dimensions
        if not dimensions:
            return
        nbytes = head.number_of_samples * dimensions * 4
        if self.trajectory in (None, "cartesian"):
            raise InputError(f"acquisition {head.scan_counter} declares a trajectory of {head.number_of_samples} "
                             f"x {dimensions} ({_mib(nbytes)}) but the header's encoding is Cartesian, where "
                             f"lines carry no trajectory (trajectory_dimensions must be 0); refused before "
                             f"reading it")
        if dimensions > TRAJECTORY_DIMENSIONS_MAX:
            raise InputError(f"acquisition {head.scan_counter} declares {dimensions} trajectory dimensions "
                             f"({_mib(nbytes)}); a {self.trajectory} trajectory has at most "
                             f"{TRAJECTORY_DIMENSIONS_MAX} (kx, ky, kz, weight); refused before reading it")

    def _check_counters(self, head) -> None:
        number = head.scan_counter
        ky_min, ky_max, _ = self.encoding.ky_limits
        step1 = head.idx.kspace_encode_step_1
        if not ky_min <= step1 <= ky_max:
            raise InputError(f"acquisition {number} has kspace_encode_step_1 = {step1}, outside the "
                             f"header's encoding limits {ky_min}..{ky_max}")
        kz_min, kz_max, _ = self.encoding.kz_limits
        step2 = head.idx.kspace_encode_step_2
        if self.encoding.encoded_matrix[2] > 1 and not kz_min <= step2 <= kz_max:
            raise InputError(f"acquisition {number} has kspace_encode_step_2 = {step2}, outside the "
                             f"header's encoding limits {kz_min}..{kz_max}")
        if self.slice_limit is not None and head.idx.slice > self.slice_limit:
            raise InputError(f"acquisition {number} is for slice {head.idx.slice}; the header's "
                             f"encoding limits end at slice {self.slice_limit}")
        if head.flags & _AUXILIARY_BITS:
            return
        for name, (minimum, maximum) in self.counter_limits.items():
            value = getattr(head.idx, name)
            if not minimum <= value <= maximum:
                raise InputError(f"acquisition {number} has {name} = {value}, outside the header's encoding "
                                 f"limits {minimum}..{maximum} for {name}")


def declared_counter_limits(limits) -> dict[str, tuple[int, int]]:
    """{counter: (minimum, maximum)} of LIMITED_COUNTERS the header's encodingLimits declare (a
    counter without a limit element is not checked)."""
    declared = {}
    for name in LIMITED_COUNTERS:
        limit = getattr(limits, name, None) if limits is not None else None
        if limit is not None and limit.maximum is not None:
            declared[name] = (int(limit.minimum or 0), int(limit.maximum))
    return declared


# ---------------------------------------------------------------- the header as Gadgetron 4.7 sees it
GADGETRON_VERSION = "4.7"
GADGETRON_ISMRMRD = "1.14"
# ISMRMRD_XMLHDR_VERSION is defined as ISMRMRD_VERSION_MINOR: 14 in the library Gadgetron 4.7 pins.
GADGETRON_XML_HEADER_VERSION = 14
# Gadgetron's storage: std::regex "(.*?)_(.*?)_(.*?)_(.*)" -> scanner, patient, study (lazy: the
# first three fields end at the first three underscores, the measurement part may hold more).
MEASUREMENT_ID = re.compile(r"([^_]*)_([^_]*)_([^_]*)_(.*)", re.DOTALL)
_NAMESPACE = "{http://www.ismrm.org/ISMRMRD}"


def header_version(text: str) -> int | str | None:
    """The `<version>` of a header text (int, or the raw text when it is not a number), or None."""
    try:
        root = ElementTree.fromstring(text.strip().rstrip("\0"))
    except ElementTree.ParseError:
        return None
    element = root.find(f"{_NAMESPACE}version")
    if element is None:
        element = root.find("version")
    if element is None:
        return None
    value = (element.text or "").strip()
    return int(value) if re.fullmatch(r"[+-]?\d+", value) else value


def version_problem(text: str) -> str | None:
    """Why Gadgetron 4.7 refuses the header's `<version>`, or None (absent, or the library's own)."""
    version = header_version(text)
    if version is None or version == GADGETRON_XML_HEADER_VERSION:
        return None
    return (f"the ISMRMRD header has <version>{version}</version>: Gadgetron {GADGETRON_VERSION} (ISMRMRD "
            f"{GADGETRON_ISMRMRD}, header version {GADGETRON_XML_HEADER_VERSION}) refuses it wherever it passes "
            f"the header on (every external gadget, every distributed worker: 'XML header version does not match "
            f"library schema version.'); leave <version> out")


@dataclass(frozen=True)
class ScanIdentity:
    """Who and what a scan is, as Gadgetron's storage keys it: the measurement ID
    DEVICE_SUBJECT_SESSION_MEAS and, where the header has them, patient, study and device IDs."""
    device: str
    patient: str
    study: str
    measurement: str

    @property
    def measurement_id(self) -> str:
        return f"{self.device}_{self.patient}_{self.study}_{self.measurement}"

    @staticmethod
    def from_measurement_id(text: str | None) -> "ScanIdentity | None":
        match = MEASUREMENT_ID.fullmatch(text or "")
        if match is None or not all(part.strip() for part in match.groups()):
            return None
        return ScanIdentity(*match.groups())

    def write_into(self, header) -> None:
        """Make a parsed header what Gadgetron 4.7 accepts and its NoiseAdjustGadget can store noise
        under: no `<version>`, this measurement ID, and the same patient, study and device IDs."""
        import ismrmrd.xsd as xsd

        header.version = None
        if header.measurementInformation is None:
            header.measurementInformation = xsd.measurementInformationType(patientPosition=xsd.patientPositionType.HFS)
        header.measurementInformation.measurementID = self.measurement_id
        if header.subjectInformation is None:
            header.subjectInformation = xsd.subjectInformationType()
        header.subjectInformation.patientID = self.patient
        if header.studyInformation is None:
            header.studyInformation = xsd.studyInformationType()
        header.studyInformation.studyID = self.study
        if header.acquisitionSystemInformation is None:
            header.acquisitionSystemInformation = xsd.acquisitionSystemInformationType()
        # deviceID, not deviceSerialNumber: that one came after ISMRMRD 1.8 (Debian's ismrmrd-schema
        # refuses it); Gadgetron reads neither (its scanner is stationName or the ID's first part).
        header.acquisitionSystemInformation.deviceID = self.device


def identity_problems(header, complete: bool = False) -> list[str]:
    """What Gadgetron's NoiseAdjustGadget and storage need of a header's identity (parsed header).

    complete: also require the patient, study and device IDs to be written out and to agree with
    the measurement ID, as `pisf simulate` and `pisf convert` write them (Gadgetron itself falls
    back to the measurement ID's parts).
    """
    problems = []
    measurement = header.measurementInformation
    identity = ScanIdentity.from_measurement_id(measurement.measurementID) if measurement is not None else None
    if measurement is None:
        problems.append("no measurementInformation: Gadgetron's NoiseAdjustGadget reads its measurementID "
                        "unchecked")
    elif identity is None:
        problems.append(f"measurementID {measurement.measurementID!r} is not DEVICE_SUBJECT_SESSION_MEAS (four "
                        f"non-empty parts, the first three without '_'): Gadgetron's storage takes scanner, "
                        f"patient and study from it")
    system = header.acquisitionSystemInformation
    if system is None:
        problems.append("no acquisitionSystemInformation: Gadgetron's NoiseAdjustGadget reads its noise "
                        "bandwidth unchecked")
    if not complete:
        return problems
    written = {"subjectInformation/patientID": (header.subjectInformation, "patientID", "patient"),
               "studyInformation/studyID": (header.studyInformation, "studyID", "study"),
               "acquisitionSystemInformation/deviceID": (system, "deviceID", "device")}
    for where, (section, name, part) in written.items():
        value = getattr(section, name, None) if section is not None else None
        if not value:
            problems.append(f"no {where}")
        elif identity is not None and value != getattr(identity, part):
            problems.append(f"{where} {value!r} differs from the measurement ID's {part} {getattr(identity, part)!r}")
    return problems


def gadgetron_header_problems(text: str, noise_adjust: bool = False) -> list[str]:
    """Why Gadgetron 4.7 would refuse this header text ([] when it passes).

    noise_adjust: the chain runs Gadgetron's NoiseAdjustGadget, which also needs the identity
    (`identity_problems`) to store the noise covariance.
    """
    from ..context import parse_header

    problems = []
    try:
        header = parse_header(text)
    except InputError as exc:
        return [str(exc)]
    version = version_problem(text)
    if version:
        problems.append(version)
    if noise_adjust:
        problems += identity_problems(header)
    return problems


def header_warnings(text: str) -> list[str]:
    """TEXT warnings the embedded server sends for a header it accepts but Gadgetron 4.7 would not."""
    problem = version_problem(text)
    return [f"WARNING: {problem}"] if problem else []


# ---------------------------------------------------------------- validation against an ismrmrd.xsd file
SCHEMA_ENV = "PISF_ISMRMRD_XSD"


def find_ismrmrd_schema() -> Path | None:
    """An ismrmrd.xsd file: $PISF_ISMRMRD_XSD, then share/ismrmrd/schema/ under this Python's prefix
    (conda installs of ISMRMRD, as in the Gadgetron images), then /usr/local/share and /usr/share
    (Debian's ismrmrd-schema)."""
    candidates = [os.environ.get(SCHEMA_ENV, "")]
    candidates += [str(Path(prefix) / "share" / "ismrmrd" / "schema" / "ismrmrd.xsd")
                   for prefix in (sys.prefix, os.environ.get("CONDA_PREFIX", ""), "/usr/local", "/usr") if prefix]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


_SCHEMAS: dict[Path, object] = {}


def xsd_problems(text: str, schema_path: Path | str | None = None) -> list[str]:
    """Violations of the ISMRMRD XSD (xmlschema), one line each; [] when valid.

    Raises LookupError when there is no schema file and ImportError without xmlschema (a test
    dependency; the runtime parses with ismrmrd-python's bindings of the same schema).
    """
    import xmlschema

    path = Path(schema_path) if schema_path else find_ismrmrd_schema()
    if path is None:
        raise LookupError(f"no ismrmrd.xsd found (set {SCHEMA_ENV}, or install Debian's ismrmrd-schema)")
    schema = _SCHEMAS.get(path)
    if schema is None:
        schema = _SCHEMAS[path] = xmlschema.XMLSchema(str(path))
    return [f"{error.path or '/'}: {error.reason}" for error in schema.iter_errors(text.strip().rstrip("\0"))]
