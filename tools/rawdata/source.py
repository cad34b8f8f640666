"""The source model every `pisf convert` reader produces, and the helpers the array formats share.

A reader (tools/rawdata/readers/) turns its file into a `Source`: an ISMRMRD header and the
readouts in the order a scanner streams them (`Line`). Array formats (fastMRI, CMRxRecon, BART)
describe their images as `ArrayImage`s and get their header and lines from `array_header` and
`array_lines`. tools/rawdata/convert.py plans and writes the stream from a `Source`; the readers
import only this module, so there is no circle between the command and its readers.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from gadgets.numerics.reference import MIN_CONVERTED_REFERENCE_LINES
from gadgets.wire.validate import ScanIdentity

TICKS_PER_LINE = 4  # time stamps of array formats: one line per 10 ms (2.5 ms ticks)

SLICE_KEY_FIELDS = ("slice", "contrast", "phase", "repetition", "set")


class ConvertError(Exception):
    """The input cannot be converted; the text is the one line the user sees."""


@dataclass
class Line:
    """One readout of the source in scanner order.

    kind: "image" (k-space line of an image), "reference" (calibration only), "noise", or
    "other" (navigators, phase correction, ...: passed through untouched).
    make(): the acquisition with data, counters, geometry and vendor flags; the converter sets
    the calibration and first/last flags and the scan counter itself.
    calibration: an image line the source flags as calibration too (embedded ACS).
    """

    kind: str
    key: tuple | None
    ky: int
    make: Callable
    calibration: bool = False


@dataclass
class Source:
    format: str
    description: str
    header: object  # ismrmrd.xsd.ismrmrdHeader
    lines: list[Line]
    warnings: list[str] = field(default_factory=list)
    frame_counter: str = "phase"  # the counter a mask's frame index follows (cmrxrecon-kt)
    holes_in_lines: bool = False  # sent lines miss samples (2D undersampling): never "fully sampled"
    sampling: object = None       # gadgets.numerics.sampling.Sampling of the images' samples, where a reader measured it
    identity: ScanIdentity | None = None  # device, patient, study, measurement; None: made from the file name


@dataclass
class ArrayImage:
    """One image of an array format: its counters and a loader of K[coils, ky columns, kx]."""

    key: tuple                      # (slice, contrast, phase, repetition, set)
    load: Callable
    position: tuple = (0.0, 0.0, 0.0)


def unit_pixel_header(*, coils: int, nx: int, ny: int, oversampling: float, slice_mm: float,
                      keys: list[tuple], system: str):
    """`array_header` for formats that carry no geometry (BART, CMRxRecon): 1 mm pixels, the recon
    matrix the readout without its oversampling, every ky line encoded, the centre at ny // 2."""
    return array_header(coils=coils, nx=nx, ny=ny, recon=(int(round(nx / oversampling)), ny),
                        fov_mm=(nx / oversampling, float(ny), slice_mm), oversampling=oversampling,
                        ky_limits=(0, ny - 1, ny // 2), keys=keys, system=system)


def array_header(*, coils: int, nx: int, ny: int, recon: tuple[int, int], fov_mm: tuple[float, float, float],
                 oversampling: float, ky_limits: tuple[int, int, int], keys: list[tuple], system: str,
                 field_t: float | None = None):
    """An ISMRMRD header for k-space arrays: encoded nx x ny (x = readout, oversampled), recon matrix
    and FOV, ky limits, counter limits from the image keys."""
    import ismrmrd.xsd as xsd

    def limit(values):
        values = list(values)
        return xsd.limitType(minimum=min(values), maximum=max(values), center=0)

    field_t = field_t or 3.0
    encoding = xsd.encodingType(
        trajectory=xsd.trajectoryType.CARTESIAN,
        encodedSpace=xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=nx, y=ny, z=1),
            fieldOfView_mm=xsd.fieldOfViewMm(x=fov_mm[0] * oversampling, y=fov_mm[1], z=fov_mm[2])),
        reconSpace=xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=recon[0], y=recon[1], z=1),
            fieldOfView_mm=xsd.fieldOfViewMm(x=fov_mm[0], y=fov_mm[1], z=fov_mm[2])),
        encodingLimits=xsd.encodingLimitsType(
            kspace_encoding_step_0=xsd.limitType(minimum=0, maximum=nx - 1, center=nx // 2),
            kspace_encoding_step_1=xsd.limitType(minimum=ky_limits[0], maximum=ky_limits[1], center=ky_limits[2]),
            kspace_encoding_step_2=xsd.limitType(minimum=0, maximum=0, center=0),
            slice=limit(k[0] for k in keys), contrast=limit(k[1] for k in keys), phase=limit(k[2] for k in keys),
            repetition=limit(k[3] for k in keys), set=limit(k[4] for k in keys),
            average=xsd.limitType(minimum=0, maximum=0, center=0), segment=xsd.limitType(minimum=0, maximum=0, center=0)))
    return xsd.ismrmrdHeader(
        measurementInformation=xsd.measurementInformationType(patientPosition=xsd.patientPositionType.HFS,
                                                              protocolName=system),
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(
            systemVendor=system, systemFieldStrength_T=field_t, receiverChannels=coils),
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=int(round(42.577478e6 * field_t))),
        encoding=[encoding])


# ---------------------------------------------------------------- the header's identity (Gadgetron)
def id_part(text: object) -> str:
    """One DEVICE/SUBJECT/SESSION part of a measurement ID: Gadgetron splits the ID at its first
    three underscores, so they (and white space) become '-'."""
    return re.sub(r"[_\s]+", "-", str(text).strip()) or "0"


def file_identity(path: Path | str, fmt: str) -> ScanIdentity:
    """The identity of a converted file that carries none: device PISF-<FORMAT>, the file name as
    subject, session PISF-CONVERT, and a measurement number from the file name (stable, so the
    same file converts to the same IDs)."""
    name = Path(path).name
    return ScanIdentity(device=f"PISF-{fmt.upper()}", patient=id_part(Path(path).stem), study="PISF-CONVERT",
                        measurement=str(zlib.crc32(name.encode("utf-8")) % 100000))


def default_positions(slices: int, thickness_mm: float) -> list[tuple[float, float, float]]:
    """Axial slice centres `thickness_mm` apart around the isocentre (files without geometry)."""
    return [(0.0, 0.0, (s - (slices - 1) / 2) * thickness_mm) for s in range(slices)]


def array_lines(images: list[ArrayImage], *, first_column: int = 0, column_range: tuple[int, int] | None = None,
                sampled: Callable | None = None, frame_counter: str = "phase", rr_ms: float = 1000.0,
                centre_column: int | None = None, stats: dict | None = None) -> list[Line]:
    """Lines of array images in scanner order: image by image (slice outer, frames inner), ky ascending.

    Column j of an image's K[coils, columns, kx] is kspace_encode_step_1 = j - first_column (files
    that zero-pad k-space beyond the acquired lines, as fastMRI); only columns in `column_range`
    (start, stop) are lines (default: all). A column is sent when `sampled(key)`
    says so, else when any of its samples is non-zero (already undersampled input). Geometry: axial
    directions and the image's position; one line per 10 ms; cine phases spread over `rr_ms`.
    In an undersampled image the contiguous run of lines around `centre_column` (at least
    MIN_CONVERTED_REFERENCE_LINES) is its embedded calibration region (flagged calibration-and-imaging).
    `stats["zero_samples"]`: the largest fraction of all-coil zero samples within the sent lines of
    an image (2D masks such as Poisson discs leave holes inside lines)."""
    import ismrmrd

    from tools.rawdata.kspace_stream import cartesian_line
    from tools.rawdata.simulate import START_OF_SCAN_TICKS, TICK_MS

    cache: dict = {}

    def kspace(image: ArrayImage) -> np.ndarray:
        if cache.get("key") != image.key:
            cache["key"], cache["data"] = image.key, np.asarray(image.load(), dtype=np.complex64)
        return cache["data"]

    frames = max(k[SLICE_KEY_FIELDS.index(frame_counter)] for k in (i.key for i in images)) + 1
    out: list[Line] = []
    for image in images:
        data = kspace(image)
        start, stop = column_range or (0, data.shape[1])
        present = sampled(image.key) if sampled is not None else np.any(data != 0, axis=(0, 2))
        if stats is not None:
            rows = np.flatnonzero(present[start:stop]) + start
            holes = float(np.mean(~np.any(data[:, rows, :] != 0, axis=0))) if rows.size else 0.0
            stats["zero_samples"] = max(stats.get("zero_samples", 0.0), holes)
            from gadgets.numerics.sampling import sampling_of   # R from the samples, for 2D masks
            stats.setdefault("samplings", []).append(sampling_of(data[:, start:stop]))
        calibration = np.zeros(len(present), dtype=bool)
        centre = data.shape[1] // 2 if centre_column is None else centre_column
        if not present[start:stop].all() and 0 <= centre < len(present) and present[centre]:
            lo = hi = centre
            while lo - 1 >= start and present[lo - 1]:
                lo -= 1
            while hi + 1 < stop and present[hi + 1]:
                hi += 1
            if hi - lo + 1 >= MIN_CONVERTED_REFERENCE_LINES:
                calibration[lo:hi + 1] = True
        for column in range(start, stop):
            if not present[column]:
                continue
            number = len(out)

            def build(image=image, column=column, number=number):
                block = kspace(image)
                acquisition = cartesian_line(block[:, column, :], column - first_column, slice_=image.key[0])
                head = acquisition.getHead()
                head.idx.contrast, head.idx.phase = image.key[1], image.key[2]
                head.idx.repetition, head.idx.set = image.key[3], image.key[4]
                head.position[:] = image.position
                head.acquisition_time_stamp = START_OF_SCAN_TICKS + number * TICKS_PER_LINE
                frame = image.key[SLICE_KEY_FIELDS.index(frame_counter)]
                head.physiology_time_stamp[0] = int(round(frame * rr_ms / frames / TICK_MS))
                head.available_channels = block.shape[0]
                for c in range(block.shape[0]):
                    head.channel_mask[c // 64] |= 1 << (c % 64)
                acquisition.setHead(head)
                acquisition.clear_flag(ismrmrd.ACQ_LAST_IN_SLICE)
                return acquisition

            out.append(Line("image", image.key, column - first_column, build, calibration=bool(calibration[column])))
    cache.clear()
    return out


def frame_key(slice_index: int, frame: int, counter: str) -> tuple:
    """(slice, contrast, phase, repetition, set) with `frame` in the named counter."""
    key = [slice_index, 0, 0, 0, 0]
    key[SLICE_KEY_FIELDS.index(counter)] = frame
    return tuple(key)
