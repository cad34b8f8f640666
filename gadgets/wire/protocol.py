"""ISMRMRD streaming protocol: message ids, a bounded frame reader and the frame writers.

Little-endian; every frame starts with a uint16 id (see ../shared/REFERENCE.md section 1).
The reader validates every declared length against limits *before* allocating, so a frame
that claims gigabytes is refused instead of exhausting memory.
"""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from typing import Callable

import ismrmrd
import numpy as np
from ismrmrd.image import get_dtype_from_data_type

CONFIG_FILE = 1
CONFIG_TEXT = 2
HEADER = 3
CLOSE = 4
TEXT = 5
QUERY = 6
RESPONSE = 7
ERROR = 8
ACQUISITION = 1008
IMAGE = 1022
WAVEFORM = 1026

MESSAGE_NAMES = {
    CONFIG_FILE: "CONFIG_FILE", CONFIG_TEXT: "CONFIG_TEXT", HEADER: "HEADER", CLOSE: "CLOSE",
    TEXT: "TEXT", QUERY: "QUERY", RESPONSE: "RESPONSE", ERROR: "ERROR",
    ACQUISITION: "ACQUISITION", IMAGE: "IMAGE", WAVEFORM: "WAVEFORM",
}

CONFIG_FILE_BYTES = 1024
_ID = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
ACQUISITION_HEADER_BYTES = ctypes.sizeof(ismrmrd.AcquisitionHeader)  # 340
IMAGE_HEADER_BYTES = ctypes.sizeof(ismrmrd.ImageHeader)  # 198
WAVEFORM_HEADER_BYTES = ctypes.sizeof(ismrmrd.WaveformHeader)  # 40


class ProtocolError(Exception):
    """The peer sent something that is not valid protocol; the message is shown to the client."""


class PeerClosed(Exception):
    """The peer closed the connection (cleanly between frames when `mid_frame` is False)."""

    def __init__(self, mid_frame: bool):
        super().__init__("connection closed by peer" + (" in the middle of a frame" if mid_frame else ""))
        self.mid_frame = mid_frame


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what one frame may declare (defaults suit any clinical Cartesian scan)."""

    max_message_bytes: int = 256 * 1024 * 1024
    max_text_bytes: int = 16 * 1024 * 1024
    max_channels: int = 256
    max_samples: int = 65535


@dataclass
class ConfigName:
    name: str


@dataclass
class ConfigText:
    text: str


@dataclass
class Header:
    text: str


@dataclass
class Text:
    text: str


@dataclass
class Error:
    text: str


@dataclass
class Close:
    pass


@dataclass
class Query:
    """Gadgetron QUERY (id 6): uint64 reserved (0), uint64 correlation id, uint64 length, text."""
    correlation_id: int
    text: str


@dataclass
class Response:
    """Gadgetron RESPONSE (id 7): uint64 correlation id, uint64 length, text."""
    correlation_id: int
    text: str


def _decode(raw: bytes) -> str:
    # FIRE-style clients NUL-terminate every string they send.
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


class MessageReader:
    """Reads one protocol frame at a time from `read_exactly(n) -> bytes`.

    `read_exactly` must return exactly n bytes, or fewer only at end of stream.
    """

    def __init__(self, read_exactly: Callable[[int], bytes], limits: Limits = Limits()):
        self._read = read_exactly
        self.limits = limits
        # payload_check(head): called with an acquisition's or waveform's fixed header before its
        # payload is read, so a size the scan's header does not allow is refused unallocated
        # (the server sets it once the ISMRMRD header is known: validate.AcquisitionValidator)
        self.payload_check: Callable[[object], None] | None = None

    def _bytes(self, n: int) -> bytes:
        data = self._read(n)
        if len(data) != n:
            raise PeerClosed(mid_frame=True)
        return data

    def _length(self, fmt: struct.Struct, what: str, limit: int) -> int:
        (length,) = fmt.unpack(self._bytes(fmt.size))
        if length > limit:
            raise ProtocolError(f"{what} declares {length} bytes, more than the limit of {limit} bytes")
        return length

    def read(self):
        """Next message object; raises PeerClosed at end of stream, ProtocolError on bad frames."""
        first = self._read(_ID.size)
        if len(first) == 0:
            raise PeerClosed(mid_frame=False)
        if len(first) != _ID.size:
            raise PeerClosed(mid_frame=True)
        (message_id,) = _ID.unpack(first)
        limits = self.limits
        if message_id == CONFIG_FILE:
            return ConfigName(_decode(self._bytes(CONFIG_FILE_BYTES)))
        if message_id == CONFIG_TEXT:
            return ConfigText(_decode(self._bytes(self._length(_U32, "CONFIG_TEXT", limits.max_text_bytes))))
        if message_id == HEADER:
            return Header(_decode(self._bytes(self._length(_U32, "HEADER", limits.max_text_bytes))))
        if message_id == CLOSE:
            return Close()
        if message_id == TEXT:
            return Text(_decode(self._bytes(self._length(_U32, "TEXT", limits.max_text_bytes))))
        if message_id == ERROR:
            return Error(_decode(self._bytes(self._length(_U64, "ERROR", limits.max_text_bytes))))
        if message_id == QUERY:
            (reserved,) = _U64.unpack(self._bytes(_U64.size))
            (correlation_id,) = _U64.unpack(self._bytes(_U64.size))
            text = _decode(self._bytes(self._length(_U64, "QUERY", limits.max_text_bytes)))
            if reserved:
                raise ProtocolError(f"QUERY with a non-zero reserved field ({reserved})")
            return Query(correlation_id, text)
        if message_id == RESPONSE:
            (correlation_id,) = _U64.unpack(self._bytes(_U64.size))
            return Response(correlation_id, _decode(self._bytes(self._length(_U64, "RESPONSE", limits.max_text_bytes))))
        if message_id == ACQUISITION:
            return self._acquisition()
        if message_id == IMAGE:
            return self._image()
        if message_id == WAVEFORM:
            return self._waveform()
        raise ProtocolError(f"unknown message id {message_id}")

    def _check_payload(self, what: str, nbytes: int) -> None:
        if nbytes > self.limits.max_message_bytes:
            raise ProtocolError(f"{what} declares a {nbytes}-byte payload, more than the limit of "
                                f"{self.limits.max_message_bytes} bytes")

    def _acquisition(self) -> ismrmrd.Acquisition:
        head_bytes = self._bytes(ACQUISITION_HEADER_BYTES)
        head = ismrmrd.AcquisitionHeader.from_buffer_copy(head_bytes)
        samples, channels, traj_dims = head.number_of_samples, head.active_channels, head.trajectory_dimensions
        if channels == 0 or channels > self.limits.max_channels:
            raise ProtocolError(f"acquisition {head.scan_counter} has {channels} active channels "
                                f"(allowed 1..{self.limits.max_channels})")
        if samples == 0 or samples > self.limits.max_samples:
            raise ProtocolError(f"acquisition {head.scan_counter} has {samples} samples "
                                f"(allowed 1..{self.limits.max_samples})")
        traj_bytes = samples * traj_dims * 4
        data_bytes = samples * channels * 8
        self._check_payload(f"acquisition {head.scan_counter}", traj_bytes + data_bytes)
        if self.payload_check is not None:
            self.payload_check(head)
        trajectory = np.frombuffer(self._bytes(traj_bytes), dtype=np.float32)
        data = np.frombuffer(self._bytes(data_bytes), dtype=np.complex64)
        acquisition = ismrmrd.Acquisition(head_bytes)
        if traj_dims:
            acquisition.traj[:] = trajectory.reshape(samples, traj_dims)
        acquisition.data[:] = data.reshape(channels, samples)
        return acquisition

    def _image(self) -> ismrmrd.Image:
        head_bytes = self._bytes(IMAGE_HEADER_BYTES)
        head = ismrmrd.ImageHeader.from_buffer_copy(head_bytes)
        try:
            dtype = np.dtype(get_dtype_from_data_type(head.data_type))
        except Exception:
            raise ProtocolError(f"image has unknown data type {head.data_type}") from None
        attribute_length = self._length(_U64, "image attributes", self.limits.max_text_bytes)
        attributes = _decode(self._bytes(attribute_length))
        x, y, z = head.matrix_size
        nbytes = int(head.channels) * x * y * z * dtype.itemsize
        self._check_payload("image", nbytes)
        data = np.frombuffer(self._bytes(nbytes), dtype=dtype)
        try:
            image = ismrmrd.Image(head_bytes, attributes)
        except Exception as exc:  # the meta XML is the only part ismrmrd parses here
            raise ProtocolError(f"image attributes do not parse: {exc}") from None
        image.data.ravel()[:] = data
        return image

    def _waveform(self) -> ismrmrd.Waveform:
        head_bytes = self._bytes(WAVEFORM_HEADER_BYTES)
        head = ismrmrd.WaveformHeader.from_buffer_copy(head_bytes)
        nbytes = int(head.channels) * int(head.number_of_samples) * 4
        self._check_payload("waveform", nbytes)
        if self.payload_check is not None:
            self.payload_check(head)
        data = self._bytes(nbytes)
        return ismrmrd.Waveform.deserialize_from(_Replay(head_bytes + data).read)


class _Replay:
    """A read_exactly over bytes already received (lets ismrmrd parse a frame we sized)."""

    def __init__(self, data: bytes):
        self._data, self._pos = data, 0

    def read(self, n: int) -> bytes:
        chunk = self._data[self._pos:self._pos + n]
        self._pos += n
        return chunk


# ---- writers: each returns the frame as bytes (callers send them with one sendall) ----

def frame_config_name(name: str) -> bytes:
    raw = name.encode("utf-8")[:CONFIG_FILE_BYTES - 1]
    return _ID.pack(CONFIG_FILE) + raw.ljust(CONFIG_FILE_BYTES, b"\0")


def _string_frame(message_id: int, text: str, length=_U32) -> bytes:
    raw = text.encode("utf-8")
    return _ID.pack(message_id) + length.pack(len(raw)) + raw


def frame_config_text(text: str) -> bytes:
    return _string_frame(CONFIG_TEXT, text)


def frame_header(text: str) -> bytes:
    return _string_frame(HEADER, text)


def frame_text(text: str) -> bytes:
    return _string_frame(TEXT, text)


def frame_error(text: str) -> bytes:
    return _string_frame(ERROR, text, _U64)


def frame_query(text: str, correlation_id: int = 0) -> bytes:
    """QUERY as gadgetron_ismrmrd_client -Q sends it (reserved 0, correlation id, uint64 length)."""
    raw = text.encode("utf-8")
    return _ID.pack(QUERY) + _U64.pack(0) + _U64.pack(correlation_id) + _U64.pack(len(raw)) + raw


def frame_response(correlation_id: int, text: str) -> bytes:
    raw = text.encode("utf-8")
    return _ID.pack(RESPONSE) + _U64.pack(correlation_id) + _U64.pack(len(raw)) + raw


def frame_close() -> bytes:
    return _ID.pack(CLOSE)


def frame_acquisition(acquisition: ismrmrd.Acquisition) -> bytes:
    return _ID.pack(ACQUISITION) + acquisition.to_bytes()


def frame_image(image: ismrmrd.Image) -> bytes:
    return _ID.pack(IMAGE) + image.to_bytes()


def frame_waveform(waveform: ismrmrd.Waveform) -> bytes:
    return _ID.pack(WAVEFORM) + waveform.to_bytes()


def socket_reader(sock) -> Callable[[int], bytes]:
    """read_exactly over a socket: loops until n bytes or end of stream (then returns what came)."""

    def read_exactly(n: int) -> bytes:
        if n == 0:
            return b""
        chunks, remaining = [], n
        while remaining:
            chunk = sock.recv(min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    return read_exactly
