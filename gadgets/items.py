"""What flows between stream stages besides ismrmrd Acquisitions and Images.

A stage handles the item types it knows and passes every other item through unchanged, so
stages compose in any order that makes physical sense.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import ismrmrd
import numpy as np


class SliceKey(NamedTuple):
    """The counters that tell one image of a scan from another."""

    slice: int
    contrast: int
    phase: int
    repetition: int
    set: int

    @staticmethod
    def of(idx) -> "SliceKey":
        return SliceKey(idx.slice, idx.contrast, idx.phase, idx.repetition, idx.set)

    def __str__(self) -> str:
        return (f"slice {self.slice}, contrast {self.contrast}, phase {self.phase}, "
                f"repetition {self.repetition}, set {self.set}")


@dataclass
class Notice:
    """A message for the client (sent as TEXT by the server, logged inside Gadgetron)."""

    text: str
    level: int = logging.WARNING


@dataclass
class KSpaceSlice:
    """All lines of one (slice, contrast, phase, repetition, set), placed in k-space.

    kspace: complex64 [coils, kz, ky, kx] imaging lines only (unsampled positions are 0).
    sampled: bool [kz, ky], True where an imaging line was placed.
    calibration: complex64 [coils, kz, ky, kx] of every ACS line (ACS-only and
      ACS-and-imaging), or None when the scan has no ACS lines; calibration_sampled alike.
    line_header: header of the imaging line nearest the k-space centre (geometry and counters for
      the image; not to be confused with the reference lines, which are `calibration`).
    complete: False when the slice was flushed at the end of the stream before its last line.
    last_line_time: time.monotonic() when its last line arrived (latency accounting).
    first_line_time: time.monotonic() when its first imaging line arrived (None where unknown).
    reference: the reference_prep stage's PreparedReference (gadgets/reference_prep.py): the
      calibration of its reference block, shared with other images of the same reference data.
    reference_shared: `calibration` is its slice position's separate reference, measured for
      every image of the position, not lines of this image: it calibrates, it is never image data.
    """

    key: SliceKey
    kspace: np.ndarray
    sampled: np.ndarray
    calibration: np.ndarray | None
    calibration_sampled: np.ndarray | None
    line_header: ismrmrd.AcquisitionHeader
    complete: bool = True
    last_line_time: float = field(default_factory=time.monotonic)
    first_line_time: float | None = None
    reference: Any = None
    reference_shared: bool = False

    def acs_lines(self) -> np.ndarray:
        """Calibration lines [coils, n, kx] (n over all kz, ky; falls back to the imaging lines)."""
        if self.calibration is not None and self.calibration_sampled.any():
            return self.calibration[:, self.calibration_sampled]
        return self.kspace[:, self.sampled]


@dataclass
class ReferenceData:
    """A separate reference scan's lines of one slice position, complete (the slice accumulator
    emits it before the image lines it calibrates, for the reference_prep stage).

    key: the reference lines' counters (key.slice is the slice position).
    calibration: complex64 [coils, n, kx], the n reference lines in calibration_sampled's order;
    calibration_sampled: bool [kz, ky] where they lie (a copy: later lines do not change them).
    arrival: time.monotonic() of the line that completed it.
    """

    key: SliceKey
    calibration: np.ndarray
    calibration_sampled: np.ndarray
    arrival: float

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """(calibration [coils, kz, ky, kx], calibration_sampled [kz, ky]) as in a KSpaceSlice."""
        coils, _, kx = self.calibration.shape
        grid = np.zeros((coils,) + self.calibration_sampled.shape + (kx,), dtype=self.calibration.dtype)
        grid[:, self.calibration_sampled] = self.calibration
        return grid, self.calibration_sampled


@dataclass
class ReconImage:
    """A reconstructed slice before image finishing.

    data: float32 or complex64 [kz, y, x] at the buffered matrix (readout possibly still wider
    than the recon matrix); the finishing stage takes magnitude and crops.
    line_header: the slice's KSpaceSlice.line_header (geometry and counters for the image).
    recon: short name of the method (goes into the image comment), meta: extra attributes.
    """

    key: SliceKey
    data: np.ndarray
    line_header: ismrmrd.AcquisitionHeader
    recon: str
    meta: dict[str, Any] = field(default_factory=dict)
    complete: bool = True
    last_line_time: float = field(default_factory=time.monotonic)
