"""`pisf fuzz`: structured mutations of valid protocol frames against the frame reader and a live server.

Every fuzzed stream is a valid frame (config, header, text, error, close, acquisition, image,
waveform) mutated: random message ids, lengths that lie (small, huge, just over the limit, the
uint32/uint64 maximum), payloads cut anywhere, bit flips in acquisition/image/waveform headers,
header fields set to extremes (channels, samples, trajectory dimensions, matrix size, data type),
random XML as the ISMRMRD header, random bytes, and streams of several such frames.

In process, each stream goes through `MessageReader` over a bytes buffer until it ends; only
`ProtocolError` and `PeerClosed` may come out (anything else counts as a crash). The time per
stream and the peak allocation (tracemalloc) are recorded: no stream may hang or allocate more
than `Limits.max_message_bytes`. A sample of streams also goes over loopback to an in-process
server after a valid config and header: the server must answer with TEXT/CLOSE or close, never
report an internal error, never hang, and still serve a normal scan at the end.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import socket
import struct
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import ismrmrd
import numpy as np

from gadgets.wire import protocol
from tools.rawdata.kspace_stream import cartesian_line, header_for

NX = NY = 16
COILS = 2


def make_header(nx: int = NX, ny: int = NY, coils: int = COILS) -> str:
    return header_for(coils, ny, nx)


def make_line(ky: int, last: bool = False, traj_dims: int = 0) -> ismrmrd.Acquisition:
    rng = np.random.default_rng(ky)
    data = (rng.standard_normal((COILS, NX)) + 1j * rng.standard_normal((COILS, NX))).astype(np.complex64)
    acquisition = cartesian_line(data, ky, counter=ky, last=last)
    if traj_dims:
        acquisition.resize(NX, COILS, traj_dims)
        acquisition.data[:] = data
        acquisition.traj[:] = rng.standard_normal((NX, traj_dims)).astype(np.float32)
    return acquisition


def valid_frames() -> dict[str, bytes]:
    image = ismrmrd.Image.from_array(np.arange(NX * NY, dtype=np.uint16).reshape(NY, NX), transpose=False)
    image.meta["ImageComment"] = "fuzz"
    waveform = ismrmrd.Waveform.from_array(np.arange(20, dtype=np.uint32).reshape(2, 10))
    return {
        "config_name": protocol.frame_config_name("zerofill"),
        "config_text": protocol.frame_config_text("name: z\nstages:\n  - gadget: zerofill_recon\n"),
        "header": protocol.frame_header(make_header()),
        "text": protocol.frame_text('{"a": 1}'),
        "error": protocol.frame_error("scanner says no"),
        "close": protocol.frame_close(),
        "acquisition": protocol.frame_acquisition(make_line(3)),
        "acquisition_traj": protocol.frame_acquisition(make_line(4, traj_dims=2)),
        "image": protocol.frame_image(image),
        "waveform": protocol.frame_waveform(waveform),
    }


_HEADER_CLASSES = {protocol.ACQUISITION: ismrmrd.AcquisitionHeader, protocol.IMAGE: ismrmrd.ImageHeader,
                   protocol.WAVEFORM: ismrmrd.WaveformHeader}
# header fields that size the payload, per message id
_SIZING_FIELDS = {
    protocol.ACQUISITION: ("number_of_samples", "active_channels", "available_channels", "trajectory_dimensions"),
    protocol.IMAGE: ("channels", "data_type", "matrix_size"),
    protocol.WAVEFORM: ("channels", "number_of_samples"),
}
_STRING_IDS = (protocol.CONFIG_TEXT, protocol.HEADER, protocol.TEXT)


class Mutator:
    """Random structured mutations of valid frames (deterministic for a seed)."""

    def __init__(self, seed: int, limits: protocol.Limits = protocol.Limits()):
        self.rng = random.Random(seed)
        self.limits = limits
        self.frames = valid_frames()
        self.names = sorted(self.frames)

    def _interesting(self, bits: int) -> int:
        top = (1 << bits) - 1
        r = self.rng
        return r.choice([0, 1, 2, 7, 255, 256, 1024, 65535, 65536, self.limits.max_text_bytes,
                         self.limits.max_text_bytes + 1, self.limits.max_message_bytes,
                         self.limits.max_message_bytes + 1, 1 << 31, top, top - 1, r.randrange(top + 1)]) & top

    def random_xml(self) -> str:
        r = self.rng
        tags = ["ismrmrdHeader", "encoding", "encodedSpace", "matrixSize", "x", "y", "z", "reconSpace",
                "encodingLimits", "kspace_encoding_step_1", "maximum", "minimum", "center", "trajectory",
                "acquisitionSystemInformation", "receiverChannels", "fieldOfView_mm", "slice", "junk"]

        def element(depth: int) -> str:
            tag = r.choice(tags)
            if depth > 4 or r.random() < 0.3:
                body = r.choice(["", "0", "-1", "16", "1e309", "nan", "cartesian", "\u00e9\u4e2d",
                                 "".join(chr(r.randrange(32, 127)) for _ in range(r.randrange(12)))])
            else:
                body = "".join(element(depth + 1) for _ in range(r.randrange(4)))
            close = tag if r.random() > 0.05 else r.choice(tags)
            return f"<{tag}>{body}</{close}>"

        text = element(0)
        if r.random() < 0.3:  # start from the real header and damage it
            text = make_header()
            cut = r.randrange(len(text))
            text = text[:cut] + r.choice(["", "<", "&", "]]>", "<x>", "\0"]) + text[cut + r.randrange(3):]
        return text

    def mutate_one(self) -> tuple[str, bytes]:
        r = self.rng
        name = r.choice(self.names)
        frame = bytearray(self.frames[name])
        message_id = struct.unpack_from("<H", frame)[0]
        kind = r.choice(["id", "length", "truncate", "bitflip", "fields", "xml", "random", "extend", "valid"])
        if kind == "id":
            struct.pack_into("<H", frame, 0, r.choice([r.randrange(65536), 0, 6, 7, 9, 1007, 1009, 1023, 1025, 1027]))
        elif kind == "length":
            if message_id in _STRING_IDS:
                struct.pack_into("<I", frame, 2, self._interesting(32))
            elif message_id == protocol.ERROR:
                struct.pack_into("<Q", frame, 2, self._interesting(64))
            elif message_id == protocol.IMAGE:  # attribute length (uint64) after the 198-byte header
                struct.pack_into("<Q", frame, 2 + protocol.IMAGE_HEADER_BYTES, self._interesting(64))
            elif message_id in _SIZING_FIELDS:
                kind = "fields"
            else:
                frame = bytearray(frame[:2] + struct.pack("<Q", self._interesting(64)) + frame[2:])
        if kind == "fields" and message_id in _HEADER_CLASSES:
            cls = _HEADER_CLASSES[message_id]
            head = cls.from_buffer_copy(bytes(frame[2:2 + ctypes_size(cls)]))
            for _ in range(r.randrange(1, 3)):
                fieldname = r.choice(_SIZING_FIELDS[message_id])
                if fieldname == "matrix_size":
                    head.matrix_size[r.randrange(3)] = self._interesting(16)
                else:
                    bits = 8 * ctypes_field_size(cls, fieldname)
                    setattr(head, fieldname, self._interesting(bits))
            frame[2:2 + ctypes_size(cls)] = bytes(head)
        elif kind == "bitflip":
            # mostly inside the fixed header (where sizes and indices live), sometimes anywhere
            span = ctypes_size(_HEADER_CLASSES[message_id]) + 2 if message_id in _HEADER_CLASSES else len(frame)
            for _ in range(r.randrange(1, 9)):
                position = r.randrange(min(span, len(frame)) if r.random() < 0.8 else len(frame))
                frame[position] ^= 1 << r.randrange(8)
        elif kind == "truncate":
            frame = frame[:r.randrange(len(frame) + 1)]
        elif kind == "xml":
            frame = bytearray(protocol.frame_header(self.random_xml()))
        elif kind == "random":
            frame = bytearray(struct.pack("<H", r.choice(list(protocol.MESSAGE_NAMES) + [r.randrange(65536)]))
                              + r.randbytes(r.randrange(0, 600)))
        elif kind == "extend":
            frame += r.randbytes(r.randrange(1, 64))
        return f"{name}/{kind}", bytes(frame)

    def stream(self) -> tuple[str, bytes]:
        """One fuzzed stream: usually one mutated frame, sometimes several in a row."""
        parts = [self.mutate_one() for _ in range(1 if self.rng.random() < 0.7 else self.rng.randrange(2, 5))]
        return "+".join(p[0] for p in parts), b"".join(p[1] for p in parts)


def ctypes_size(cls) -> int:
    import ctypes

    return ctypes.sizeof(cls)


def ctypes_field_size(cls, name: str) -> int:
    return getattr(cls, name).size


class BytesSource:
    """read_exactly over a bytes buffer: n bytes, fewer only at the end (as the socket reader)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def __call__(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk


def read_all(data: bytes, limits: protocol.Limits = protocol.Limits(), max_messages: int = 64) -> list:
    """Every message of a stream; stops at ProtocolError/PeerClosed (which propagate)."""
    reader = protocol.MessageReader(BytesSource(data), limits)
    messages = []
    while len(messages) < max_messages:
        messages.append(reader.read())
    return messages


@dataclass
class FuzzReport:
    frames: int = 0
    crashes: int = 0
    crash_examples: list = field(default_factory=list)
    outcomes: dict = field(default_factory=dict)
    max_seconds_per_frame: float = 0.0
    slowest: str = ""
    peak_allocation_bytes: int = 0
    peak_kind: str = ""
    limit_bytes: int = 0
    loopback_frames: int = 0
    loopback_crashes: int = 0
    loopback_examples: list = field(default_factory=list)
    loopback_max_seconds: float = 0.0
    loopback_outcomes: dict = field(default_factory=dict)
    server_alive_after: bool | None = None
    seconds: float = 0.0


def fuzz_reader(frames: int, seed: int, limits: protocol.Limits = protocol.Limits(),
                report: FuzzReport | None = None, progress=None) -> FuzzReport:
    report = report or FuzzReport()
    report.limit_bytes = limits.max_message_bytes
    mutator = Mutator(seed, limits)
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        for n in range(frames):
            label, data = mutator.stream()
            tracemalloc.reset_peak()
            base, _ = tracemalloc.get_traced_memory()
            started = time.perf_counter()
            try:
                read_all(data, limits)
                outcome = "ok"
            except protocol.ProtocolError as exc:
                outcome = "ProtocolError: " + str(exc).split(" ")[0]
            except protocol.PeerClosed as exc:
                outcome = "PeerClosed" if exc.mid_frame else "end of stream"  # cut frame / clean end
            except Exception as exc:  # a crash: the reader let something else out
                outcome = f"CRASH {type(exc).__name__}"
                report.crashes += 1
                if len(report.crash_examples) < 20:
                    report.crash_examples.append({"label": label, "error": repr(exc), "frame_hex": data[:400].hex()})
            elapsed = time.perf_counter() - started
            _, peak = tracemalloc.get_traced_memory()
            if elapsed > report.max_seconds_per_frame:
                report.max_seconds_per_frame, report.slowest = elapsed, label
            if peak - base > report.peak_allocation_bytes:
                report.peak_allocation_bytes, report.peak_kind = peak - base, label
            key = outcome.split(":")[0]
            report.outcomes[key] = report.outcomes.get(key, 0) + 1
            report.frames += 1
            if progress and (n + 1) % 10000 == 0:
                progress(f"{n + 1} frames, {report.crashes} crashes, max {report.max_seconds_per_frame * 1e3:.1f} ms, "
                         f"peak {report.peak_allocation_bytes / 2 ** 20:.2f} MiB")
    finally:
        if not tracing:
            tracemalloc.stop()
    return report


class _ErrorLog(logging.Handler):
    """Counts server log records with a traceback (an unexpected failure inside the server)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record.getMessage())


def _exchange(address, payload: bytes, timeout_s: float) -> tuple[str, list]:
    """Send payload, half-close, read to the end; (outcome, messages)."""
    messages: list = []
    with socket.create_connection(tuple(address), timeout=timeout_s) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may already have answered and closed
        reader = protocol.MessageReader(protocol.socket_reader(sock))
        try:
            while True:
                message = reader.read()
                messages.append(message)
                if isinstance(message, protocol.Close):
                    return "close", messages
        except protocol.PeerClosed:
            return "eof", messages
        except socket.timeout:
            return "hang", messages
        except ConnectionResetError:
            return "reset", messages


def fuzz_server(frames: int, seed: int, report: FuzzReport | None = None, io_timeout_s: float = 5.0) -> FuzzReport:
    """Fuzzed streams after a valid config + header, over loopback to an in-process server."""
    from gadgets.chain import ChainRepository
    from gadgets.wire.client import replay
    from gadgets.wire.server import ReconServer

    report = report or FuzzReport()
    server = ReconServer("127.0.0.1", 0, ChainRepository(), io_timeout_s=io_timeout_s, max_connections=4)
    handler = _ErrorLog()
    server_log = logging.getLogger("pisf")
    server_log.addHandler(handler)
    previous_level = server_log.level
    server_log.setLevel(logging.ERROR)
    server_log.propagate = False
    server.start_background()
    mutator = Mutator(seed + 1)
    preamble = protocol.frame_config_name("zerofill") + protocol.frame_header(make_header())
    lines = b"".join(protocol.frame_acquisition(make_line(ky)) for ky in range(4))
    try:
        for _ in range(frames):
            label, data = mutator.stream()
            r = mutator.rng.random()
            payload = (data if r < 0.15 else preamble + data if r < 0.6 else preamble + lines + data)
            payload += protocol.frame_close()
            errors_before = len(handler.records)
            started = time.perf_counter()
            outcome, messages = _exchange(server.address, payload, timeout_s=io_timeout_s + 10)
            elapsed = time.perf_counter() - started
            report.loopback_max_seconds = max(report.loopback_max_seconds, elapsed)
            texts = [m.text for m in messages if isinstance(m, protocol.Text)]
            new_records = handler.records[errors_before:]
            internal = any("internal server error" in t for t in texts) or any(
                "unexpected failure" in m for m in new_records)
            # a gadget raising on data that passed validation: reported to the client, but a finding
            chain_failure = any("failed" in m for m in new_records)
            bad = outcome == "hang" or internal or chain_failure
            key = outcome + ("+error" if any(t.startswith("ERROR") for t in texts) else "")
            report.loopback_outcomes[key] = report.loopback_outcomes.get(key, 0) + 1
            report.loopback_frames += 1
            if bad:
                report.loopback_crashes += 1
                if len(report.loopback_examples) < 20:
                    report.loopback_examples.append({"label": label, "outcome": outcome, "texts": texts[-2:],
                                                     "log": handler.records[errors_before:][:2]})
        header = make_header()
        result = replay(None, *server.address, header_text=header,
                        acquisitions=[make_line(ky, last=ky == NY - 1) for ky in range(NY)], timeout_s=30)
        report.server_alive_after = bool(result.closed and not result.errors and len(result.images) == 1)
    finally:
        server.shutdown(wait_s=5)
        server_log.removeHandler(handler)
        server_log.setLevel(previous_level)
        server_log.propagate = True
    return report


def run_fuzz(frames: int, seed: int, loopback: int, progress=None) -> FuzzReport:
    started = time.monotonic()
    report = fuzz_reader(frames, seed, progress=progress)
    if loopback > 0:
        fuzz_server(loopback, seed, report)
    report.seconds = time.monotonic() - started
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=100000, help="fuzzed streams through the frame reader")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loopback", type=int, default=None,
                        help="of those, how many also go to a live server over loopback (default: 1 %%, at most 2000)")
    parser.add_argument("--json", type=Path, help="write the report here as JSON")


def run(args: argparse.Namespace) -> int:
    loopback = args.loopback if args.loopback is not None else min(max(args.frames // 100, 1), 2000)
    report = run_fuzz(args.frames, args.seed, loopback, progress=lambda s: print(s, flush=True))
    summary = {
        "frames_fuzzed": report.frames, "crashes": report.crashes,
        "max_ms_per_frame": round(report.max_seconds_per_frame * 1e3, 2), "slowest": report.slowest,
        "peak_allocation_bytes": report.peak_allocation_bytes, "peak_frame": report.peak_kind,
        "limit_bytes": report.limit_bytes, "outcomes": report.outcomes,
        "loopback_frames": report.loopback_frames, "loopback_crashes": report.loopback_crashes,
        "loopback_max_s": round(report.loopback_max_seconds, 3), "loopback_outcomes": report.loopback_outcomes,
        "server_alive_after": report.server_alive_after, "seconds": round(report.seconds, 1),
        "crash_examples": report.crash_examples, "loopback_examples": report.loopback_examples,
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        from tools.cli import created_directory
        created_directory(args.json.parent)
        args.json.write_text(json.dumps(summary, indent=1))
    ok = (report.crashes == 0 and report.loopback_crashes == 0 and report.peak_allocation_bytes < report.limit_bytes
          and report.server_alive_after in (None, True))
    return 0 if ok else 1
