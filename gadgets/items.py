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
    """

    key: SliceKey
    kspace: np.ndarray
    sampled: np.ndarray
    calibration: np.ndarray | None
    calibration_sampled: np.ndarray | None
    line_header: ismrmrd.AcquisitionHeader
    complete: bool = True
    last_line_time: float = field(default_factory=time.monotonic)

    def acs_lines(self) -> np.ndarray:
        """Calibration lines [coils, n, kx] (n over all kz, ky; falls back to the imaging lines)."""
        if self.calibration is not None and self.calibration_sampled.any():
            return self.calibration[:, self.calibration_sampled]
        return self.kspace[:, self.sampled]


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
