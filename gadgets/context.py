"""What every stage of one stream knows: the ISMRMRD header and the encoding derived from it."""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import ismrmrd


class InputError(ValueError):
    """The data contradicts the header or itself; the text is shown to the client as is."""


class StreamCancelled(Exception):
    """The stream's client has gone: stages stop at the next slice instead of computing for nobody."""


@dataclass
class Encoding:
    """The parts of header.encoding[0] that the Cartesian stages use."""

    encoded_matrix: tuple[int, int, int]  # x (readout), y (phase 1), z (phase 2)
    encoded_fov_mm: tuple[float, float, float]
    recon_matrix: tuple[int, int, int]
    recon_fov_mm: tuple[float, float, float]
    ky_limits: tuple[int, int, int]  # minimum, maximum, centre of kspace_encode_step_1
    kz_limits: tuple[int, int, int]
    receiver_channels: int | None
    acceleration: int

    def ky_row(self, step1: int) -> int:
        """Buffer row of kspace_encode_step_1: the encoding-limit centre lands on the matrix centre,
        so partial-Fourier lines keep their place."""
        return step1 - self.ky_limits[2] + self.encoded_matrix[1] // 2

    def kz_plane(self, step2: int) -> int:
        """Buffer plane of kspace_encode_step_2 (0 for 2D encodings)."""
        nz = self.encoded_matrix[2]
        return step2 - self.kz_limits[2] + nz // 2 if nz > 1 else 0

    @staticmethod
    def from_header(header) -> "Encoding":
        if not header.encoding:
            raise InputError("the ISMRMRD header has no <encoding> section")
        enc = header.encoding[0]
        try:
            em, ef = enc.encodedSpace.matrixSize, enc.encodedSpace.fieldOfView_mm
            rm, rf = enc.reconSpace.matrixSize, enc.reconSpace.fieldOfView_mm
            encoded_matrix = (int(em.x), int(em.y), int(em.z or 1))
            recon_matrix = (int(rm.x), int(rm.y), int(rm.z or 1))
            encoded_fov = (float(ef.x), float(ef.y), float(ef.z))
            recon_fov = (float(rf.x), float(rf.y), float(rf.z))
        except AttributeError as exc:
            raise InputError(f"the ISMRMRD header's encoding is incomplete ({exc})") from None
        if min(encoded_matrix) < 1 or min(recon_matrix) < 1:
            raise InputError(f"the ISMRMRD header declares an empty matrix (encoded {encoded_matrix}, "
                             f"recon {recon_matrix})")

        def limits(limit, size):
            if limit is None:
                return 0, size - 1, size // 2
            return int(limit.minimum), int(limit.maximum), int(limit.center)

        lim = enc.encodingLimits
        ky = limits(lim.kspace_encoding_step_1 if lim else None, encoded_matrix[1])
        kz = limits(lim.kspace_encoding_step_2 if lim else None, encoded_matrix[2])
        channels = None
        system = header.acquisitionSystemInformation
        if system is not None and system.receiverChannels:
            channels = int(system.receiverChannels)
        acceleration = 1
        if enc.parallelImaging is not None and enc.parallelImaging.accelerationFactor is not None:
            acceleration = int(enc.parallelImaging.accelerationFactor.kspace_encoding_step_1 or 1)
        return Encoding(encoded_matrix, encoded_fov, recon_matrix, recon_fov, ky, kz, channels, acceleration)


@dataclass
class StreamContext:
    """Shared by the stages of one stream (one connection, one scan).

    readout_samples is the readout length of the lines at the current point of the chain: it
    starts at the encoded matrix and a stage that changes it (oversampling removal) updates it
    when the chain is built, so later stages size their buffers from it.
    last_arrival is the monotonic time the item now being processed reached the server (set by
    the feeding loop) so that latency counts from arrival, backlog included.
    cancelled is set (by the server) when the client has gone; `peer_gone`, where the server
    gives one, asks the connection itself (a reset seen by no read yet). Stages call
    `check_cancelled` before starting work on a slice.
    """

    header: Any  # ismrmrd.xsd.ismrmrdHeader
    parameters: dict[str, Any] = field(default_factory=dict)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("pisf.stream"))
    last_arrival: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    peer_gone: Callable[[], bool] | None = None
    reference_preparation: Any = None   # the chain's reference_prep stage, if any (gadgets/reference_prep.py)

    def is_cancelled(self) -> bool:
        """True once the client is known to be gone (sets `cancelled` when the probe finds it)."""
        if not self.cancelled.is_set() and self.peer_gone is not None and self.peer_gone():
            self.cancelled.set()
        return self.cancelled.is_set()

    def check_cancelled(self, what: str = "the next slice") -> None:
        """StreamCancelled when the client has gone (a stage boundary: nothing started yet)."""
        if self.is_cancelled():
            raise StreamCancelled(f"the client has gone; {what} is not computed")

    def __post_init__(self):
        self.encoding = Encoding.from_header(self.header)
        self.readout_samples = self.encoding.encoded_matrix[0]


def parse_header(text: str):
    """Parse ISMRMRD XML header text, raising InputError with the parser's reason."""
    if re.search(r"<!(DOCTYPE|ENTITY)", text, re.IGNORECASE):
        # as for XML chains (chain.safe_xml): no DTDs, so no entity expansion and no external fetch
        raise InputError("the ISMRMRD header has a DOCTYPE or ENTITY declaration; refused")
    try:
        return ismrmrd.xsd.CreateFromDocument(text.rstrip("\0"))
    except Exception as exc:  # xsdata raises several parser/validation types
        raise InputError(f"the ISMRMRD header does not parse: {exc}") from None
